"""Evaluation: the native cloze evaluator, collapse detection and baseline tables."""
