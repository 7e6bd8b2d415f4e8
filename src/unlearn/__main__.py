"""`python -m unlearn` (this is also what `torchrun -m unlearn` runs)."""

from unlearn.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
