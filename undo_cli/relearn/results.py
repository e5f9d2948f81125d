"""`relearn_checkpoint`: the attack of `undo relearn-attack` on a checkpoint, written as a
results directory (`results.json`, `relearn.png`, `undo.json`; the schema of results.json is
docs/relearn-results.md), and `compare_results` (`--compare`: several results in one figure).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from undo_cli.errors import UsageError
from undo_cli.gates import (
    attack_gate_names,
    attack_gate_values,
    check_gates,
    parse_gates,
    raise_failed_gates,
)
from undo_cli.jsontext import jsonable, to_json
from undo_cli.options import (
    AttackConfig,
    AttackMeasurement,
    DataOptions,
    EvalOptions,
    GateOptions,
    LoadOptions,
)
from undo_cli.records import parse_named_specs
from undo_cli.relearn.runner import (
    SCHEMA_VERSION,
    AttackProgress,
    ModelHook,
    lora_target_list,
    run_attack,
)
from undo_cli.relearn.worst_case import final_metrics, resolve_forget_metric

RESULTS_NAME = "results.json"
PLOT_NAME = "relearn.png"
COMPARE_PLOT_NAME = "compare.png"
COMPARE_NAME = "compare.json"
MODELS_DIR = "models"
STAGE = "relearn-attack"


def describe_attack(config: AttackConfig, data: Sequence[str], data_options: DataOptions,
                    lora_rank: int | None = None) -> dict[str, Any]:
    """The `attack` entry of results.json: every setting of the grid."""
    t = config.train
    quant = ({"bits": config.quantize, "group_size": config.group_size}
             if config.quantize is not None else None)
    shrink = shrink_perturb_settings(config)
    if not config.finetune:
        return {"mode": "none", "lrs": [], "steps": 0, "batch_size": t.batch_size,
                "eval_every": config.eval_every, "seeds": [], "data": [],
                "max_length": data_options.max_length, "lora": None, "quantize": quant,
                "shrink_perturb": shrink}
    lora = None
    if config.lora:
        lora = {"rank": lora_rank or config.lora_rank, "rank_requested": config.lora_rank,
                "alpha": config.lora_alpha, "targets": lora_target_list(config.lora_targets),
                "dropout": config.lora_dropout}
    return {"mode": config.mode, "lrs": list(config.lrs), "steps": config.steps,
            "batch_size": t.batch_size, "eval_every": config.eval_every,
            "seeds": config.seed_list(), "data": [str(d) for d in data],
            "max_length": data_options.max_length, "packing": data_options.packing,
            "schedule": t.schedule, "warmup_steps": t.warmup_steps, "min_lr": t.min_lr,
            "weight_decay": t.weight_decay, "grad_accum": t.grad_accum,
            "max_grad_norm": t.max_grad_norm, "bf16": t.bf16, "lora": lora, "quantize": quant,
            "shrink_perturb": shrink}


def shrink_perturb_settings(config: AttackConfig) -> dict[str, Any] | None:
    """The `attack.shrink_perturb` entry of results.json: what noised the model before the
    attack (None without --shrink-perturb)."""
    if config.shrink_perturb is None:
        return None
    return {"alpha": config.shrink_perturb, "beta": config.shrink_perturb_beta,
            "seed": config.train.seed, "noise": "xavier-uniform"}


def relearn_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    *,
    data: Sequence[str],
    config: AttackConfig,
    evals: EvalOptions,
    data_options: DataOptions | None = None,
    measurement: AttackMeasurement | None = None,
    gates: GateOptions | None = None,
    load: LoadOptions | None = None,
    overwrite: bool = False,
    raise_on_gate: bool = True,
    arguments: dict[str, Any] | None = None,
    progress: AttackProgress | None = None,
) -> dict[str, Any]:
    """Attack checkpoint `checkpoint` and write `out/results.json`, `out/undo.json` and (with
    matplotlib) `out/relearn.png`, atomically; returns the results.

    Everything is validated before the model is loaded: the settings, the output path, the
    data and eval files, the forget metric (against the metrics the eval sets produce) and
    the `--fail-if` expressions. With `measurement.save_models`, every attacked model is
    written to `out/models/lr<LR>-seed<SEED>[-q<BITS>]` (a LoRA run as an adapter directory on
    top of `checkpoint`). A gate that holds raises `GateFailed` (exit 3) after writing (with
    `raise_on_gate`; else see `results["gates"]` and `raise_failed_gates`).
    """
    import logging

    from undo_cli import stage
    from undo_cli.checkpoint import (
        atomic_output,
        build_manifest,
        fingerprint,
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
    from undo_cli.evaluate import expected_metrics

    started = time.time()
    log = logging.getLogger(__name__)
    data_options, measurement = data_options or DataOptions(), measurement or AttackMeasurement()
    gates_given, load = gates or GateOptions(), load or LoadOptions()
    if fsdp_requested():
        raise UsageError("relearn-attack runs data-parallel (DDP) only, not under FSDP: launch "
                         "it with examples/accelerate/ddp.yaml")
    config.finetune = bool(data)
    config.validate()
    if not evals.eval:
        raise UsageError("nothing to measure: give --eval NAME=PATH (e.g. the forget and "
                         "retain eval sets)")
    eval_specs = parse_named_specs(evals.eval)
    gate_list = parse_gates(gates_given.fail_if)
    info = stage.check_inputs(out, [checkpoint], load, overwrite=overwrite)[0]
    if config.finetune:
        stage.check_length(data_options.max_length, info.config)

    tokenizer = load_tokenizer(checkpoint, trust_remote_code=load.trust_remote_code)
    sets = stage.load_eval_sets(evals, tokenizer, limit=measurement.eval_limit,
                                seed=config.train.seed)
    available = expected_metrics(sets)
    forget_metric = resolve_forget_metric(measurement.forget_metric, available)
    for expr in gate_list:
        expr.check_names(attack_gate_names(available, measurement.threshold))
    streams: dict[int, Any] = {}
    if config.finetune:
        from undo_cli.data import build_stream

        for seed in config.seed_list():
            streams[seed] = build_stream(tokenizer, list(data), data_options.max_length,
                                         config.train.batch_size, seed, name="attack",
                                         packing=data_options.packing)
    plot = not measurement.no_plot
    if plot:
        from undo_cli.plots import matplotlib_available

        if not matplotlib_available():
            log.info("note: matplotlib is not installed, so no relearn.png is drawn "
                     "(pip install 'undo-cli[plot]'); results.json is written as usual")
            plot = False

    model = load_model(checkpoint, device=training_device(config.train.device),
                       allow_pickle=load.allow_pickle, trust_remote_code=load.trust_remote_code)
    if config.shrink_perturb is not None:  # before the step-0 evaluation: part of the attack
        from undo_cli.perturb import perturb_model_

        perturb_model_(model, config.shrink_perturb, config.shrink_perturb_beta,
                       seed=config.train.seed)
    digest = fingerprint(checkpoint)
    # Under a multi-process launch every process trains on its share of each run's batches
    # and evaluates its share of the requests (all get every metric); only the main one writes.
    main = is_main_process()
    output = atomic_output(out, inputs=[checkpoint], overwrite=overwrite) if main else None
    with output or contextlib.nullcontext() as tmp:
        saver = None
        if measurement.save_models and main:
            saver = _model_saver(Path(tmp) / MODELS_DIR, tokenizer, checkpoint)
        core = run_attack(model, tokenizer, sets, config, forget_metric=forget_metric,
                          streams=streams, threshold=measurement.threshold, evals=evals,
                          progress=progress, on_model=saver)
        lora_rank = core.pop("lora_rank")
        results = {
            "schema_version": SCHEMA_VERSION,
            "checkpoint": str(checkpoint),
            "fingerprint": digest,
            "forget_metric": forget_metric,
            "direction": core["direction"],
            "eval": {name: str(path) for name, path in eval_specs},
            "attack": describe_attack(config, data, data_options, lora_rank),
            **{k: v for k, v in core.items()
               if k not in ("schema_version", "forget_metric", "direction")},
        }
        if gate_list:
            results["gates"] = jsonable(check_gates(gate_list, gate_values(results)))
        if main:
            _write_outputs(Path(tmp), results, plot=plot, manifest=build_manifest(
                STAGE, arguments=arguments or {"checkpoint": checkpoint, "data": list(data),
                                               "eval": [list(e) for e in eval_specs],
                                               "attack": results["attack"]},
                parents={"input": checkpoint}, seed=config.train.seed,
                wall_time_s=time.time() - started,
                compute={**results["compute"], "runs": len(results["runs"]),
                         "processes": world_size()},
                metrics={"forget_metric": forget_metric, **results["summary"],
                         "worst": final_metrics(results)},
                extra={"relearn": {"results": RESULTS_NAME, "timing": results["timing"]}}))
    wait_for_everyone()
    if gate_list and raise_on_gate:
        raise_failed_gates(results["gates"])
    return results


def gate_values(results: dict[str, Any]) -> dict[str, float]:
    """The values the attack's `--fail-if` gates read (`undo_cli.gates.namespaces`)."""
    return attack_gate_values(final_metrics(results), results["initial"], results["summary"])


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
