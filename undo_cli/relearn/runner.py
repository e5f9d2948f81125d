"""Running a relearning attack on a model in memory: every run of the grid (learning rate x
seed) finetunes a fresh copy of the same original weights on the attack data (full-parameter
AdamW, or a peft LoRA adapter), evaluated at the steps of `AttackConfig.eval_steps` (every
`eval_every` steps, the gap doubling as the step doubles beyond 20 evaluations under the
default `eval_schedule` "log"); quantisation (RTN) runs on top. The statistics of the worst
case are `worst_case.py`'s; writing them is `results.py`'s.

- Every run starts from the same in-memory original weights (a `copy.deepcopy` of the model
  loaded once): nothing is reloaded and nothing leaks from one run into the next. The step-0
  evaluation is the same for every run, so it is computed once (`initial`) and shared.
- Divergence: runs train with the engine's `keep_last_finite` (so a NaN/inf at a high
  learning rate ends that run, not the grid). A diverged run stays in the results with
  `"diverged": true`, `"diverged_step"` and only the evaluations from before it diverged. An
  evaluation of non-finite weights counts as divergence at that step.
- LoRA: a peft adapter on the copy (base weights frozen), by default rank 128 and alpha 256 on
  every attention and MLP projection (`all-linear`, not the output head); on a model narrower
  than the rank, the rank is clipped to the narrowest wrapped layer.
- Quantisation (`quantize` 8 or 4, `undo_cli.quantize`): without attack data the original
  model is quantised and evaluated; with attack data each finetuning run's final model is also
  quantised and evaluated, as a run of its own at the final step.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch

from undo_cli.engine import lm_loss, train
from undo_cli.engine.processes import all_finite
from undo_cli.errors import UsageError
from undo_cli.jsontext import jsonable
from undo_cli.options import AttackConfig, EvalOptions, RunSpec
from undo_cli.quantize import quantizable_layers, quantize_model_with, scheme_bits
from undo_cli.relearn.bands import Evaluation, item_values, point_items, worst_case_band
from undo_cli.relearn.families import FamilyContext, families_for, planned_runs
from undo_cli.relearn.search import search_runs
from undo_cli.relearn.worst_case import (
    apply_retain_rule,
    attackable_metrics,
    config_key,
    metric_direction,
    per_config_table,
    summarize,
    worst_case_curve,
)
from undo_cli.runtime import seed_everything
from undo_cli.stage import Measure

SCHEMA_VERSION = 1


class AttackProgress:
    """Callbacks of `run_attack` (no-ops here; the CLI shows a progress line)."""

    def start(self, total_runs: int, steps: int) -> None:
        """Before the first run."""

    def run_started(self, index: int, lr: float | None, seed: int | None,
                    config: str = "") -> None:
        """Run `index` (1-based) begins (`config`: its configuration's name)."""

    def step(self, step: int) -> None:
        """The current run finished optimizer step `step`."""

    def run_finished(self, run: dict[str, Any], metric: str) -> None:
        """Run finished; `run` is its results entry."""

    def message(self, text: str) -> None:
        """A note for the user (e.g. a diverged run)."""

    def log(self, entry: dict[str, Any]) -> None:
        """A training-log entry of the current run (`engine.train`'s `on_log`)."""

    def close(self) -> None:
        """After the last run (also on failure)."""


ModelHook = Callable[[dict[str, Any], torch.nn.Module], None]


def lora_rank_for(model: torch.nn.Module, rank: int, targets: str | list[str]) -> int:
    """`rank`, clipped to the narrowest dimension of the layers LoRA will wrap (`model` may be
    on the meta device: only shapes are read)."""

    names = targets if isinstance(targets, list) else None
    widths = []
    for name, module, _ in quantizable_layers(model):
        if names is not None and name.rsplit(".", 1)[-1] not in names and name not in names:
            continue
        w = module.weight
        widths.append(min(int(w.shape[0]), int(w.shape[1])))
    return max(1, min([rank, *widths]))


def _attach_lora(model: torch.nn.Module, config: AttackConfig, rank: int) -> torch.nn.Module:
    # peft only here: importing it prints a kernels notice, and only LoRA attacks need it.
    from peft import LoraConfig, get_peft_model

    try:
        lora = LoraConfig(r=rank, lora_alpha=config.alpha_for(rank),
                          target_modules=config.lora_targets.modules,
                          lora_dropout=config.lora_dropout, bias="none", task_type="CAUSAL_LM")
        return get_peft_model(model, lora)
    except ValueError as e:
        raise UsageError(f"--lora-targets {config.lora_targets!r}: {e}") from e


StaticAttack = Callable[[torch.nn.Module, Callable[[torch.nn.Module], dict[str, float]]],
                        list[tuple[dict[str, Any], "torch.nn.Module | None"]]]


def run_attack(model: torch.nn.Module, tokenizer, eval_sets: Sequence[Any],
               config: AttackConfig, *, forget_metric: str,
               make_stream: Callable[[int, int], Any] | None = None,
               threshold: float | None = None, evals: EvalOptions = EvalOptions(),
               progress: AttackProgress | None = None, on_model: ModelHook | None = None,
               static_attacks: Sequence[StaticAttack] = (),
               retain_rule: tuple[str, float] | None = None,
               study_name: str = "undo-relearn-attack",
               log_samples: bool = False,
               benign_stream: Callable[[int, int], Any] | None = None,
               lora_rank: int | None = None) -> dict[str, Any]:
    """Run the attack on `model` (kept unchanged) and return the results
    (docs/relearn-results.md) without `checkpoint`, `fingerprint`, `eval` and `attack`, which
    the caller adds. `eval_sets` are measured with `evals`' batch size and generation length.

    Finetuning runs: every `RunSpec` of `config.grid()` (or, with `config.search`, the runs an
    Optuna study picks, `undo_cli.relearn.search`), each on `make_stream(seed, batch_size)`
    (a `BatchStream` of the attack data, reset to its start before each run). `static_attacks`
    (prompting, directional ablation: `undo_cli.relearn.static`) each return their runs.
    `retain_rule = (retain_metric, max_drop)` excludes the evaluations where the attacked model
    lost more than `max_drop` of its retain metric. `on_model(run, model)` sees every attacked
    model before it is dropped (a LoRA run's model is the peft model, its adapter unmerged); it
    must not change the model. With `log_samples` the result holds `_samples`: one record per
    evaluated item of the unattacked model and of each finetuning run's last evaluation (its
    configuration, seed, step and set; `--log-samples`). The families of
    `undo_cli.relearn.families` that `config` asks for (pruning, QLoRA, finetuning on
    `benign_stream`'s data, the soft prompt) run last, each as runs of their own.
    `lora_rank` is the rank every LoRA run uses (`plan_attack` clips `config.lora_rank` on the
    meta model); None clips it here, on `model`.
    """

    config.validate()
    if (config.finetune or config.embedding_attack or (config.prune or ("",))[0] == "wanda"
            or config.qlora) and make_stream is None:
        raise UsageError("no attack data stream")
    if config.benign_data and benign_stream is None:
        raise UsageError("no benign data stream")
    started = time.perf_counter()
    measure = Measure(tokenizer, eval_sets, evals, log_samples=log_samples)
    was_training = model.training
    model.eval()
    attack = _Attack(model, config, measure, progress or AttackProgress(), on_model,
                     forget_metric, make_stream)
    rank = lora_rank or lora_rank_for(model, config.lora_rank, config.lora_targets.modules)
    try:
        if config.finetune and config.search:
            attack.search(rank, study_name)
        elif config.finetune:
            attack.grid(rank if config.lora else None)
        elif config.quantize is not None:
            attack.quantized_original()
        elif planned := planned_runs(config, len(config.grid(1))):
            attack.progress.start(planned, config.steps)
        for static in static_attacks:
            attack.static(static)
        attack.families(rank, benign_stream, tokenizer, eval_sets)
    finally:
        attack.progress.close()
        model.train(was_training)
    return attack.results(started, threshold=threshold, retain_rule=retain_rule,
                          lora_rank=rank if config.finetune and config.lora else None)


class _Attack:
    """One attack in progress: the original model (never changed), its settings, the measure
    and the unattacked model's evaluation (step 0 of every run, measured once, here). Each
    method runs some of the attack's runs and records them in `runs`, in order."""

    def __init__(self, model: torch.nn.Module, config: AttackConfig, measure: Measure,
                 progress: AttackProgress, on_model: ModelHook | None, forget_metric: str,
                 make_stream: Callable[[int, int], Any] | None) -> None:
        self.model, self.config, self.measure, self.progress = model, config, measure, progress
        self.on_model, self.forget_metric, self.make_stream = on_model, forget_metric, make_stream
        self.direction = metric_direction(forget_metric)
        self.initial = measure(model)
        self.initial_items = measure.items
        self.initial_samples = (0, measure.samples)
        if forget_metric not in self.initial:
            known = ", ".join(attackable_metrics(list(self.initial))) or "none"
            raise UsageError(f"--forget-metric {forget_metric!r} is not among the measured "
                             f"metrics: {known}")
        self.runs: list[dict[str, Any]] = []
        self._streams: dict[tuple[int, int], Any] = {}

    def finetune(self, spec: RunSpec, stop=None) -> tuple[dict[str, Any], torch.nn.Module]:
        """A finetuning run of `spec` on the original model and the attack data (one stream
        per seed and batch size, reset to its start by each run)."""
        key = (spec.seed, spec.batch_size)
        if key not in self._streams:
            self._streams[key] = self.make_stream(spec.seed, spec.batch_size)
        return _finetune_run(self.model, spec, self.config, self._streams[key], self.measure,
                             self.initial, self.initial_items, self.progress, stop)

    def finetune_from(self, original: torch.nn.Module, spec: RunSpec, stream: Any,
                      start: dict[str, float] | None, start_items: dict[str, Any] | None,
                      *, measure: Any = None, **kw: Any) -> tuple[dict[str, Any], torch.nn.Module]:
        """A finetuning run of any model on any stream (the families'); `start` and
        `start_items` None: the original's step 0."""
        return _finetune_run(original, spec, self.config, stream,
                             self.measure if measure is None else measure,
                             self.initial if start is None else start,
                             self.initial_items if start_items is None else start_items,
                             self.progress, **kw)

    def search(self, rank: int, study_name: str) -> None:
        """The runs an Optuna study picks (`undo_cli.relearn.search`)."""
        config = self.config
        self.progress.start(config.search + planned_runs(config, 1), config.steps)
        for run, attacked in search_runs(self.model, config, self.finetune, self.forget_metric,
                                         self.direction, rank, self.progress, study_name):
            self._record(run, attacked)

    def grid(self, lora_rank: int | None) -> None:
        """Every run of the grid."""
        grid = self.config.grid(lora_rank)
        self.progress.start(len(grid) * (2 if self.config.quantize else 1)
                            + planned_runs(self.config, len(grid)), self.config.steps)
        for index, spec in enumerate(grid, 1):
            self.progress.run_started(index, spec.lr, spec.seed, spec.config_id)
            self._record(*self.finetune(spec))

    def quantized_original(self) -> None:
        """Without attack data: the original model, quantised."""
        self.progress.start(1 + planned_runs(self.config, len(self.config.grid(1))), 0)
        self.progress.run_started(1, None, None, "original, quantised")
        base = {"lr": None, "seed": None, "diverged": False, "steps": 0,
                "config": "original", "attack": "quantize", "static": True}
        self._add(*_quantized_run(copy.deepcopy(self.model), base, self.config, self.measure))

    def static(self, attack: StaticAttack) -> None:
        """The runs of an attack without training (`undo_cli.relearn.static`)."""
        for run, attacked in attack(self.model, self.measure):
            self._add(run, attacked)

    def families(self, rank: int, benign_stream: Any, tokenizer, eval_sets: Sequence[Any]) -> None:
        """The families `config` asks for (`undo_cli.relearn.families`), last."""
        families = families_for(self.config)
        if not families:
            return
        config = self.config
        grid = config.grid(rank if config.lora else None)
        if config.search:  # the families reuse the configuration the search found strongest
            grid = _best_specs(self.runs, config, self.forget_metric) or grid[:1]
        ctx = FamilyContext(model=self.model, config=config, measure=self.measure, grid=grid,
                            finetune=self.finetune_from, attack_stream=self.make_stream,
                            benign_stream=benign_stream, lora_rank=rank, tokenizer=tokenizer,
                            eval_sets=eval_sets, progress=self.progress)
        for family in families:
            for run, attacked in family(ctx):
                self.progress.run_started(len(self.runs) + 1, run.get("lr"), run.get("seed"),
                                          run["config"])
                self._record(run, attacked,
                             twin=run["attack"] in ("prune+finetune", "benign-finetune"))

    def _add(self, run: dict[str, Any], attacked: torch.nn.Module | None) -> None:
        self.runs.append(run)
        self.progress.run_finished(run, self.forget_metric)
        if self.on_model is not None and attacked is not None:
            self.on_model(run, attacked)

    def _record(self, run: dict[str, Any], attacked: torch.nn.Module | None,
                twin: bool = True) -> None:
        """A finetuning run (and its quantised twin with --quantize); `attacked` is None for
        a trial a resumed search ran before (its run is recorded, its model is gone)."""
        self.runs.append(run)
        self.progress.run_finished(run, self.forget_metric)
        if attacked is None:
            return
        if run["diverged"]:
            self.progress.message(f"warning: the run {run['config']} (seed {run['seed']}) "
                                  f"diverged at step {run['diverged_step']}; its later steps "
                                  "do not count")
        if self.on_model is not None:
            self.on_model(run, attacked)
        if self.config.quantize is not None and twin:
            qrun, attacked = _quantized_run(attacked, run, self.config, self.measure)
            self.runs.append(qrun)
            self.progress.run_finished(qrun, self.forget_metric)
            if self.on_model is not None and not qrun["diverged"]:
                self.on_model(qrun, attacked)

    def results(self, started: float, *, threshold: float | None,
                retain_rule: tuple[str, float] | None, lora_rank: int | None) -> dict[str, Any]:
        """`run_attack`'s results: the runs, the worst case with its band, the summary."""
        runs, metric, direction = self.runs, self.forget_metric, self.direction
        if retain_rule is not None:
            apply_retain_rule(runs, self.initial, *retain_rule)
        worst = worst_case_curve(runs, metric, direction)
        annotate_cost(worst, runs)
        band = _band(runs, worst, metric, direction, self.initial_items, self.config.train.seed)
        wall = time.perf_counter() - started
        table = per_config_table(runs, metric, direction)
        summary = summarize(runs, worst, metric, direction, self.initial, threshold)
        if band is not None:
            summary.update({"final_lower": band["final"][0], "final_upper": band["final"][1],
                            "auc_lower": band["auc"][0], "auc_upper": band["auc"][1],
                            "band": {k: band[k] for k in ("method", "samples", "level")}})
        for run in runs:
            run.pop("_items", None)
        logged = [] if not self.measure.log_samples else _sample_log(
            {"config": "initial", "seed": None}, self.initial_samples)
        for run in runs:
            if run.get("_samples") is not None:
                logged += _sample_log(run, run["_samples"])
            run.pop("_samples", None)
        measure = self.measure
        return jsonable({
            "schema_version": SCHEMA_VERSION,
            "forget_metric": metric,
            "direction": direction,
            "initial": self.initial,
            "runs": runs,
            "worst_case": worst,
            "summary": summary,
            "per_config": table,
            "per_lr": table,  # the same table under its earlier name
            "timing": {"wall_s": wall, "eval_s": measure.eval_s,
                       "eval_share": measure.eval_s / wall if wall > 0 else None,
                       "evaluations": measure.evaluations},
            "compute": {"tokens": sum(r.get("tokens", 0) for r in runs),
                        "flops": sum(r.get("flops", 0.0) for r in runs)},
            "lora_rank": lora_rank,
            **({"_samples": logged} if measure.log_samples else {}),
        })


def annotate_cost(worst: list[dict[str, Any]], runs: list[dict[str, Any]]) -> None:
    """Give every worst-case point the attacker's cost of the configuration it comes from at
    that step (`attacker_tokens`, `attacker_flops`: means over its seeds; 0 for the
    unattacked model and the static attacks)."""
    for point in worst:
        costs = []
        for run in runs:
            if config_key(run) != (point.get("config"), bool(point.get("quantized"))):
                continue
            for entry in run.get("cost") or []:
                if entry["step"] == point["step"] or run.get("static"):
                    costs.append(entry)
        n = len(costs)
        point["attacker_tokens"] = sum(c["tokens"] for c in costs) / n if n else 0
        point["attacker_flops"] = sum(c["flops"] for c in costs) / n if n else 0.0


def _best_specs(runs: list[dict[str, Any]], config: AttackConfig,
                forget_metric: str) -> list[RunSpec]:
    """The `RunSpec`s (every seed) of the finetuning run whose last evaluation is best for
    the attacker; empty without one."""
    sign = 1.0 if metric_direction(forget_metric) == "max" else -1.0
    done = [r for r in runs if r.get("attack") == "finetune" and not r.get("quantize")
            and r.get("curve") and r["curve"][-1].get(forget_metric) is not None]
    if not done:
        return []
    best = max(done, key=lambda r: sign * r["curve"][-1][forget_metric])
    return [RunSpec(lr=best["lr"], seed=seed, optimizer=best.get("optimizer", "adamw"),
                    schedule=best.get("schedule", "constant"),
                    batch_size=best.get("batch_size", config.train.batch_size),
                    lora_rank=best.get("lora_rank"), lora_alpha=best.get("lora_alpha"))
            for seed in config.seed_list()]


def _sample_log(run: dict[str, Any], samples: tuple[int, dict[str, list]]) -> list[dict]:
    """The `--log-samples` records of one evaluation: each item's record with the run's
    configuration, seed, step and set."""
    step, per_set = samples
    head = {"config": run.get("config"), "seed": run.get("seed"), "step": step}
    if run.get("quantize"):
        head["quantized"] = True
    return [{**head, "set": name, **record} for name, records in per_set.items()
            for record in records]


def _band(runs: list[dict[str, Any]], worst: list[dict[str, Any]], metric: str,
          direction: str, initial_items: dict[str, Any], seed: int) -> dict[str, Any] | None:
    """The worst case's bootstrap band (`undo_cli.relearn.bands`), written into its points
    (`lower`, `upper`, and the per-item values `undo report` resamples); None without
    per-item results (e.g. only trials of an earlier session of a resumed search)."""

    evaluations = []
    for run in runs:
        excluded = set(run.get("excluded_steps") or ())
        for entry in run.get("curve", []):
            values = item_values((run.get("_items") or {}).get(entry["step"], {}), metric)
            if values is not None and entry["step"] not in excluded:
                evaluations.append(Evaluation(config_key(run), run.get("seed"), entry["step"],
                                              *values, static=bool(run.get("static"))))
    band = worst_case_band(evaluations, metric, direction, seed=seed)
    if band is None:
        return None
    initial = item_values(initial_items, metric)
    for point in worst:
        j = band["steps"].index(point["step"]) if point["step"] in band["steps"] else None
        if j is not None:
            point["lower"], point["upper"] = band["lower"][j], band["upper"][j]
        if point.get("config") is None and initial is not None:
            point["items"] = {"num": initial[0].tolist(), "den": initial[1].tolist()}
        else:
            items = point_items(evaluations, (point["config"], bool(point.get("quantized"))),
                                point["step"])
            if items is not None:
                point["items"] = items
    return band


def _finetune_run(original: torch.nn.Module, spec: RunSpec, config: AttackConfig,
                  stream: Any, measure: Any, initial: dict[str, float],
                  initial_items: dict[str, Any], progress: AttackProgress,
                  stop: Callable[[int, dict[str, float]], bool] | None = None, *,
                  steps: int | None = None, frozen_ok: bool = False
                  ) -> tuple[dict[str, Any], torch.nn.Module]:
    """One finetuning run on a fresh copy of `original`: (its results entry, the model).
    `stop(step, metrics)` may end it early after an evaluation (a pruned search trial).
    `steps` replaces `config.steps`; with `frozen_ok` only the parameters `original` leaves
    trainable train (the soft prompt). The run's `cost` holds the attacker's tokens and
    FLOPs (the engine's accounting) at every evaluation."""

    t0 = time.perf_counter()
    eval_time = 0.0
    steps = steps or config.steps
    model = copy.deepcopy(original)
    if spec.lora_rank:
        seed_everything(spec.seed)  # the adapter's random init: from the run's seed alone
        model = _attach_lora(model, config, spec.lora_rank)
    elif not frozen_ok:
        model.requires_grad_(True)
    stream.load_state_dict({"position": 0})
    schedule = set(config.eval_steps(steps))  # the engine calls `evaluate` at a superset
    tokens_at: dict[int, int] = {0: 0}
    cost_steps: list[int] = []
    recorded: dict[int, dict[str, float]] = {}
    items: dict[int, dict[str, Any]] = {0: initial_items}
    broken: list[int] = []
    last_samples: list[tuple[int, dict]] = []

    def evaluate(m, step: int) -> dict[str, float]:
        nonlocal eval_time
        if step in recorded:  # the engine's re-evaluation after a divergence
            return recorded[step]
        if step not in schedule:
            return {}
        if not all_finite(list(m.parameters())):
            broken.append(step)
            recorded[step] = {}
            return {}
        t = time.perf_counter()
        metrics = measure(m)
        eval_time += time.perf_counter() - t
        recorded[step] = metrics
        cost_steps.append(step)
        items[step] = measure.items
        if measure.log_samples:
            last_samples[:] = [(step, measure.samples)]
        return metrics

    def should_stop(step: int, metrics: dict[str, float]) -> str | None:
        return "pruned" if stop is not None and metrics and stop(step, metrics) else None

    def on_step(step: int, total: int, tokens: int) -> None:
        tokens_at[step] = tokens
        progress.step(step)

    run_config = config.run_config(spec)
    if steps != config.steps:
        run_config = replace(run_config, max_steps=steps)
    result = train(model, lm_loss("attack"), {"attack": stream}, run_config,
                   evaluate=evaluate, should_stop=should_stop, on_step=on_step,
                   on_log=progress.log)
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
        **spec.describe(), "config": spec.config_id, "attack": "finetune", "quantize": None,
        "curve": curve, "diverged": diverged_step is not None, "diverged_step": diverged_step,
        "pruned": result.stop_reason == "pruned",
        "steps": result.steps, "tokens": result.tokens, "flops": result.flops["total"],
        "cost": attacker_cost(curve, tokens_at, result.tokens, result.flops["total"]),
        "trainable_parameters": result.trainable_parameters,
        "train_loss": result.loss.get("loss"),
        "wall_time_s": time.perf_counter() - t0, "eval_time_s": eval_time,
        "_items": items,  # per-item results for the band (not written)
        "_samples": last_samples[0] if last_samples else None,  # --log-samples (not written)
    }
    return run, result.model


def attacker_cost(curve: list[dict[str, Any]], tokens_at: dict[int, int], tokens: int,
                  flops: float) -> list[dict[str, Any]]:
    """The attacker's cost at each evaluation of a curve: the tokens trained on up to that
    step and their FLOPs at the run's FLOPs per token (the engine's accounting, constant
    within a run; `flops / tokens`)."""
    per_token = flops / tokens if tokens else 0.0
    out = []
    for entry in curve:
        t = tokens_at.get(entry["step"], tokens if entry["step"] else 0)
        out.append({"step": entry["step"], "tokens": int(t), "flops": per_token * t})
    return out


def _quantized_run(model: torch.nn.Module, source: dict[str, Any], config: AttackConfig,
                   measure: Callable[[torch.nn.Module], dict[str, float]]
                   ) -> tuple[dict[str, Any], torch.nn.Module]:
    """Quantise `model` in place (a LoRA model is merged first) and evaluate it at the step
    its source run ended; a diverged source run is not quantised."""

    t0 = time.perf_counter()
    settings = {"bits": scheme_bits(config.quantize), "group_size": config.group_size}
    run = {**{k: source[k] for k in ("lr", "seed", "optimizer", "schedule", "batch_size",
                                     "mode", "lora_rank", "config", "attack", "static")
              if k in source},
           "quantize": settings, "curve": [],
           "diverged": bool(source["diverged"]), "diverged_step": source.get("diverged_step"),
           "steps": source["steps"], "tokens": 0, "flops": 0.0, "trainable_parameters": 0,
           "train_loss": None, "wall_time_s": 0.0, "eval_time_s": 0.0,
           "cost": [{"step": source["steps"], "tokens": source.get("tokens", 0),
                     "flops": source.get("flops", 0.0)}]}
    if source["diverged"]:
        return run, model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    settings.update(quantize_model_with(model, config.quantize, config.group_size))
    t = time.perf_counter()
    metrics = measure(model)
    run["eval_time_s"] = time.perf_counter() - t
    run["curve"] = [{"step": source["steps"], **metrics}]
    run["_items"] = {source["steps"]: getattr(measure, "items", {})}
    if getattr(measure, "log_samples", False):
        run["_samples"] = (source["steps"], measure.samples)
    run["wall_time_s"] = time.perf_counter() - t0
    return run, model
