"""undo: Unlearn-Noise-Distill-on-Outputs, robust capability removal for language models."""

__version__ = "0.1.0"
