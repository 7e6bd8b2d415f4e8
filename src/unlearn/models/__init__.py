"""Models by reference (local directory or hub id): resolving, loading, LoRA, computing modes,
saving."""
