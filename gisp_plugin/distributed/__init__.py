"""Running one job across the ranks of a ``torchrun`` launch (see ``context``)."""
