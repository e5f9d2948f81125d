"""Experiment trackers (`--report-to`): a run's numbers sent to TensorBoard, Weights & Biases,
MLflow or Trackio through `accelerate`'s tracker classes, offline.

What a run reports (tag names; a tracker groups them by the part before the first `/`):

- `train/loss`, `train/<term>` (each term of the loss), `train/lr`, `train/grad_norm`,
  `train/tokens_per_s` (throughput), `train/tokens`, `train/flops`: every training-log entry,
  at its optimizer step;
- `eval/<SET>.<METRIC>` (e.g. `eval/retain.accuracy`): every evaluation, at its step;
- `relearn-attack`: the same per run under `attack/<RUN>/` (RUN: the configuration and seed),
  and the worst case under `worst/<SET>.<METRIC>` at each step of its curve;
- the run's configuration once, as hyperparameters: the keys of `undo.json` (`stage`,
  `arguments.*`, `parents.*`, `seed`), flattened with dots.

Where: TensorBoard event files in `LOGGING_DIR/RUN_NAME/`; W&B's offline run in
`LOGGING_DIR/wandb/` (mode offline unless `WANDB_MODE` says otherwise); MLflow's file store
in `LOGGING_DIR/mlruns` (unless `MLFLOW_TRACKING_URI` is set); Trackio's local database.
Only the main process of a launch reports. The command line refuses a tracker that is not
installed before any work (`undo_cli.options.check_trackers`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from undo_cli.options import check_trackers

log = logging.getLogger(__name__)

PROJECT = "undo"  # the W&B project, MLflow experiment and Trackio project
SKIP = {"type", "step", "elapsed_s"}  # entry fields that are not curves
EVAL_COUNTERS = {"tokens", "flops"}


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as one level of `a.b.c` keys holding bool, int, float or str (lists
    and None as their JSON text), which every tracker takes as hyperparameters."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        elif isinstance(value, Path):
            out[name] = str(value)
        else:
            out[name] = json.dumps(value, default=str)
    return out


def entry_values(entry: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The curves of one training-log entry (`engine.train`'s `on_log`): a `train` entry's
    loss, terms, learning rate, gradient norm and throughput under `train/`, an `eval`
    entry's metrics under `eval/`."""
    kind = entry.get("type")
    if kind not in ("train", "eval"):
        return {}
    skip = SKIP | (EVAL_COUNTERS if kind == "eval" else set())
    return {f"{prefix}{kind}/{k}": float(v) for k, v in entry.items()
            if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)}


class Trackers:
    """The trackers of one run: `log(values, step)`, `log_entry(entry)`, `close()`.

    They start at the first value reported, once the engine has set accelerate up (its
    trackers log through accelerate's process-aware logger), and are given the run's settings
    then."""

    def __init__(self, names: list[str], run_name: str, logging_dir: Path,
                 config: Mapping[str, Any] | None = None):
        self.names, self.run_name, self.logging_dir = names, run_name, logging_dir
        self.config = dict(config or {})
        self.trackers: list[Any] | None = None

    def _started(self) -> list[Any]:
        if self.trackers is None:
            self.trackers = [_make(name, self.run_name, self.logging_dir)
                             for name in self.names]
            if self.config:
                values = flatten(self.config)
                for tracker in self.trackers:
                    tracker.store_init_configuration(values)
        return self.trackers

    def log(self, values: Mapping[str, float], step: int) -> None:
        clean = {k: v for k, v in values.items() if isinstance(v, (int, float))
                 and math.isfinite(v)}
        if clean:
            for tracker in self._started():
                tracker.log(clean, step=step)

    def log_entry(self, entry: Mapping[str, Any], prefix: str = "") -> None:
        """Report one training-log entry (at its step)."""
        values = entry_values(entry, prefix)
        if values:
            self.log(values, int(entry["step"]))

    def close(self) -> None:
        for tracker in self.trackers or []:
            try:
                tracker.finish()
            except Exception as e:  # noqa: BLE001 - a tracker's own error must not lose OUT
                log.warning("warning: closing the %s tracker failed: %s", tracker.name, e)
        self.trackers = []


def _make(name: str, run_name: str, logging_dir: Path) -> Any:
    """One started accelerate tracker, writing under `logging_dir`, offline."""
    from accelerate.tracking import (
        MLflowTracker,
        TensorBoardTracker,
        TrackioTracker,
        WandBTracker,
    )

    if name == "tensorboard":
        tracker = TensorBoardTracker(run_name, str(logging_dir))
    elif name == "wandb":
        logging_dir.mkdir(parents=True, exist_ok=True)
        tracker = WandBTracker(PROJECT, name=run_name, dir=str(logging_dir),
                               mode=os.environ.get("WANDB_MODE", "offline"))
    elif name == "mlflow":
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            import mlflow

            mlflow.set_tracking_uri((logging_dir / "mlruns").resolve().as_uri())
        tracker = MLflowTracker(PROJECT, run_name=run_name)
    else:
        tracker = TrackioTracker(PROJECT, name=run_name)
    tracker.main_process_only = False  # only the main process opens trackers at all
    tracker.start()
    return tracker


def open_trackers(report_to: Iterable[str], *, run_name: str, logging_dir: str | Path,
                  config: Mapping[str, Any] | None = None) -> Trackers | None:
    """The trackers `report_to` names (started at the first value, then given the run's
    `config`, flattened), or None when none is asked for. Call it on the main process only."""
    chosen = check_trackers(list(report_to))
    return Trackers(chosen, run_name, Path(logging_dir), config) if chosen else None
