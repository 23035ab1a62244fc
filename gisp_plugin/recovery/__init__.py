"""Recovery fine-tuning: a short, method-agnostic post-step after pruning (off by default)."""
