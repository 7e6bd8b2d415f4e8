"""Robustness suite: how much forget-domain knowledge an adversary can still get out of a model
(white-box probes here; the attack grid and the worst-case score build on them)."""
