"""The relearning attack (`undo relearn-attack`): how fast does finetuning bring a capability back?

An unlearned model that only *suppresses* a capability relearns it in a few hundred steps
of finetuning on the forget domain; a model that never had it (or an UNDO student) relearns
it about as slowly as learning from scratch. The attack measures this as the paper does:

- For each learning rate of a grid (default `PAPER_LRS`: ten log-spaced values from 1e-6 to
  1e-3) and each seed, a copy of the original weights is finetuned on the attack data for
  `steps` steps (full-parameter AdamW, or a peft LoRA adapter), and every eval set is
  evaluated every `eval_every` steps and at the last step. Every run starts from the same
  in-memory original weights (a `copy.deepcopy` of the model loaded once): nothing is
  reloaded from disk and nothing leaks from one run into the next. The evaluation at step 0
  is the same for every run, so it is computed once (`initial`) and shared.
- The forget metric (`SET.accuracy`, `SET.accuracy_norm`: maximised by the attacker;
  `SET.loss`, `SET.ppl`: minimised) is what the attacker tries to recover. At each step the
  value of a learning rate is the mean over its seeds (over the seeds that have a value at
  that step); the *worst case* for the defender is the best of those means over learning
  rates (the max for accuracy, the min for loss), and `worst_case[i]["lr"]` the learning rate
  that gives it (`null` at step 0, the unattacked model, which every run shares).
- Divergence: runs train with the engine's `keep_last_finite` (so a NaN/inf at a high
  learning rate ends that run, not the grid). A diverged run stays in the results with
  `"diverged": true`, `"diverged_step"` and only the evaluations from before it diverged; at
  later steps it has no value and does not count toward the worst case (an attacker would not
  use a broken model). An evaluation of non-finite weights counts as divergence at that step.
  (`keep_last_finite` rather than catching the engine's `UndoError`: the engine then reports
  the step of divergence itself; the price is one copy of the trained weights, refreshed
  every step. The engine's evaluation after restoring the last finite weights is skipped.)
- LoRA (`mode="lora"`): instead of full finetuning, a peft LoRA adapter is trained on the
  copy (base weights frozen), by default rank 128 and alpha 256 on `target_modules=
  "all-linear"`, i.e. every attention and MLP projection but not the output head (the LoRA
  attack of the wider unlearning literature, e.g. rank 128 on all projections). On a model
  narrower than the rank (test models), the rank is clipped to the narrowest wrapped layer
  (`attack.lora.rank`, with `rank_requested`). The learning-rate grid is the same.
- Quantisation (`quantize` = 8 or 4, see `undo_cli.quantize`): without attack data, the
  original model is quantised and evaluated (one run, `lr` null, at step 0); with attack data,
  each finetuning run's final model is also quantised and evaluated, as a separate run with
  the same `lr` and `seed` and a `quantize` entry, at the final step. Quantised runs count
  toward the worst case like any other run (grouped apart from the unquantised runs of the
  same learning rate); a diverged finetuning run is not quantised.

Summary numbers (`summary`):

- `final`: the worst case at the last step with a value (normally `steps`: `final_step`);
- `auc`: the trapezoid area under the worst-case curve divided by its step span, i.e. the
  curve's mean value over the attack (one point: that value). Lower is better for the
  defender with accuracy, higher with loss;
- `steps_to_threshold`: the first step at which the worst case reaches `threshold` (>= for
  accuracy, <= for loss), null if it never does or no threshold was given;
  `retain_at_threshold`: every metric of the other eval sets at that point (the seed mean of
  the learning rate giving the worst case there);
- `best_lr`: the learning rate giving the worst case at the end.

results.json (written into RESULTS_DIR with `undo.json`; `SCHEMA_VERSION` 1). Non-finite
numbers are written as null:

    {
      "schema_version": 1,
      "checkpoint": "models/unlearned",          # CKPT as given (null for a model in memory)
      "fingerprint": "blake3:...",              # undo_cli.checkpoint.fingerprint(CKPT)
      "forget_metric": "forget.accuracy",
      "direction": "max",                       # "max" accuracy-like, "min" loss-like
      "eval": {"forget": "forget_eval.jsonl", "retain": "retain_eval.jsonl"},
      "attack": {"mode": "full",                # "full" | "lora" | "none" (quantise only)
                 "lrs": [1e-06, ...], "steps": 500, "batch_size": 8, "eval_every": 25,
                 "seeds": [0], "data": ["forget_train.jsonl"], "max_length": 256,
                 "schedule": "constant", "warmup_steps": 0, "weight_decay": 0.0,
                 "grad_accum": 1, "max_grad_norm": 1.0, "bf16": false,
                 "lora": null | {"rank": 128, "rank_requested": 128, "alpha": 256.0,
                                 "targets": "all-linear", "dropout": 0.0},
                 "quantize": null | {"bits": 4, "group_size": 128}},
      "initial": {"forget.loss": 2.9, "forget.accuracy": 0.0, ...},   # step 0, flat keys
      "runs": [{"lr": 1e-4, "seed": 0, "quantize": null,
                "curve": [{"step": 0, "forget.accuracy": 0.0, ...}, {"step": 25, ...}, ...],
                "diverged": false, "diverged_step": null, "steps": 500, "tokens": 64000,
                "flops": 1.2e12, "trainable_parameters": 1000000, "train_loss": 0.4,
                "wall_time_s": 12.5, "eval_time_s": 1.1}, ...],
      "worst_case": [{"step": 0, "value": 0.0, "lr": null}, {"step": 25, "value": 0.3,
                     "lr": 1e-4}, ...],        # + "quantized": bool when quantising
      "summary": {"initial": 0.0, "final": 0.9, "final_step": 500, "auc": 0.71,
                  "threshold": 0.5, "steps_to_threshold": 75,
                  "retain_at_threshold": {"retain.accuracy": 0.98, ...}, "best_lr": 1e-4},
      "per_lr": [{"lr": 1e-4, "quantized": false, "runs": 1, "diverged_runs": 0,
                  "final": 0.9, "best": 0.92}, ...],    # the forget metric, seed means
      "timing": {"wall_s": 130.0, "eval_s": 12.0, "eval_share": 0.092, "evaluations": 211},
      "compute": {"tokens": ..., "flops": ...},
      "gates": [{"expression": "worst.forget.accuracy > 0.25", "failed": true,
                 "values": {"worst.forget.accuracy": 0.9}}]     # only with --fail-if
    }

`--fail-if` names (`gate_values`): `worst.SET.METRIC` (every metric at the last step of the
learning rate giving the worst case, so `worst.<forget metric>` is `summary.final`),
`initial.SET.METRIC` (before the attack) and the summary numbers `final`, `auc`,
`steps_to_threshold` (infinite when the threshold is never reached; only with a threshold).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from undo_cli.engine import TrainConfig
from undo_cli.errors import UsageError
from undo_cli.evaluate import expected_metrics
from undo_cli.gates import check_gates as evaluate_gates
from undo_cli.gates import parse_gates, raise_failed_gates
from undo_cli.jsontext import jsonable, to_json
from undo_cli.relearn_defaults import (  # torch-free, for the command line
    DEFAULT_EVAL_EVERY,
    DEFAULT_LORA_ALPHA,
    DEFAULT_LORA_RANK,
    DEFAULT_LORA_TARGETS,
    DEFAULT_STEPS,
    PAPER_LRS,
)

SCHEMA_VERSION = 1
RESULTS_NAME = "results.json"
PLOT_NAME = "relearn.png"
COMPARE_PLOT_NAME = "compare.png"
COMPARE_NAME = "compare.json"
MODELS_DIR = "models"
STAGE = "relearn-attack"

MAXIMISED = ("accuracy", "accuracy_norm")
MINIMISED = ("loss", "ppl")
_COUNTS = ("tokens", "n")  # counts, not performance: never averaged into summaries
_SUMMARY_GATE_NAMES = ("final", "auc")


@dataclass
class AttackConfig:
    """Settings of one attack grid (the CLI builds it from its options).

    `train` is the template of every run's `TrainConfig`: its batch size, schedule, warmup,
    weight decay, accumulation, clipping, bf16 and device are used; lr, max_steps, seed and
    the evaluation settings are set per run. `finetune=False` (no attack data) only
    quantises, and needs `quantize`.
    """

    lrs: list[float] = field(default_factory=lambda: list(PAPER_LRS))
    steps: int = DEFAULT_STEPS
    eval_every: int = DEFAULT_EVAL_EVERY
    seeds: list[int] = field(default_factory=lambda: [0])
    mode: str = "full"  # full | lora
    lora_rank: int = DEFAULT_LORA_RANK
    lora_alpha: float = DEFAULT_LORA_ALPHA
    lora_targets: str | list[str] = DEFAULT_LORA_TARGETS
    lora_dropout: float = 0.0
    quantize: int | None = None
    group_size: int | None = None
    finetune: bool = True
    train: TrainConfig = field(default_factory=lambda: TrainConfig(schedule="constant",
                                                                   max_steps=1))
    eval_batch_size: int | None = None
    max_new_tokens: int = 32

    def validate(self) -> None:
        """`UsageError` (named as the CLI options) for impossible settings."""
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise UsageError(f"--eval-batch-size must be at least 1 (got {self.eval_batch_size})")
        if self.max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens must be at least 1 (got {self.max_new_tokens})")
        if self.quantize is not None or self.group_size is not None:
            from undo_cli.quantize import check_settings

            if self.quantize is None:
                raise UsageError("--group-size needs --quantize")
            check_settings(self.quantize, self.group_size)
        if not self.finetune:
            if self.quantize is None:
                raise UsageError("no attack data: give --data PATH (or --quantize 8|4 for a "
                                 "quantisation-only attack)")
            return
        if not self.lrs:
            raise UsageError("--lrs is empty: give at least one learning rate")
        for lr in self.lrs:
            if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
                raise UsageError(f"--lrs: every learning rate must be positive (got {lr})")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise UsageError(f"--steps must be at least 1 (got {self.steps})")
        if not isinstance(self.eval_every, int) or self.eval_every < 1:
            raise UsageError(f"--eval-every must be at least 1 (got {self.eval_every})")
        if not self.seeds:
            raise UsageError("--seeds must be at least 1")
        if len(set(self.seeds)) != len(self.seeds):
            raise UsageError(f"seeds must be distinct (got {self.seeds})")
        if self.mode not in ("full", "lora"):
            raise UsageError(f"attack mode must be full or lora (got {self.mode!r})")
        if self.mode == "lora":
            if self.lora_rank < 1:
                raise UsageError(f"--lora-rank must be at least 1 (got {self.lora_rank})")
            if not self.lora_alpha > 0:
                raise UsageError(f"--lora-alpha must be positive (got {self.lora_alpha})")
            if not lora_target_list(self.lora_targets):
                raise UsageError("--lora-targets is empty")
        self.run_config(self.lrs[0], self.seeds[0]).validate()

    def run_config(self, lr: float, seed: int) -> TrainConfig:
        """The engine settings of the run at `lr` with `seed`."""
        return replace(self.train, lr=lr, max_steps=self.steps, max_tokens=None,
                       max_flops=None, seed=seed, eval_every=self.eval_every,
                       eval_at_start=False, keep_last_finite=True, quiet=True, log_path=None,
                       state_dir=None, save_every=None, resume=False)

    def describe(self, data: Sequence[str], max_length: int,
                 lora_rank: int | None = None) -> dict[str, Any]:
        """The `attack` entry of results.json."""
        t = self.train
        lora = None
        if self.finetune and self.mode == "lora":
            lora = {"rank": lora_rank or self.lora_rank, "rank_requested": self.lora_rank,
                    "alpha": self.lora_alpha, "targets": self.lora_targets,
                    "dropout": self.lora_dropout}
        quant = ({"bits": self.quantize, "group_size": self.group_size}
                 if self.quantize is not None else None)
        if not self.finetune:
            return {"mode": "none", "lrs": [], "steps": 0, "batch_size": t.batch_size,
                    "eval_every": self.eval_every, "seeds": [], "data": [],
                    "max_length": max_length, "lora": None, "quantize": quant}
        return {"mode": self.mode, "lrs": list(self.lrs), "steps": self.steps,
                "batch_size": t.batch_size, "eval_every": self.eval_every,
                "seeds": list(self.seeds), "data": [str(d) for d in data],
                "max_length": max_length, "schedule": t.schedule,
                "warmup_steps": t.warmup_steps, "min_lr": t.min_lr,
                "weight_decay": t.weight_decay, "grad_accum": t.grad_accum,
                "max_grad_norm": t.max_grad_norm, "bf16": t.bf16, "lora": lora,
                "quantize": quant}


# ----------------------------------------------------------------------------- parsing


def parse_lrs(text: str | Sequence[float] | None) -> list[float]:
    """`"1e-5,1e-4"` (or a list) -> [1e-5, 1e-4]; None -> the paper's grid. `UsageError` for
    an empty list, a value that is not a positive number, or a value given twice."""
    if text is None:
        return list(PAPER_LRS)
    if isinstance(text, str):
        parts = [p.strip() for p in text.replace(";", ",").split(",")]
        parts = [p for p in parts if p]
        values = []
        for p in parts:
            try:
                values.append(float(p))
            except ValueError:
                raise UsageError(f"--lrs: {p!r} is not a number (give e.g. "
                                 "--lrs 1e-5,1e-4,1e-3)") from None
    else:
        values = [float(v) for v in text]
    if not values:
        raise UsageError("--lrs is empty: give at least one learning rate, e.g. "
                         "--lrs 1e-5,1e-4")
    seen = set()
    for v in values:
        if not (math.isfinite(v) and v > 0):
            raise UsageError(f"--lrs: every learning rate must be positive (got {v:g})")
        if v in seen:
            raise UsageError(f"--lrs lists {v:g} twice")
        seen.add(v)
    return values


def lora_target_list(targets: str | Sequence[str]) -> str | list[str]:
    """`"all-linear"` stays as is (peft's shorthand); `"q_proj,v_proj"` -> a list."""
    if isinstance(targets, str):
        if targets.strip() == "all-linear":
            return "all-linear"
        return [t.strip() for t in targets.split(",") if t.strip()]
    return [str(t) for t in targets]


def metric_direction(metric: str) -> str:
    """"max" for accuracy-like metrics (`accuracy`, `accuracy_norm`), "min" for loss-like ones
    (`loss`, `ppl`); `UsageError` otherwise."""
    key = metric.rsplit(".", 1)[-1]
    if key in MAXIMISED:
        return "max"
    if key in MINIMISED:
        return "min"
    raise UsageError(f"--forget-metric {metric!r}: the attacker recovers an accuracy "
                     f"({', '.join(MAXIMISED)}) or a loss ({', '.join(MINIMISED)})")


def attackable_metrics(names: Sequence[str]) -> list[str]:
    """The names among `names` that can be a forget metric (accuracy- or loss-like)."""
    return [n for n in names if n.rsplit(".", 1)[-1] in MAXIMISED + MINIMISED]


def resolve_forget_metric(metric: str | None, available: Sequence[str]) -> str:
    """Check `metric` against the metrics the eval sets give (before any work).

    None picks `forget.accuracy`, else `forget.loss`, when a set named `forget` gives them.
    `UsageError` naming the available metrics otherwise.
    """
    choices = attackable_metrics(available)
    shown = ", ".join(choices) or "none"
    if metric is None:
        for guess in ("forget.accuracy", "forget.accuracy_norm", "forget.loss"):
            if guess in choices:
                return guess
        raise UsageError(f"give --forget-metric SET.METRIC (available: {shown})")
    if metric not in choices:
        extra = ""
        set_name = metric.rsplit(".", 1)[0]
        own = [a.rsplit(".", 1)[-1] for a in choices if a.rsplit(".", 1)[0] == set_name]
        if metric in available:
            extra = " (a count, not a performance metric)"
        elif own:
            extra = (f" (set {set_name!r} gives {', '.join(own)}: text sets have no accuracy, "
                     "multiple-choice sets no loss)")
        raise UsageError(f"--forget-metric {metric!r} is not a metric of the eval sets{extra}; "
                         f"available: {shown}")
    metric_direction(metric)
    return metric


# ----------------------------------------------------------------------------- the worst case


def _finite(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _group_key(run: dict[str, Any]) -> tuple[Any, bool]:
    return run.get("lr"), bool(run.get("quantize"))


def _better(a: float, b: float, direction: str) -> bool:
    return a > b if direction == "max" else a < b


def group_values(runs: Sequence[dict[str, Any]], metric: str
                 ) -> dict[int, dict[tuple[Any, bool], list[float]]]:
    """step -> (lr, quantized) -> the finite values of `metric` of that group's seeds."""
    table: dict[int, dict[tuple[Any, bool], list[float]]] = {}
    for run in runs:
        key = _group_key(run)
        for entry in run.get("curve", []):
            value = entry.get(metric)
            if _finite(value):
                table.setdefault(int(entry["step"]), {}).setdefault(key, []).append(float(value))
    return table


def worst_case_curve(runs: Sequence[dict[str, Any]], metric: str,
                     direction: str) -> list[dict[str, Any]]:
    """The defender's worst case at each step (module doc): the best over groups (learning
    rate, quantised or not) of the seed-mean of `metric`; ties go to the group met first."""
    quantizing = any(run.get("quantize") for run in runs)
    out = []
    for step, groups in sorted(group_values(runs, metric).items()):
        best_key, best = None, None
        for key, values in groups.items():
            mean = sum(values) / len(values)
            if best is None or _better(mean, best, direction):
                best_key, best = key, mean
        entry: dict[str, Any] = {"step": step, "value": best, "lr": best_key[0]}
        if step == 0 and not best_key[1]:
            entry["lr"] = None  # the unattacked model, shared by every run
        if quantizing:
            entry["quantized"] = best_key[1]
        out.append(entry)
    return out


def group_means(runs: Sequence[dict[str, Any]], step: int,
                key: tuple[Any, bool]) -> dict[str, float]:
    """Seed-mean of every metric of group `key` at `step` (finite values only)."""
    sums: dict[str, list[float]] = {}
    for run in runs:
        if _group_key(run) != key:
            continue
        for entry in run.get("curve", []):
            if entry.get("step") != step:
                continue
            for name, value in entry.items():
                if name != "step" and _finite(value):
                    sums.setdefault(name, []).append(float(value))
    return {name: sum(v) / len(v) for name, v in sums.items()}


def area_under_curve(points: Sequence[tuple[float, float]]) -> float | None:
    """Trapezoid area under `(step, value)` points divided by their step span (the mean
    value); a single point gives its value, no point None."""
    if not points:
        return None
    if len(points) == 1 or points[-1][0] == points[0][0]:
        return float(points[-1][1])
    area = sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(points, points[1:]))
    return area / (points[-1][0] - points[0][0])


def point_metrics(runs: Sequence[dict[str, Any]], initial: dict[str, Any],
                  entry: dict[str, Any]) -> dict[str, float]:
    """Every metric at a worst-case point: the seed means of the group (learning rate,
    quantised) that gives it; at step 0 of the unattacked model, the initial metrics."""
    if entry["step"] == 0 and not entry.get("quantized"):
        return {k: v for k, v in initial.items() if _finite(v)}
    return group_means(runs, entry["step"], (entry["lr"], bool(entry.get("quantized"))))


def summarize(runs: Sequence[dict[str, Any]], worst: Sequence[dict[str, Any]], metric: str,
              direction: str, initial: dict[str, Any],
              threshold: float | None = None) -> dict[str, Any]:
    """The `summary` entry of results.json (module doc)."""
    forget_set = metric.rsplit(".", 1)[0]
    final = worst[-1] if worst else None
    to_threshold, retain = None, None
    if threshold is not None:
        for entry in worst:
            v = entry["value"]
            if v >= threshold if direction == "max" else v <= threshold:
                to_threshold = entry["step"]
                retain = {k: v for k, v in point_metrics(runs, initial, entry).items()
                          if k.rsplit(".", 1)[0] != forget_set
                          and k.rsplit(".", 1)[-1] not in _COUNTS}
                break
    return {
        "initial": initial.get(metric),
        "final": final["value"] if final else None,
        "final_step": final["step"] if final else None,
        "auc": area_under_curve([(e["step"], e["value"]) for e in worst]),
        "threshold": threshold,
        "steps_to_threshold": to_threshold,
        "retain_at_threshold": retain,
        "best_lr": final["lr"] if final else None,
    }


def per_lr_table(runs: Sequence[dict[str, Any]], metric: str,
                 direction: str) -> list[dict[str, Any]]:
    """Per group (learning rate, quantised): runs, diverged runs, the seed-mean forget metric
    at its last step and the best seed-mean over steps."""
    table = group_values(runs, metric)
    keys: list[tuple[Any, bool]] = []
    for run in runs:
        if _group_key(run) not in keys:
            keys.append(_group_key(run))
    out = []
    for key in keys:
        members = [r for r in runs if _group_key(r) == key]
        means = [(step, sum(g[key]) / len(g[key])) for step, g in sorted(table.items())
                 if key in g]
        best = None
        for _, v in means:
            if best is None or _better(v, best, direction):
                best = v
        out.append({"lr": key[0], "quantized": key[1], "runs": len(members),
                    "diverged_runs": sum(bool(r.get("diverged")) for r in members),
                    "final": means[-1][1] if means else None,
                    "final_step": means[-1][0] if means else None, "best": best})
    return out


def final_metrics(results: dict[str, Any]) -> dict[str, float]:
    """Every metric at the end of the worst case (`point_metrics` of its last point)."""
    worst = results.get("worst_case") or []
    if not worst:
        return {}
    return point_metrics(results["runs"], results["initial"], worst[-1])


# ----------------------------------------------------------------------------- gates


def gate_names(metrics: Sequence[str], threshold: float | None) -> list[str]:
    """The names a `--fail-if` expression may use (module doc), known before any work."""
    names = [f"{prefix}.{m}" for prefix in ("worst", "initial") for m in metrics]
    names += list(_SUMMARY_GATE_NAMES)
    if threshold is not None:
        names.append("steps_to_threshold")
    return names


def gate_values(results: dict[str, Any]) -> dict[str, float]:
    """The values `--fail-if` expressions are evaluated on (module doc)."""
    values: dict[str, float] = {}
    for name, value in final_metrics(results).items():
        values[f"worst.{name}"] = value
    for name, value in results["initial"].items():
        if _finite(value):
            values[f"initial.{name}"] = value
    summary = results["summary"]
    for name in _SUMMARY_GATE_NAMES:
        if _finite(summary.get(name)):
            values[name] = summary[name]
    if summary.get("threshold") is not None:
        steps = summary.get("steps_to_threshold")
        values["steps_to_threshold"] = math.inf if steps is None else steps
    return values


# `parse_gates`, `evaluate_gates` and `raise_failed_gates` are `undo_cli.gates`'s (imported
# above), shared with `undo eval --fail-if`.


# ----------------------------------------------------------------------------- the attack


class AttackProgress:
    """Callbacks of `run_attack` (no-ops here; the CLI shows a progress line)."""

    def start(self, total_runs: int, steps: int) -> None:
        """Before the first run."""

    def run_started(self, index: int, lr: float | None, seed: int | None,
                    quantize: bool = False) -> None:
        """Run `index` (1-based) begins."""

    def step(self, step: int) -> None:
        """The current run finished optimizer step `step`."""

    def run_finished(self, run: dict[str, Any], metric: str) -> None:
        """Run finished; `run` is its results entry."""

    def message(self, text: str) -> None:
        """A note for the user (e.g. a diverged run)."""

    def close(self) -> None:
        """After the last run (also on failure)."""


ModelHook = Callable[[dict[str, Any], torch.nn.Module], None]


@dataclass
class _Clock:
    eval_s: float = 0.0
    evaluations: int = 0


def _params_finite(model: torch.nn.Module) -> bool:
    """Whether every weight is finite (one device sync)."""
    flags = [torch.isfinite(p).all() for p in model.parameters()]
    return bool(torch.stack(flags).all()) if flags else True


def _lora_rank(model: torch.nn.Module, rank: int, targets: str | list[str]) -> int:
    """`rank`, clipped to the narrowest dimension of the layers LoRA will wrap."""
    from undo_cli.quantize import quantizable_layers

    names = targets if isinstance(targets, list) else None
    widths = []
    for name, module, _ in quantizable_layers(model):
        if names is not None and name.rsplit(".", 1)[-1] not in names and name not in names:
            continue
        w = module.weight
        widths.append(min(int(w.shape[0]), int(w.shape[1])))
    return max(1, min([rank, *widths]))


def _attach_lora(model: torch.nn.Module, config: AttackConfig, rank: int) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    try:
        lora = LoraConfig(r=rank, lora_alpha=config.lora_alpha,
                          target_modules=lora_target_list(config.lora_targets),
                          lora_dropout=config.lora_dropout, bias="none", task_type="CAUSAL_LM")
        return get_peft_model(model, lora)
    except ValueError as e:
        raise UsageError(f"--lora-targets {config.lora_targets!r}: {e}") from e


def run_attack(model: torch.nn.Module, tokenizer, eval_sets: Sequence[Any],
               config: AttackConfig, *, forget_metric: str,
               streams: dict[int, Any] | None = None, threshold: float | None = None,
               progress: AttackProgress | None = None,
               on_model: ModelHook | None = None) -> dict[str, Any]:
    """Run the attack grid on `model` (kept unchanged) and return the results (module doc)
    without `checkpoint`, `fingerprint`, `eval` and `attack`, which the caller adds.

    `streams` maps each seed to its attack-data `BatchStream` (`undo_cli.data.build_stream`
    with that seed), reset to its start before each run. `on_model(run, model)` is called
    with every attacked model before it is dropped (a LoRA run's model is the peft model, its
    adapter unmerged); it must not change the model.
    """
    from undo_cli.evaluate import evaluate_model, flatten_metrics

    config.validate()
    if config.finetune and (not streams or any(s not in streams for s in config.seeds)):
        raise UsageError("no attack data stream for every seed")
    direction = metric_direction(forget_metric)
    progress = progress or AttackProgress()
    clock = _Clock()
    started = time.perf_counter()

    def measure(m: torch.nn.Module) -> dict[str, float]:
        t0 = time.perf_counter()
        try:
            return flatten_metrics(evaluate_model(
                m, tokenizer, eval_sets, batch_size=config.eval_batch_size,
                max_new_tokens=config.max_new_tokens))
        finally:
            clock.eval_s += time.perf_counter() - t0
            clock.evaluations += 1

    was_training = model.training
    model.eval()
    initial = measure(model)
    if forget_metric not in initial:
        raise UsageError(f"--forget-metric {forget_metric!r} is not among the measured "
                         f"metrics: {', '.join(attackable_metrics(list(initial))) or 'none'}")

    runs: list[dict[str, Any]] = []
    grid = [(lr, seed) for lr in config.lrs for seed in config.seeds] if config.finetune else []
    quant_runs = len(grid) if config.quantize is not None else 0
    total = len(grid) + quant_runs + (1 if not config.finetune else 0)
    lora_rank = (_lora_rank(model, config.lora_rank, lora_target_list(config.lora_targets))
                 if config.finetune and config.mode == "lora" else None)
    progress.start(total, config.steps if config.finetune else 0)
    index = 0
    tokens, flops = 0, 0.0
    try:
        for lr, seed in grid:
            index += 1
            progress.run_started(index, lr, seed)
            run, attacked = _finetune_run(model, lr, seed, config, streams[seed], measure,
                                          initial, lora_rank, progress)
            tokens += run["tokens"]
            flops += run["flops"]
            runs.append(run)
            progress.run_finished(run, forget_metric)
            if run["diverged"]:
                progress.message(f"warning: the run at lr {lr:g} (seed {seed}) diverged at step "
                                 f"{run['diverged_step']}; its later steps do not count")
            if on_model is not None:
                on_model(run, attacked)
            if config.quantize is not None:
                index += 1
                progress.run_started(index, lr, seed, quantize=True)
                qrun, attacked = _quantized_run(attacked, run, config, measure)
                runs.append(qrun)
                progress.run_finished(qrun, forget_metric)
                if on_model is not None and not qrun["diverged"]:
                    on_model(qrun, attacked)
            del attacked
        if not config.finetune:
            index += 1
            progress.run_started(index, None, None, quantize=True)
            base = {"lr": None, "seed": None, "diverged": False, "steps": 0}
            qrun, attacked = _quantized_run(copy.deepcopy(model), base, config, measure)
            runs.append(qrun)
            progress.run_finished(qrun, forget_metric)
            if on_model is not None:
                on_model(qrun, attacked)
            del attacked
    finally:
        progress.close()
        model.train(was_training)

    worst = worst_case_curve(runs, forget_metric, direction)
    wall = time.perf_counter() - started
    return jsonable({
        "schema_version": SCHEMA_VERSION,
        "forget_metric": forget_metric,
        "direction": direction,
        "initial": initial,
        "runs": runs,
        "worst_case": worst,
        "summary": summarize(runs, worst, forget_metric, direction, initial, threshold),
        "per_lr": per_lr_table(runs, forget_metric, direction),
        "timing": {"wall_s": wall, "eval_s": clock.eval_s,
                   "eval_share": clock.eval_s / wall if wall > 0 else None,
                   "evaluations": clock.evaluations},
        "compute": {"tokens": tokens, "flops": flops},
        "lora_rank": lora_rank,
    })


def _finetune_run(original: torch.nn.Module, lr: float, seed: int, config: AttackConfig,
                  stream: Any, measure: Callable[[torch.nn.Module], dict[str, float]],
                  initial: dict[str, float], lora_rank: int | None,
                  progress: AttackProgress) -> tuple[dict[str, Any], torch.nn.Module]:
    """One finetuning run on a fresh copy of `original`: (its results entry, the model)."""
    from undo_cli.engine import lm_loss, train

    t0 = time.perf_counter()
    eval_time = 0.0
    model = copy.deepcopy(original)
    if config.mode == "lora":
        from undo_cli.runtime import seed_everything

        seed_everything(seed)  # the adapter's random init: from the run's seed alone
        model = _attach_lora(model, config, lora_rank)
    else:
        model.requires_grad_(True)
    stream.load_state_dict({"position": 0})
    schedule = set(range(config.eval_every, config.steps + 1, config.eval_every))
    schedule.add(config.steps)
    recorded: dict[int, dict[str, float]] = {}
    broken: list[int] = []
    calls = [0]
    accum = config.train.grad_accum
    base_loss = lm_loss("attack")

    def loss_fn(m, batches):
        calls[0] += 1
        if calls[0] % accum == 0:
            progress.step(calls[0] // accum)
        return base_loss(m, batches)

    def evaluate(m, step: int) -> dict[str, float]:
        nonlocal eval_time
        if step in recorded:  # the engine's re-evaluation after a divergence
            return recorded[step]
        if step not in schedule:
            return {}
        if not _params_finite(m):
            broken.append(step)
            recorded[step] = {}
            return {}
        t = time.perf_counter()
        metrics = measure(m)
        eval_time += time.perf_counter() - t
        recorded[step] = metrics
        return metrics

    result = train(model, loss_fn, {"attack": stream}, config.run_config(lr, seed),
                   evaluate=evaluate)
    diverged_step = result.diverged_step
    if broken:
        diverged_step = min(broken[0], diverged_step or broken[0])
    curve = [{"step": 0, **initial}]
    for step in sorted(recorded):
        if diverged_step is not None and step >= diverged_step:
            continue
        if recorded[step]:
            curve.append({"step": step, **recorded[step]})
    run = {
        "lr": lr, "seed": seed, "quantize": None, "curve": curve,
        "diverged": diverged_step is not None, "diverged_step": diverged_step,
        "steps": result.steps, "tokens": result.tokens, "flops": result.flops["total"],
        "trainable_parameters": result.trainable_parameters,
        "train_loss": result.loss.get("loss"),
        "wall_time_s": time.perf_counter() - t0, "eval_time_s": eval_time,
    }
    return run, result.model


def _quantized_run(model: torch.nn.Module, source: dict[str, Any], config: AttackConfig,
                   measure: Callable[[torch.nn.Module], dict[str, float]]
                   ) -> tuple[dict[str, Any], torch.nn.Module]:
    """Quantise `model` in place (a LoRA model is merged first) and evaluate it at the step
    its source run ended; a diverged source run is not quantised."""
    from undo_cli.quantize import quantize_model

    t0 = time.perf_counter()
    settings = {"bits": config.quantize, "group_size": config.group_size}
    run = {"lr": source["lr"], "seed": source["seed"], "quantize": settings, "curve": [],
           "diverged": bool(source["diverged"]), "diverged_step": source.get("diverged_step"),
           "steps": source["steps"], "tokens": 0, "flops": 0.0, "trainable_parameters": 0,
           "train_loss": None, "wall_time_s": 0.0, "eval_time_s": 0.0}
    if source["diverged"]:
        return run, model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    settings.update(quantize_model(model, config.quantize, config.group_size))
    t = time.perf_counter()
    metrics = measure(model)
    run["eval_time_s"] = time.perf_counter() - t
    run["curve"] = [{"step": source["steps"], **metrics}]
    run["wall_time_s"] = time.perf_counter() - t0
    return run, model


# ----------------------------------------------------------------------------- checkpoints


def relearn_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    *,
    data: Sequence[str],
    evals: Sequence[tuple[str, str]],
    config: AttackConfig,
    forget_metric: str | None = None,
    threshold: float | None = None,
    max_length: int = 256,
    eval_limit: int | None = None,
    save_models: bool = False,
    fail_if: Sequence[str] = (),
    raise_on_gate: bool = True,
    plot: bool = True,
    overwrite: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    arguments: dict[str, Any] | None = None,
    progress: AttackProgress | None = None,
    note: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Attack checkpoint `checkpoint` and write `out/results.json`, `out/undo.json` and (with
    matplotlib) `out/relearn.png`, atomically; returns the results.

    Everything is validated before the model is loaded: the settings, the output path, the
    data and eval files, the forget metric (against the metrics the eval sets produce) and
    the `fail_if` expressions. With `save_models`, every attacked model is written to
    `out/models/lr<LR>-seed<SEED>[-q<BITS>]` (a LoRA run as an adapter directory on top of
    `checkpoint`). A `fail_if` gate that holds raises `GateFailed` (exit 3) after writing
    (with `raise_on_gate`; else see `results["gates"]` and `raise_failed_gates`).
    """
    from undo_cli.checkpoint import (
        atomic_output,
        build_manifest,
        check_output_path,
        fingerprint,
        inspect_checkpoint,
        load_model,
        load_tokenizer,
    )
    from undo_cli.engine import (
        fsdp_requested,
        is_main_process,
        training_device,
        wait_for_everyone,
        world_size,
    )
    from undo_cli.evaluate import load_eval_set

    started = time.time()
    note = note or (lambda text: None)
    if fsdp_requested():
        raise UsageError("relearn-attack runs data-parallel (DDP) only, not under FSDP: launch "
                         "it with examples/accelerate/ddp.yaml")
    config.finetune = bool(data)
    config.validate()
    if not evals:
        raise UsageError("nothing to measure: give --eval NAME=PATH (e.g. the forget and "
                         "retain eval sets)")
    names = [name for name, _ in evals]
    if len(set(names)) != len(names):
        raise UsageError(f"--eval names must be unique (got {names})")
    if threshold is not None and not math.isfinite(threshold):
        raise UsageError(f"--threshold must be a number (got {threshold})")
    gates = parse_gates(fail_if)
    check_output_path(out, inputs=[checkpoint], overwrite=overwrite)
    info = inspect_checkpoint(checkpoint, allow_pickle=allow_pickle)
    limit = info.config.get("max_position_embeddings") or info.config.get("n_positions")
    if config.finetune and isinstance(limit, int) and max_length > limit:
        raise UsageError(f"--max-length {max_length} exceeds the model's maximum length {limit}")

    tokenizer = load_tokenizer(checkpoint, trust_remote_code=trust_remote_code)
    sets = [load_eval_set(name, path, tokenizer, limit=eval_limit, seed=config.train.seed)
            for name, path in evals]
    available = expected_metrics(sets)
    forget_metric = resolve_forget_metric(forget_metric, available)
    for expr in gates:
        expr.check_names(gate_names(available, threshold))
    streams: dict[int, Any] = {}
    if config.finetune:
        from undo_cli.data import build_stream

        for seed in config.seeds:
            streams[seed] = build_stream(tokenizer, list(data), max_length,
                                         config.train.batch_size, seed, name="attack")
    if plot:
        from undo_cli.plots import matplotlib_available

        if not matplotlib_available():
            note("note: matplotlib is not installed, so no relearn.png is drawn "
                 "(pip install 'undo-cli[plot]'); results.json is written as usual")
            plot = False

    model = load_model(checkpoint, device=training_device(config.train),
                       allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    digest = fingerprint(checkpoint)
    # Under a multi-process launch every process trains on its share of each run's batches
    # and evaluates its share of the requests (all get every metric); only the main one writes.
    main = is_main_process()
    output = atomic_output(out, inputs=[checkpoint], overwrite=overwrite) if main else None
    with output or contextlib.nullcontext() as tmp:
        saver = None
        if save_models and main:
            saver = _model_saver(Path(tmp) / MODELS_DIR, tokenizer, checkpoint)
        core = run_attack(model, tokenizer, sets, config, forget_metric=forget_metric,
                          streams=streams, threshold=threshold, progress=progress,
                          on_model=saver)
        lora_rank = core.pop("lora_rank")
        results = {
            "schema_version": SCHEMA_VERSION,
            "checkpoint": str(checkpoint),
            "fingerprint": digest,
            "forget_metric": forget_metric,
            "direction": core["direction"],
            "eval": {name: str(path) for name, path in evals},
            "attack": config.describe(data, max_length, lora_rank),
            **{k: v for k, v in core.items()
               if k not in ("schema_version", "forget_metric", "direction")},
        }
        if gates:
            results["gates"] = jsonable(evaluate_gates(gates, gate_values(results)))
        if main:
            _write_outputs(Path(tmp), results, plot=plot, manifest=build_manifest(
                STAGE, arguments=arguments or {"checkpoint": checkpoint, "data": list(data),
                                               "eval": [list(e) for e in evals],
                                               "attack": results["attack"]},
                parents={"input": checkpoint}, seed=config.train.seed,
                wall_time_s=time.time() - started,
                compute={**results["compute"], "runs": len(results["runs"]),
                         "processes": world_size()},
                metrics={"forget_metric": forget_metric, **results["summary"],
                         "worst": final_metrics(results)},
                extra={"relearn": {"results": RESULTS_NAME, "timing": results["timing"]}}))
    wait_for_everyone()
    if gates and raise_on_gate:
        raise_failed_gates(results["gates"])
    return results


def _model_saver(root: Path, tokenizer, checkpoint: str | Path) -> ModelHook:
    """An `on_model` hook writing each attacked model under `root`."""
    from undo_cli.checkpoint import save_model

    def save(run: dict[str, Any], model: torch.nn.Module) -> None:
        name = f"lr{run['lr']:g}-seed{run['seed']}" if run["lr"] is not None else "original"
        if run.get("quantize"):
            name += f"-q{run['quantize']['bits']}"
        target = root / name
        target.mkdir(parents=True, exist_ok=True)
        if hasattr(model, "peft_config"):  # a LoRA run: the adapter, on top of CKPT
            for cfg in model.peft_config.values():
                cfg.base_model_name_or_path = str(Path(checkpoint).resolve())
            model.save_pretrained(target)
            tokenizer.save_pretrained(target)
        else:
            save_model(model, tokenizer, target, source=checkpoint)
        run["saved_as"] = str(Path(MODELS_DIR) / name)

    return save


def _write_outputs(directory: Path, results: dict[str, Any], *, plot: bool,
                   manifest: dict[str, Any]) -> None:
    """results.json, relearn.png (with `plot`) and undo.json into `directory`."""
    from undo_cli.checkpoint import write_manifest

    (directory / RESULTS_NAME).write_text(to_json(results, indent=2) + "\n")
    if plot:
        from undo_cli.plots import plot_attack

        plot_attack(results, directory / PLOT_NAME)
    write_manifest(directory, manifest)


# ----------------------------------------------------------------------------- comparing


REQUIRED_KEYS = ("checkpoint", "fingerprint", "forget_metric", "direction", "attack",
                 "initial", "runs", "worst_case", "summary")


def load_results(path: str | Path) -> dict[str, Any]:
    """Read `path/results.json` (or a results.json file); `UsageError` if it is missing or
    not an attack's results."""
    import json

    path = Path(path)
    file = path / RESULTS_NAME if path.is_dir() else path
    if not file.is_file():
        raise UsageError(f"{path}: no {RESULTS_NAME} (not a relearn-attack results directory)")
    try:
        results = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"{file}: not readable JSON ({e})") from e
    missing = [k for k in REQUIRED_KEYS if not isinstance(results, dict) or k not in results]
    if missing:
        raise UsageError(f"{file}: not relearn-attack results (missing {', '.join(missing)})")
    return results


def parse_compare_spec(spec: str) -> tuple[str | None, Path]:
    """`LABEL=DIR` or `DIR` -> (label or None, DIR)."""
    if "=" in spec and not Path(spec).exists():
        label, _, path = spec.partition("=")
        if label.strip() and path.strip():
            return label.strip(), Path(path.strip())
    return None, Path(spec)


def compare_results(specs: Sequence[str], out: str | Path, *, overwrite: bool = False,
                    arguments: dict[str, Any] | None = None) -> dict[str, Any]:
    """Plot the worst-case curves of several attack results into `out/compare.png` (plus
    `out/compare.json` and `out/undo.json`); returns what compare.json holds.

    All results must use the same forget metric. `UsageError` without matplotlib.
    """
    from undo_cli.checkpoint import atomic_output, build_manifest, write_manifest
    from undo_cli.plots import plot_compare, require_matplotlib

    started = time.time()
    if not specs:
        raise UsageError("--compare needs at least one results directory")
    require_matplotlib()
    parsed = [parse_compare_spec(s) for s in specs]
    loaded = [load_results(path) for _, path in parsed]
    metrics = sorted({r["forget_metric"] for r in loaded})
    if len(metrics) > 1:
        raise UsageError(f"--compare: the results measure different forget metrics "
                         f"({', '.join(metrics)}); compare results of the same metric")
    labels = [label or default_label(r, path) for (label, path), r in zip(parsed, loaded)]
    if len(set(labels)) != len(labels):
        raise UsageError(f"--compare: labels must differ (got {labels}); name them with "
                         "--compare LABEL=DIR")
    inputs = [path for _, path in parsed]
    summary = {
        "forget_metric": metrics[0],
        "direction": loaded[0]["direction"],
        "inputs": [{"label": label, "results": str(path), "checkpoint": r["checkpoint"],
                    "fingerprint": r["fingerprint"], "attack": r["attack"],
                    "summary": r["summary"], "worst_case": r["worst_case"]}
                   for label, path, r in zip(labels, inputs, loaded)],
    }
    with atomic_output(out, inputs=inputs, overwrite=overwrite) as tmp:
        plot_compare(loaded, labels, Path(tmp) / COMPARE_PLOT_NAME)
        (Path(tmp) / COMPARE_NAME).write_text(to_json(summary, indent=2) + "\n")
        write_manifest(tmp, build_manifest(
            "relearn-compare", arguments=arguments or {"compare": list(specs)},
            wall_time_s=time.time() - started,
            metrics={label: r["summary"] for label, r in zip(labels, loaded)},
            extra={"inputs": [str(p) for p in inputs]}))
    return summary


def default_label(results: dict[str, Any], path: Path) -> str:
    """The legend label of a results directory: its checkpoint's directory name."""
    ckpt = results.get("checkpoint")
    return Path(ckpt).name if ckpt else Path(path).name


__all__ = [
    "PAPER_LRS", "AttackConfig", "AttackProgress", "area_under_curve", "compare_results",
    "evaluate_gates", "expected_metrics", "final_metrics", "gate_names", "gate_values",
    "load_results", "metric_direction", "parse_gates", "parse_lrs", "per_lr_table",
    "relearn_checkpoint", "resolve_forget_metric", "run_attack", "summarize",
    "worst_case_curve",
]
