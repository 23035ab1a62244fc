"""Shipping a pruned model: torchao quantisation, the model card, sizes on disk, pushing to the Hub."""
