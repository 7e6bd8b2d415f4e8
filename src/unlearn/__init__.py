"""unlearn: remove a knowledge domain from a language model, measure it, attack it."""

__version__ = "0.1.0"
