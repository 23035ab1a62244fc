"""Exports of pruned models to the formats inference engines run: GGUF (llama.cpp), Nemotron-NAS, the family's own."""
