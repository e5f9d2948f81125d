"""Small helpers shared by the command modules: output streams, JSON, option parsing.

Library modules import `info` from here, so this module imports neither typer nor torch at
module level.
"""

from __future__ import annotations

import functools
import inspect
import sys
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from undo_cli.jsontext import to_json

# Human-readable output goes to stderr so that stdout stays clean for `--json`.
err_console = Console(stderr=True, highlight=False)


def info(message: str) -> None:
    """A status line for people, on stderr."""
    err_console.print(message, markup=False)


def emit_json(payload: Any) -> None:
    """The one JSON document a `--json` command prints on stdout."""
    sys.stdout.write(to_json(payload, indent=2) + "\n")
    sys.stdout.flush()


# ------------------------------------------------------------------------------- lazy help
#
# `undo --help` and every command but the one asked for must not import torch, yet some help
# texts are built from registries in torch-importing modules (e.g. the unlearning methods).
# Such a command passes a short help for the command list and builds its full help only when
# it is shown:
#
#     @app.command("unlearn", cls=lazy_help(_help, options={"method": _method_help}),
#                  short_help=_SUMMARY)


def lazy_help(text: Callable[[], str], *,
              options: dict[str, Callable[[], str]] | None = None) -> type:
    """A typer command class whose help is `text()` and whose options named in `options`
    (by parameter name) get the help `options[name]()`, called only when help is formatted.

    Pass it as `cls=` with a `short_help=` (the command list shows that without building the
    full help).
    """
    from typer.core import TyperCommand

    options = dict(options or {})

    class LazyHelpCommand(TyperCommand):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            unknown = set(options) - {param.name for param in self.params}
            if unknown:
                raise TypeError(f"{self.name}: lazy help for unknown options {sorted(unknown)}")
            self._help_built = False

        def format_help(self, ctx: Any, formatter: Any) -> None:
            if not self._help_built:
                self.help = inspect.cleandoc(text())
                for param in self.params:
                    if param.name in options:
                        param.help = options[param.name]()
                self._help_built = True
            return super().format_help(ctx, formatter)

    return LazyHelpCommand


# --------------------------------------------------------------------------- training options
#
# The options of every command that trains (train, unlearn, distill, relearn-attack) are
# defined once, here. A command adds them all with one decorator and receives them as one
# `TrainingOptions` value:
#
#     @app.command("unlearn")
#     @training_options(defaults={"lr": 1e-5, "max_steps": 100}, exclude=("eval_every",))
#     def unlearn_command(src: Path = typer.Argument(...), ..., *, opts: TrainingOptions):
#         config = opts.train_config(out)        # an engine TrainConfig, state dir defaulted
#
# (`opts` must be the function's last parameter, keyword-only, with no default.)


@dataclass
class TrainingOptions:
    """The shared training options of one command invocation (see `training_options`).

    The defaults repeat `engine.TrainConfig`'s so that parsing options never imports torch
    (`tests/test_cli.py` checks that the two agree)."""

    lr: float = 1e-4
    min_lr: float = 0.0
    schedule: str = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    batch_size: int = 8
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    max_steps: int | None = None
    max_tokens: int | None = None
    max_length: int = 256
    seed: int = 0
    log_every: int = 10
    eval_every: int | None = None
    save_every: int | None = None
    state_dir: Path | None = None
    resume: bool = False
    keep_last_finite: bool = False
    bf16: bool = False
    device: str | None = None
    quiet: bool = False
    json: bool = False
    overwrite: bool = False
    allow_pickle: bool = False
    trust_remote_code: bool = False

    def state_dir_for(self, out: str | Path) -> Path:
        """`--state-dir`, or its default `OUT.undo-state` beside the output directory."""
        if self.state_dir is not None:
            return Path(self.state_dir)
        out = Path(out)
        return out.parent / f"{out.name}.undo-state"

    def train_config(self, out: str | Path, **overrides: Any):
        """The engine's `TrainConfig` for a run writing `out` (fields in `overrides` win)."""
        from undo_cli.engine import TrainConfig

        values = {name: getattr(self, name) for name in _CONFIG_FIELDS}
        values["max_grad_norm"] = self.max_grad_norm if self.max_grad_norm else None
        values["state_dir"] = self.state_dir_for(out)
        values.update(overrides)
        return TrainConfig(**values)


_CONFIG_FIELDS = ("lr", "min_lr", "schedule", "warmup_steps", "weight_decay", "batch_size",
                  "grad_accum", "max_grad_norm", "max_steps", "max_tokens", "seed", "log_every",
                  "eval_every", "save_every", "resume", "keep_last_finite", "bf16", "device",
                  "quiet")

_TRAINING = "Training"
_COMMON = "Input and output"
# name -> (type, option declarations, help, help panel); defaults come from TrainingOptions.
_OPTION_SPECS: dict[str, tuple[Any, tuple[str, ...], str, str]] = {
    "lr": (float, ("--lr",), "Peak learning rate (AdamW).", _TRAINING),
    "min_lr": (float, ("--min-lr",), "Floor the linear/cosine decay ends at.", _TRAINING),
    "schedule": (str, ("--schedule",), "Learning-rate schedule after warmup: constant, linear "
                 "or cosine.", _TRAINING),
    "warmup_steps": (int, ("--warmup-steps",), "Steps of linear warmup from 0 to --lr.",
                     _TRAINING),
    "weight_decay": (float, ("--weight-decay",), "AdamW weight decay (never applied to norms "
                     "and biases).", _TRAINING),
    "batch_size": (int, ("--batch-size",), "Examples per micro-batch, per data stream and per "
                   "process.", _TRAINING),
    "grad_accum": (int, ("--grad-accum",), "Micro-batches accumulated into one optimizer step.",
                   _TRAINING),
    "max_grad_norm": (float, ("--max-grad-norm",), "Clip the gradient norm to this; 0 turns "
                      "clipping off.", _TRAINING),
    "max_steps": (int | None, ("--max-steps",), "Stop after this many optimizer steps.",
                  _TRAINING),
    "max_tokens": (int | None, ("--max-tokens",), "Stop once this many tokens (all streams, "
                   "all processes) were trained on.", _TRAINING),
    "max_length": (int, ("--max-length",), "Block size of packed text; longest prompt + "
                   "completion allowed.", _TRAINING),
    "seed": (int, ("--seed",), "Seed of data order, sampling and dropout (a CPU run is "
             "repeatable bit for bit).", _TRAINING),
    "log_every": (int, ("--log-every",), "Log (train_log.jsonl, progress) every N steps.",
                  _TRAINING),
    "eval_every": (int | None, ("--eval-every",), "Evaluate every N steps (and at the end).",
                   _TRAINING),
    "save_every": (int | None, ("--save-every",), "Save the training state every N steps so "
                   "that --resume can continue after an interruption.", _TRAINING),
    "state_dir": (Path | None, ("--state-dir",), "Where training state is saved (default: "
                  "OUT.undo-state beside OUT; removed after success).", _TRAINING),
    "resume": (bool, ("--resume",), "Continue from the last saved training state (same "
               "settings); the result equals an uninterrupted run.", _TRAINING),
    "keep_last_finite": (bool, ("--keep-last-finite",), "If training diverges (NaN/inf), "
                         "write the last finite weights instead of failing.", _TRAINING),
    "bf16": (bool, ("--bf16",), "bf16 autocast on CUDA (CPU always trains in fp32).",
             _TRAINING),
    "device": (str | None, ("--device",), "cpu, cuda or cuda:N (default: CUDA if available).",
               _TRAINING),
    "quiet": (bool, ("--quiet", "-q"), "No progress bar or status lines.", _COMMON),
    "json": (bool, ("--json",), "Print a JSON summary on stdout.", _COMMON),
    "overwrite": (bool, ("--overwrite",), "Replace a non-empty OUT.", _COMMON),
    "allow_pickle": (bool, ("--allow-pickle",), "Allow loading pickled (.bin) weights.",
                     _COMMON),
    "trust_remote_code": (bool, ("--trust-remote-code",), "Allow a checkpoint's custom code.",
                          _COMMON),
}


def training_options(*, defaults: dict[str, Any] | None = None, exclude: Iterable[str] = (),
                     help: dict[str, str] | None = None) -> Callable:  # noqa: A002
    """Decorator adding the shared training options to a typer command (see above).

    `defaults` replaces option defaults for this command, `help` their help texts, and the
    options named in `exclude` are not offered (their `TrainingOptions` value is the default,
    or the one in `defaults`).
    """
    import typer

    defaults, help, exclude = dict(defaults or {}), dict(help or {}), set(exclude)
    unknown = (set(defaults) | set(help) | exclude) - set(_OPTION_SPECS)
    if unknown:
        raise TypeError(f"unknown training options: {sorted(unknown)}")

    def decorate(func: Callable) -> Callable:
        signature = inspect.signature(func)
        hints = typing.get_type_hints(func)
        own = [p for name, p in signature.parameters.items() if name != "opts"]
        if "opts" not in signature.parameters:
            raise TypeError(f"{func.__name__} needs a keyword-only parameter `opts`")
        clash = {p.name for p in own} & (set(_OPTION_SPECS) - exclude)
        if clash:
            raise TypeError(f"{func.__name__} redefines training options {sorted(clash)}")
        base = TrainingOptions()
        added, annotations = [], {p.name: hints[p.name] for p in own if p.name in hints}
        for name, (kind, decls, text, panel) in _OPTION_SPECS.items():
            if name in exclude:
                continue
            default = defaults.get(name, getattr(base, name))
            if default is None and not isinstance(kind, types.UnionType):
                kind = kind | None
            option = typer.Option(default, *decls, help=help.get(name, text),
                                  rich_help_panel=panel, show_default=default is not None)
            added.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,
                                           default=option, annotation=kind))
            annotations[name] = kind
        names = [p.name for p in added]
        fixed = {name: defaults.get(name, getattr(base, name)) for name in exclude}

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            values = {name: kwargs.pop(name) for name in names if name in kwargs}
            return func(*args, opts=TrainingOptions(**fixed, **values), **kwargs)

        params = [p.replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD,
                            annotation=hints.get(p.name, p.annotation)) for p in own]
        wrapper.__signature__ = signature.replace(parameters=params + added)
        wrapper.__annotations__ = {**annotations, "return": hints.get("return")}
        del wrapper.__wrapped__  # typer must see the new signature, not the original's
        return wrapper

    return decorate
