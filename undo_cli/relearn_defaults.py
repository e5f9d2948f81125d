"""The relearning attack's default settings, importable without torch.

`undo_cli.relearn` (which imports torch) re-exports them; the command line reads them from
here so that `undo --help` and `undo relearn-attack --help` do not import torch.
"""

# The paper's grid: ten log-spaced learning rates from 1e-6 to 1e-3.
PAPER_LRS = (1e-6, 2.15e-6, 4.64e-6, 1e-5, 2.15e-5, 4.64e-5, 1e-4, 2.15e-4, 4.64e-4, 1e-3)
DEFAULT_STEPS = 500
DEFAULT_EVAL_EVERY = 25
DEFAULT_LORA_RANK = 128
DEFAULT_LORA_ALPHA = 256.0
DEFAULT_LORA_TARGETS = "all-linear"

__all__ = ["DEFAULT_EVAL_EVERY", "DEFAULT_LORA_ALPHA", "DEFAULT_LORA_RANK",
           "DEFAULT_LORA_TARGETS", "DEFAULT_STEPS", "PAPER_LRS"]
