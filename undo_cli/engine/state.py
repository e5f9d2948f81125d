"""Training state on disk: periodic saves (`--save-every`), bit-exact `--resume`, cleanup, and
the output of a command that trains (`training_output`)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import replace
from pathlib import Path

from undo_cli.engine.processes import is_main_process, wait_for_everyone
from undo_cli.options import RESUME_KEYS, TrainConfig

log = logging.getLogger(__name__)

TRAIN_LOG = "train_log.jsonl"  # the JSONL training log written into every trained output
STATE_PREFIX = "step-"
COMPLETE = "complete.json"


class RunState:
    """Counters and histories saved with the training state (registered with accelerate)."""

    def __init__(self) -> None:
        self.step = 0
        self.tokens = 0
        self.flops_trained = 0.0
        self.flops_frozen = 0.0
        self.log: list[dict] = []
        self.evals: list[dict] = []
        self.streams: dict[str, dict] = {}
        self.elapsed_s = 0.0
        self.config: dict = {}
        self.window: dict = {}  # the unfinished log window (so resumed logs match)

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)


def resume_key(config: TrainConfig, streams: dict, world: int) -> dict:
    """What must be equal for `--resume` to reproduce the interrupted run."""
    key = {k: getattr(config, k) for k in RESUME_KEYS}
    key["betas"] = list(config.betas)
    key["streams"] = sorted(streams)
    key["processes"] = world
    return key


def saved_key(state: Path) -> dict:
    """The resume key a saved state was written with."""
    return json.loads((state / COMPLETE).read_text()).get("config", {})


def latest_state(state_dir: str | Path) -> Path | None:
    """The newest complete training-state directory under `state_dir`, or None."""
    state_dir = Path(state_dir)
    if not state_dir.is_dir():
        return None
    found = [p for p in state_dir.iterdir()
             if p.name.startswith(STATE_PREFIX) and (p / COMPLETE).is_file()]
    return max(found, key=lambda p: int(p.name[len(STATE_PREFIX):]), default=None)


def remove_state(state_dir: str | Path | None) -> None:
    """Delete the saved training states in `state_dir` (after the run's output was written),
    and the directory itself if nothing else is in it. Other files are never touched."""
    if state_dir is None or not is_main_process():
        return
    state_dir = Path(state_dir)
    clear_states(state_dir)
    with suppress(OSError):
        state_dir.rmdir()


def clear_states(state_dir: Path, keep: Path | None = None) -> None:
    """Remove the saved states in `state_dir` (but `keep`)."""
    if not state_dir.is_dir():
        return
    for p in state_dir.iterdir():
        if p != keep and (p.name.startswith(STATE_PREFIX) or p.name.startswith(".tmp-")):
            shutil.rmtree(p, ignore_errors=True)


def save_state(accelerator, state_dir: Path, step: int, key: dict) -> None:
    """Write the state into a temporary directory, then rename it: never a half-written one."""
    final = state_dir / f"{STATE_PREFIX}{step:08d}"
    tmp = state_dir / f".tmp-{STATE_PREFIX}{step:08d}"
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / COMPLETE).write_text(json.dumps({"step": step, "config": key}) + "\n")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            clear_states(state_dir, keep=final)
        accelerator.wait_for_everyone()
    except BaseException:  # e.g. a full disk: leave no half-written state behind
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            with suppress(OSError):
                state_dir.rmdir()  # only if no earlier state is in it
        raise


@contextmanager
def training_output(out: str | Path, config: TrainConfig, *, inputs=(), overwrite: bool = False,
                    keep_state: bool = False) -> Iterator[tuple[Path | None, TrainConfig]]:
    """The output of a command that trains: `(directory, run_config)`.

    On the main process `directory` is the temporary directory of `atomic_output(out)` and
    `run_config` logs to `directory/train_log.jsonl`; other processes get `(None, config)`
    and write nothing. After the block succeeds every process waits for the others, and the
    training state in `config.state_dir` is removed (unless `keep_state`); on failure the
    state stays, for `--resume`.
    """
    from undo_cli.checkpoint import atomic_output

    main = is_main_process()
    output = atomic_output(out, inputs=inputs, overwrite=overwrite) if main else nullcontext()
    with output as tmp:
        path = Path(tmp) / TRAIN_LOG if tmp is not None else None
        yield tmp, replace(config, log_path=path)
    wait_for_everyone()
    if not keep_state:
        remove_state(config.state_dir)
