"""Training state on disk: periodic saves (`--save-every`), bit-exact `--resume`, cleanup, and
the output of a command that trains (`training_output`). What a state directory holds, and
how it is read without unpickling anything, is `undo_cli.engine.state_files`."""

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
from undo_cli.engine.state_files import (
    COMPLETE,
    STATE_NAME,
    file_hashes,
    has_marker,
    is_ours,
    remove_state_dir,
    save_rank,
    write_marker,
)
from undo_cli.errors import UsageError
from undo_cli.options import RESUME_KEYS, TrainConfig

log = logging.getLogger(__name__)

TRAIN_LOG = "train_log.jsonl"  # the JSONL training log written into every trained output
STATE_PREFIX = "step-"


class RunState:
    """Counters and histories saved with the training state."""

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
        self.best: dict | None = None  # --keep-best: step, value, weights (local, on the CPU)

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict) -> None:
        unknown = set(state) - set(self.__dict__)
        if unknown:
            raise UsageError(f"the saved training state holds unknown entries {sorted(unknown)}")
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
    try:
        data = json.loads((state / COMPLETE).read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{state / COMPLETE}: not readable ({e})") from e
    config = data.get("config") if isinstance(data, dict) else None
    if not isinstance(config, dict):
        raise UsageError(f"{state / COMPLETE}: not a training state's completion record")
    config.setdefault("bf16_weights", False)  # a state saved before --bf16-weights existed
    return config


def _states(state_dir: Path) -> list[Path]:
    """The entries of `state_dir` named like undo's training states (`step-N`, `.tmp-...`)."""
    if not state_dir.is_dir():
        return []
    return sorted(p for p in state_dir.iterdir() if STATE_NAME.match(p.name))


def check_state_dir(state_dir: str | Path) -> None:
    """`UsageError` if `state_dir` holds an entry named like undo's states that undo did not
    write (an older version's pickled state, or anything else): undo neither loads nor
    removes such an entry, so it refuses to save beside it."""
    for entry in _states(Path(state_dir)):
        if not is_ours(entry):
            raise UsageError(f"--state-dir {state_dir} holds {entry.name}, which this version "
                             "of undo did not write (older versions pickled their state; undo "
                             "never loads or deletes it): delete it, or choose another "
                             "--state-dir")


def latest_state(state_dir: str | Path) -> Path | None:
    """The newest complete training-state directory under `state_dir`, or None."""
    found = [p for p in _states(Path(state_dir)) if p.name.startswith(STATE_PREFIX)
             and has_marker(p) and (p / COMPLETE).is_file()]
    return max(found, key=lambda p: int(p.name[len(STATE_PREFIX):]), default=None)


def remove_state(state_dir: str | Path | None) -> None:
    """Delete the saved training states in `state_dir` (after the run's output was written),
    and the directory itself if nothing else is in it. Only directories carrying undo's
    marker are removed; other files are never touched."""
    if state_dir is None or not is_main_process():
        return
    state_dir = Path(state_dir)
    clear_states(state_dir)
    with suppress(OSError):
        state_dir.rmdir()


def clear_states(state_dir: Path, keep: Path | None = None) -> None:
    """Remove the saved states in `state_dir` (but `keep`): undo's own only."""
    for p in _states(state_dir):
        if p != keep and is_ours(p):
            with suppress(OSError):
                remove_state_dir(p)


def save_state(accelerator, state_dir: Path, step: int, key: dict, *, model, optimizer,
               run: dict, sharded: bool) -> None:
    """Write the state (`undo_cli.engine.state_files`: safetensors and JSON) into a temporary
    directory, then rename it: never a half-written one. Every process writes its part."""
    final = state_dir / f"{STATE_PREFIX}{step:08d}"
    tmp = state_dir / f".tmp-{STATE_PREFIX}{step:08d}"
    main = accelerator.is_main_process
    try:
        if main:
            if tmp.exists() and is_ours(tmp):
                remove_state_dir(tmp)
            tmp.mkdir(parents=True)
            write_marker(tmp, step)
        accelerator.wait_for_everyone()
        save_rank(tmp, accelerator.process_index, model=model, optimizer=optimizer, run=run,
                  with_weights=sharded or main)
        accelerator.wait_for_everyone()
        if main:
            (tmp / COMPLETE).write_text(json.dumps({"step": step, "config": key,
                                                    "files": file_hashes(tmp)}) + "\n")
            if final.exists() and is_ours(final):
                remove_state_dir(final)
            os.replace(tmp, final)
            clear_states(state_dir, keep=final)
        accelerator.wait_for_everyone()
    except BaseException:  # e.g. a full disk: leave no half-written state behind
        if main:
            if is_ours(tmp):
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
