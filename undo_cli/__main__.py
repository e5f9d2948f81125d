"""`python -m undo_cli ...` (also what `accelerate launch -m undo_cli ...` runs)."""

from undo_cli.cli import main

if __name__ == "__main__":
    main()
