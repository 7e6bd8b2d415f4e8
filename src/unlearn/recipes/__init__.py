"""Recipes: one per regime (unlearn, attack, ...), shared by the CLI, sweeps and tests."""
