"""The built-in language corpus (README.md); data files only."""
