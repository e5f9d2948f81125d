"""`relearn_checkpoint`: the attack of `undo relearn-attack` on a checkpoint, written as a
results directory (`results.json`, `relearn.png`, `undo.json`; the schema of results.json is
docs/relearn-results.md), and `compare_results` (`--compare`: several results in one figure).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

import undo_cli.checkpoint as checkpoint_io  # looked up when called: tests replace them
import undo_cli.engine as engine
import undo_cli.plots as plots
from undo_cli import stage
from undo_cli.checkpoint import (
    Layout,
    atomic_output,
    build_manifest,
    fingerprint,
    save_layout,
    save_model,
    write_manifest,
)
from undo_cli.data import build_stream
from undo_cli.engine import (
    is_main_process,
    training_device,
    world_size,
)
from undo_cli.errors import UsageError
from undo_cli.evaluate import tokenize_eval_data
from undo_cli.gates import (
    attack_gate_values,
    check_gates,
    raise_failed_gates,
)
from undo_cli.jsontext import jsonable, to_json
from undo_cli.options import (
    AttackConfig,
    EvalOptions,
    NoiseOptions,
    SaveOptions,
)
from undo_cli.perturb import perturb_model_
from undo_cli.plots import plot_attack, plot_compare, require_matplotlib
from undo_cli.records import (
    EvalData,
    check_attack_results,
    parse_weighted_spec,
    read_json_file,
    read_records,
)
from undo_cli.relearn.plan import AttackPlan, describe_attack, plan_attack, search_key
from undo_cli.relearn.runner import (
    SCHEMA_VERSION,
    AttackProgress,
    ModelHook,
    run_attack,
)
from undo_cli.relearn.search import study_name
from undo_cli.relearn.static import (
    demonstrations,
    direction_attack,
    few_shot_attack,
    sample_prompts,
)
from undo_cli.relearn.worst_case import final_metrics

RESULTS_NAME = "results.json"
PLOT_NAME = "relearn.png"
SAMPLES_NAME = "samples.jsonl"
COMPARE_PLOT_NAME = "compare.png"
COMPARE_NAME = "compare.json"
MODELS_DIR = "models"
STAGE = "relearn-attack"


def _prompts_of(data: EvalData, tokenizer) -> list[list[int]]:
    """Token ids of what a set's items start from: prompts, questions or texts."""
    texts = [item if data.shape == "text" else item[0] for item in data.items]
    return [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]


def relearn_checkpoint(checkpoint: str | Path, out: str | Path, *,
                       progress: AttackProgress | None = None,
                       save: SaveOptions = SaveOptions(), raise_on_gate: bool = True,
                       **settings: Any) -> dict[str, Any]:
    """Attack checkpoint `checkpoint` and write `out/results.json`, `out/undo.json` and (with
    matplotlib) `out/relearn.png`, atomically; returns the results.

    Everything is validated before the model is loaded: the settings, the output path, the
    data and eval files, the forget metric (against the metrics the eval sets produce) and
    the `--fail-if` expressions. With `measurement.save_models`, every attacked model is
    written to `out/models/CONFIG-seed<SEED>[-q<BITS>]` with an `undo.json` of its own (a LoRA
    run as an adapter directory on top of `checkpoint`; a full model in `checkpoint`'s dtype
    and sharding unless `save` says otherwise). A gate that holds raises `GateFailed` (exit 3)
    after writing (with `raise_on_gate`; else see `results["gates"]` and
    `raise_failed_gates`). `settings` are `plan_attack`'s keywords (`data`, `config`,
    `evals`, `data_options`, `measurement`, `gates`, `load`, `overwrite`, `arguments`).
    """
    plan = plan_attack(checkpoint, out, started=time.time(), **settings)
    if plan.config.finetune or plan.config.train.dry_run:
        done = stage.plan_outcome(plan.memory, plan.config.train)
        if done is not None:
            return done
    return run_attack_plan(plan, progress=progress, save=save, raise_on_gate=raise_on_gate)


def run_attack_plan(plan: AttackPlan, *, progress: AttackProgress | None = None,
                    save: SaveOptions = SaveOptions(),
                    raise_on_gate: bool = True) -> dict[str, Any]:
    """Run an `AttackPlan` (`relearn_checkpoint` after its plan): load the tokenizer and the
    model, run every attack, write OUT atomically; returns the results."""
    log = logging.getLogger(__name__)
    checkpoint, config, data, load = plan.checkpoint, plan.config, list(plan.data), plan.load
    tokenizer = stage.tokenizer_of(checkpoint, load)
    sets = [tokenize_eval_data(d, tokenizer, choice_format=plan.evals.choice_format)
            for d in plan.raw]
    needs_data = config.finetune or config.embedding_attack or config.prune is not None
    make_stream = _stream_maker(plan, tokenizer, data, "attack") if data and needs_data else None
    benign_stream = (_stream_maker(plan, tokenizer, list(config.benign_data), "benign")
                     if config.benign_data else None)
    static_attacks = _static_attacks(config, data, list(plan.raw), tokenizer, plan.evals,
                                     plan.retain_metric)
    plot = not plan.measurement.no_plot
    if plot and not plots.matplotlib_available():
        log.info("note: matplotlib is not installed, so no relearn.png is drawn "
                 "(pip install 'undo-cli[plot]'); results.json is written as usual")
        plot = False

    model = checkpoint_io.load_model(checkpoint, device=training_device(config.train.device),
                       allow_pickle=load.allow_pickle, trust_remote_code=load.trust_remote_code,
                       base_model=load.base_model)
    if config.shrink_perturb is not None:  # before the step-0 evaluation: part of the attack
        perturb_model_(model, NoiseOptions(alpha=config.shrink_perturb,
                                           beta=config.shrink_perturb_beta),
                       config.train.seed)
    digest = fingerprint(checkpoint)
    # Under a multi-process launch every process trains on its share of each run's batches
    # and evaluates its share of the requests (all get every metric); only the main one writes.
    main = is_main_process()
    output = (atomic_output(plan.out, inputs=[checkpoint], overwrite=plan.overwrite)
              if main else None)
    with output or contextlib.nullcontext() as tmp:
        trackers = None if tmp is None else stage.open_run_trackers(
            config.train, plan.out, tmp, {"stage": STAGE, "arguments": plan.arguments or {
                "checkpoint": checkpoint, "data": data,
                "eval": [list(e) for e in plan.eval_specs]},
                "parents": {"input": checkpoint}, "seed": config.train.seed})
        if trackers is not None:
            progress = TrackedProgress(progress or AttackProgress(), trackers)
        saver = None
        if plan.measurement.save_models and main:
            saver = _model_saver(
                Path(tmp) / MODELS_DIR, tokenizer, checkpoint,
                layout=save_layout(save, plan.info), base_manifest=build_manifest(
                    STAGE, arguments=plan.arguments,
                    parents=stage.with_bases({"input": checkpoint}, [plan.info]),
                    seed=config.train.seed, extra={"saved_model": True}))
        study = _study(plan, digest)
        measurement = plan.measurement  # (a short name for the call below)
        core = run_attack(
            model, tokenizer, sets, config, forget_metric=plan.forget_metric,
            make_stream=make_stream, threshold=measurement.threshold, evals=plan.evals,
            progress=progress, on_model=saver, static_attacks=static_attacks,
            retain_rule=(plan.retain_metric, measurement.max_retain_drop)
            if measurement.max_retain_drop is not None else None,
            study_name=study or "undo-relearn-attack",
            log_samples=measurement.log_samples, benign_stream=benign_stream,
            lora_rank=plan.lora_rank)
        if trackers is not None:
            for point in core["worst_case"]:
                trackers.log({f"worst/{plan.forget_metric}": point.get("value")}, point["step"])
            trackers.close()
        logged = core.pop("_samples", None)
        results = _results(plan, core, digest, study)
        if plan.gates:
            results["gates"] = jsonable(check_gates(plan.gates, gate_values(results)))
        if main and logged is not None:
            write_samples(Path(tmp) / SAMPLES_NAME, logged)
        if main:
            _write_outputs(Path(tmp), results, plot=plot, manifest=_manifest(plan, results))
    engine.wait_for_everyone()
    if plan.gates and raise_on_gate:
        raise_failed_gates(results["gates"])
    return results


def _stream_maker(plan: AttackPlan, tokenizer, data: list[str], name: str
                  ) -> Callable[[int, int], Any]:
    """`make(seed, batch_size)`: a `BatchStream` of `data` for one run; built once here, so
    that bad data fails before any work."""
    options = plan.data_options

    def make(seed: int, batch_size: int):
        return build_stream(tokenizer, data, options.max_length, batch_size, seed, name=name,
                            packing=options.packing)

    make(plan.config.train.seed, plan.config.batch_size_list()[0])
    return make


def _study(plan: AttackPlan, digest: str) -> str | None:
    """The Optuna study's name of a search (None without one): keyed by everything that
    defines the attack, so that `--search-storage` never reuses another attack's trials."""
    config = plan.config
    if not (config.finetune and config.search):
        return None
    data = list(plan.data)
    key = search_key(digest, describe_attack(config, data, plan.data_options, plan.measurement),
                     data, plan.eval_specs, plan.forget_metric, plan.evals, plan.measurement)
    if plan.info.kind == "adapter":  # the base it is merged into (--base-model) counts
        key["base"] = fingerprint(plan.info.base.path)
    return study_name(key)


def _results(plan: AttackPlan, core: dict[str, Any], digest: str,
             study: str | None) -> dict[str, Any]:
    """results.json (docs/relearn-results.md): `run_attack`'s results with what the plan
    knows (checkpoint, its fingerprint, the eval files, the attack's description)."""
    lora_rank = core.pop("lora_rank")
    results = {
        "schema_version": SCHEMA_VERSION,
        "checkpoint": str(plan.checkpoint),
        "fingerprint": digest,
        "forget_metric": plan.forget_metric,
        "direction": core["direction"],
        "eval": {name: str(path) for name, path in plan.eval_specs},
        "attack": describe_attack(plan.config, list(plan.data), plan.data_options,
                                  plan.measurement, lora_rank),
        **{k: v for k, v in core.items()
           if k not in ("schema_version", "forget_metric", "direction")},
    }
    if study is not None:
        results["attack"]["search"]["study"] = study  # its name in --search-storage
    return results


def _manifest(plan: AttackPlan, results: dict[str, Any]) -> dict[str, Any]:
    """undo.json of the results directory."""
    return build_manifest(
        STAGE, arguments=plan.arguments,
        parents=stage.with_bases({"input": plan.checkpoint}, [plan.info]),
        seed=plan.config.train.seed, wall_time_s=time.time() - plan.started,
        compute={**results["compute"], "runs": len(results["runs"]),
                 "processes": world_size()},
        metrics={"forget_metric": plan.forget_metric, **results["summary"],
                 "worst": final_metrics(results)},
        extra={"relearn": {"results": RESULTS_NAME, "timing": results["timing"]}})


class TrackedProgress(AttackProgress):
    """`progress` that also reports every run to the `--report-to` trackers: its training
    log live under `attack/<RUN>/train/`, its evaluation curve (step 0 on) under
    `attack/<RUN>/eval/` when it ends."""

    def __init__(self, progress: AttackProgress, trackers: Any):
        self.progress, self.trackers = progress, trackers
        self.prefix = "attack/"

    def start(self, total_runs: int, steps: int) -> None:
        self.progress.start(total_runs, steps)

    def run_started(self, index: int, lr: float | None, seed: int | None,
                    config: str = "") -> None:
        self.prefix = f"attack/{config or index}" + (f" seed {seed}" if seed is not None
                                                      else "") + "/"
        self.progress.run_started(index, lr, seed, config)

    def step(self, step: int) -> None:
        self.progress.step(step)

    def log(self, entry: dict[str, Any]) -> None:
        if entry.get("type") == "train":
            self.trackers.log_entry(entry, self.prefix)
        self.progress.log(entry)

    def run_finished(self, run: dict[str, Any], metric: str) -> None:
        name = f"attack/{run.get('config')}" + (f" seed {run['seed']}"
                                                if run.get("seed") is not None else "")
        for point in run.get("curve", []):
            self.trackers.log_entry({"type": "eval", **point}, name + "/")
        self.progress.run_finished(run, metric)

    def message(self, text: str) -> None:
        self.progress.message(text)

    def close(self) -> None:
        self.progress.close()


def _static_attacks(config: AttackConfig, data: Sequence[str], raw: list[EvalData], tokenizer,
                    evals: EvalOptions, retain_metric: str | None) -> list:
    """The attacks without finetuning that `config` asks for, with their data read now."""
    if not (config.few_shot or config.ablate_direction):
        return []

    records = [r.data for spec in data for r in read_records(parse_weighted_spec(spec)[0])]
    pool = demonstrations(records)
    if not pool:
        raise UsageError("--data holds no text to take demonstrations or directions from")
    attacks = []
    if config.few_shot:
        def measure_sets(sets: list[EvalData]):
            return stage.measure(tokenizer, [
                tokenize_eval_data(d, tokenizer, choice_format=evals.choice_format)
                for d in sets], evals)

        attacks.append(few_shot_attack(raw, pool, config.few_shot, config.seed_list(),
                                       measure_sets))
    if config.ablate_direction:
        retain_set = next(d for d in raw if d.name == retain_metric.rsplit(".", 1)[0])
        forget = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in pool]
        attacks.append(direction_attack(
            sample_prompts(forget, config.train.seed),
            sample_prompts(_prompts_of(retain_set, tokenizer), config.train.seed)))
    return attacks


def gate_values(results: dict[str, Any]) -> dict[str, float]:
    """The values the attack's `--fail-if` gates read (`undo_cli.gates.namespaces`): the
    forget metric's `worst.SET.METRIC.lower/.upper` are the worst case's own 95% band at the
    end (other metrics' bounds: their evaluation's interval)."""
    worst = final_metrics(results)
    last = (results.get("worst_case") or [{}])[-1]
    metric = results.get("forget_metric")
    for bound in ("lower", "upper"):
        if metric and last.get(bound) is not None:
            worst[f"{metric}_{bound}"] = last[bound]
    return attack_gate_values(worst, results["initial"], results["summary"])


def _model_saver(root: Path, tokenizer, checkpoint: str | Path, *, layout: Layout = Layout(),
                 base_manifest: dict[str, Any] | None = None) -> ModelHook:
    """An `on_model` hook writing each attacked model under `root`, with an `undo.json` of
    its own (`base_manifest` plus the run: configuration, seed, steps, compute, final
    metrics); full models in `layout`'s dtype and shards."""

    def save(run: dict[str, Any], model: torch.nn.Module) -> None:
        name = re.sub(r"[^A-Za-z0-9.=-]+", "-", run.get("config") or "original").strip("-")
        if run.get("seed") is not None:
            name += f"-seed{run['seed']}"
        if run.get("quantize"):
            scheme = run["quantize"].get("scheme")
            name += f"-q{scheme if scheme in ('nf4', 'int8', 'int4') else run['quantize']['bits']}"
        target = root / name
        target.mkdir(parents=True, exist_ok=True)
        if run.get("attack") == "embedding":  # the soft prompt alone: weights unchanged
            prompt = model.get_input_embeddings().prompt.detach().float().cpu().contiguous()
            save_file({"prompt": prompt}, str(target / "soft_prompt.safetensors"))
        elif run.get("attack") == "qlora":  # the adapter sits on the quantised weights
            save_model(copy.deepcopy(model).merge_and_unload(), tokenizer, target,
                       source=checkpoint, layout=layout)
        elif hasattr(model, "peft_config"):  # a LoRA run: the adapter, on top of CKPT
            for cfg in model.peft_config.values():
                cfg.base_model_name_or_path = str(Path(checkpoint).resolve())
            model.save_pretrained(target)
            tokenizer.save_pretrained(target)
        else:
            save_model(model, tokenizer, target, source=checkpoint, layout=layout)
        if base_manifest is not None:
            described = {k: v for k, v in run.items() if not k.startswith("_")
                         and k not in ("curve", "saved_as")}
            last = run["curve"][-1] if run.get("curve") else {}
            write_manifest(target, {
                **base_manifest,
                "seed": run.get("seed"),
                "compute": {"tokens": run.get("tokens", 0), "flops": run.get("flops", 0.0)},
                "metrics": {k: v for k, v in last.items() if k != "step"},
                "relearn_run": jsonable(described)})
        run["saved_as"] = str(Path(MODELS_DIR) / name)

    return save


def write_samples(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """`--log-samples`: one strict-JSON line per record."""
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(to_json(record) + "\n")


def _write_outputs(directory: Path, results: dict[str, Any], *, plot: bool,
                   manifest: dict[str, Any]) -> None:
    """results.json, relearn.png (with `plot`) and undo.json into `directory`."""

    (directory / RESULTS_NAME).write_text(to_json(results, indent=2) + "\n")
    if plot:
        plot_attack(results, directory / PLOT_NAME)
    write_manifest(directory, manifest)


# ----------------------------------------------------------------------------- comparing


REQUIRED_KEYS = ("checkpoint", "fingerprint", "forget_metric", "direction", "attack",
                 "initial", "runs", "worst_case", "summary")


def load_results(path: str | Path) -> dict[str, Any]:
    """Read `path/results.json` (or a results.json file); `UsageError` if it is missing or
    not an attack's results."""

    path = Path(path)
    file = path / RESULTS_NAME if path.is_dir() else path
    if not file.is_file():
        raise UsageError(f"{path}: no {RESULTS_NAME} (not a relearn-attack results directory)")
    results = read_json_file(file)
    missing = [k for k in REQUIRED_KEYS if not isinstance(results, dict) or k not in results]
    if missing:
        raise UsageError(f"{file}: not relearn-attack results (missing {', '.join(missing)})")
    return check_attack_results(results, file)


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
