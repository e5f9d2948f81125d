"""What an attack is, decided before any weight loads: `plan_attack` settles every setting of
`undo relearn-attack` into a frozen `AttackPlan` (the inputs checked, the row length, the eval
data read, the forget and retain metrics resolved, the `--fail-if` gates checked against them,
the memory plan), and the records results.json and undo.json keep of it (`describe_attack`,
`attack_arguments`, `search_key`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from undo_cli import stage
from undo_cli.engine import fsdp_requested
from undo_cli.errors import UsageError
from undo_cli.evaluate import expected_metrics
from undo_cli.gates import attack_gate_names
from undo_cli.options import (
    AttackConfig,
    AttackMeasurement,
    DataOptions,
    EvalOptions,
    GateOptions,
    LoadOptions,
)
from undo_cli.options.storage import sqlite_path
from undo_cli.records import EvalData, read_eval_data
from undo_cli.relearn.runner import lora_rank_for
from undo_cli.relearn.worst_case import metric_direction, resolve_forget_metric
from undo_cli.runtime import require_optimizers


@dataclass(frozen=True)
class AttackPlan:
    """Every decision of an attack, made before any weight loads; `relearn_checkpoint` runs
    it. `config.finetune` is decided (attack data given and not --no-finetune), the row
    length fitted to the model, the metrics resolved against the eval sets' shapes."""

    checkpoint: str | Path
    out: Path
    info: Any  # the checkpoint's `CheckpointInfo`
    config: AttackConfig
    data: tuple[str, ...]
    data_options: DataOptions  # max_length decided
    evals: EvalOptions
    measurement: AttackMeasurement  # retain_metric decided where the utility rule needs it
    load: LoadOptions
    eval_specs: tuple[tuple[str, str], ...]
    raw: tuple[EvalData, ...]  # the eval sets, read and validated (not yet tokenised)
    forget_metric: str
    gates: tuple[Any, ...]  # the --fail-if expressions, parsed and checked
    storage: Path | None  # --search-storage's database file
    memory: Any  # `checkpoint.plan.MemoryPlan` (finetuning attacks) or None
    lora_rank: int | None  # --lora-rank clipped to the narrowest wrapped layer (None: not
    # decided, LoRA unused or the model cannot be built on the meta device)
    arguments: dict[str, Any]  # undo.json's `arguments`
    overwrite: bool = False
    started: float = field(default=0.0)

    @property
    def retain_metric(self) -> str | None:
        """The utility metric (None when neither --max-retain-drop nor --ablate-direction)."""
        rule = (self.measurement.max_retain_drop is not None
                or self.config.ablate_direction)
        return self.measurement.retain_metric if rule else None


def plan_attack(checkpoint: str | Path, out: str | Path, *, data: Sequence[str],
                config: AttackConfig, evals: EvalOptions,
                data_options: DataOptions = DataOptions(),
                measurement: AttackMeasurement = AttackMeasurement(),
                gates: GateOptions = GateOptions(), load: LoadOptions = LoadOptions(),
                overwrite: bool = False, arguments: dict[str, Any] | None = None,
                started: float = 0.0) -> AttackPlan:
    """The `AttackPlan` of `relearn_checkpoint`'s arguments; `UsageError` for anything that
    would fail later (the settings, OUT against every input, the data's needs, the eval
    files, the metric names, the gates)."""
    arguments = arguments or attack_arguments(checkpoint, out, data, config, evals,
                                              data_options, measurement, gates)
    if fsdp_requested():
        raise UsageError("relearn-attack runs data-parallel (DDP) only, not under FSDP: launch "
                         "it with examples/accelerate/ddp.yaml")
    config = replace(config, finetune=bool(data) and not config.no_finetune)
    config.validate()
    if config.finetune:
        require_optimizers(config.optimizers, config.train.device)
    if not evals.eval:
        raise UsageError("nothing to measure: give --eval NAME=PATH (e.g. the forget and "
                         "retain eval sets)")
    if (config.few_shot or config.ablate_direction) and not data:
        raise UsageError("--few-shot and --ablate-direction take their forget-domain text "
                         "from --data: give --data PATH")
    if config.embedding_attack and not data:
        raise UsageError("--embedding-attack optimises its soft prompt on --data: give "
                         "--data PATH")
    if config.prune is not None and config.prune[0] == "wanda" and not data:
        raise UsageError("--prune wanda:S takes its activation norms from --data: give "
                         "--data PATH")
    if isinstance(config.quantize, str):
        from undo_cli.quantize import check_library

        check_library(config.quantize)
    eval_specs = tuple(evals.sets)
    gate_list = tuple(condition.expr for condition in gates.fail_if)
    storage = sqlite_path(config.search_storage) if config.search else None
    info = stage.check_inputs(
        out, [checkpoint], load, overwrite=overwrite,
        reads=[*stage.data_paths("--data", data), *stage.eval_paths(evals),
               *stage.data_paths("--benign-data", config.benign_data or [])],
        writes=[("--logging-dir", config.train.logging_dir),
                *([("--search-storage", storage)] if storage is not None else [])])[0]
    data_options = stage.fit_length(data_options, info.config)
    lora_rank = memory = None
    if config.finetune or config.train.dry_run:  # the attacked copy beside the original
        meta = stage.meta_model(info.config)  # built once, for the rank and the count
        if meta is not None and config.finetune and (config.lora or config.search
                                                     or config.qlora):
            lora_rank = lora_rank_for(meta, config.lora_rank, config.lora_targets.modules)
        memory = stage.memory_plan(
            info.config, config.train, length=data_options.max_length,
            batch_size=max(config.batch_size_list()), optimizers=config.optimizers,
            lora_rank=(lora_rank or config.lora_rank) if config.lora else None,
            frozen_parameters=stage.model_parameters(info.config, meta) or 0)
    raw = tuple(read_eval_data(name, path, limit=measurement.eval_limit,
                               seed=config.train.seed) for name, path in eval_specs)
    available = expected_metrics(raw)
    forget_metric = resolve_forget_metric(measurement.forget_metric, available)
    if measurement.max_retain_drop is not None or config.ablate_direction:
        measurement = replace(measurement,
                              retain_metric=retain_metric_of(measurement, available))
    for expr in gate_list:
        expr.check_names(attack_gate_names(available, measurement.threshold))
    return AttackPlan(checkpoint, Path(out), info, config, tuple(data), data_options, evals,
                      measurement, load, eval_specs, raw, forget_metric, gate_list, storage,
                      memory, lora_rank, arguments, overwrite=overwrite, started=started)


def attack_arguments(checkpoint: str | Path, out: str | Path, data: Sequence[str],
                     config: AttackConfig, evals: EvalOptions, data_options: DataOptions,
                     measurement: AttackMeasurement, gates: GateOptions) -> dict[str, Any]:
    """Every setting of an attack as `undo.json` records it (`arguments`)."""
    return {"checkpoint": str(checkpoint), "data": list(data),
            "eval": [list(e) for e in evals.sets],
            "choice_format": evals.choice_format,
            "attack": {k: v for k, v in asdict(config).items() if k != "train"},
            "train": config.train.manifest(), "measurement": asdict(measurement),
            "fail_if": list(gates.fail_if), "max_length": data_options.max_length,
            "packing": data_options.packing, "out": str(out)}


def describe_attack(config: AttackConfig, data: Sequence[str], data_options: DataOptions,
                    measurement: AttackMeasurement = AttackMeasurement(),
                    lora_rank: int | None = None) -> dict[str, Any]:
    """The `attack` entry of results.json: every setting of the adversary's space."""
    t = config.train
    quant = quantize_settings(config)
    static = {"few_shot": config.few_shot, "ablate_direction": config.ablate_direction,
              "max_retain_drop": measurement.max_retain_drop,
              "retain_metric": measurement.retain_metric if measurement.max_retain_drop
              is not None or config.ablate_direction else None}
    shrink = shrink_perturb_settings(config)
    static.update(family_settings(config))
    if not config.finetune:
        return {"mode": "none", "lrs": [], "steps": 0, "batch_size": t.batch_size,
                "eval_every": config.eval_every, "eval_schedule": config.eval_schedule,
                "seeds": config.seed_list(),
                "data": [str(d) for d in data], "max_length": data_options.max_length,
                "lora": None, "quantize": quant, "search": None, "shrink_perturb": shrink,
                **static}
    lora = None
    if config.lora or config.search:
        lora = {"rank": lora_rank or config.lora_rank, "rank_requested": config.lora_rank,
                "alpha": config.alpha_for(lora_rank or config.lora_rank),
                "alpha_requested": config.lora_alpha,
                "targets": config.lora_targets.modules,
                "dropout": config.lora_dropout}
    lrs: Any = config.lr_grid(config.optimizers[0])
    if len(config.optimizers) > 1 and not config.lrs:
        lrs = {opt: config.lr_grid(opt) for opt in config.optimizers}
    search = None
    if config.search:
        search = {"trials": config.search, "sampler": "TPE", "pruner": "median",
                  "seed": t.seed, "storage": config.search_storage}
    return {"mode": config.mode, "lrs": lrs, "optimizers": list(config.optimizers),
            "schedules": config.schedule_list(), "batch_sizes": config.batch_size_list(),
            "steps": config.steps, "batch_size": t.batch_size, "eval_every": config.eval_every,
            "eval_schedule": config.eval_schedule, "seeds": config.seed_list(),
            "data": [str(d) for d in data], "max_length": data_options.max_length,
            "packing": data_options.packing, "schedule": t.schedule,
            "warmup_steps": t.warmup_steps, "min_lr": t.min_lr,
            "weight_decay": t.weight_decay, "grad_accum": t.grad_accum,
            "max_grad_norm": t.max_grad_norm, "bf16": t.bf16, "bf16_weights": t.bf16_weights,
            "gradient_checkpointing": t.gradient_checkpointing, "lora": lora, "quantize": quant,
            "search": search, "shrink_perturb": shrink, **static}


def search_key(digest: str, attack: dict[str, Any], data: Sequence[str],
               eval_specs: Sequence[tuple[str, str]], forget_metric: str, evals: EvalOptions,
               measurement: AttackMeasurement) -> dict[str, Any]:
    """Everything that defines a search's trials, by which `--search-storage` keys its study
    (another attack never reuses them): the checkpoint's fingerprint, the attack's settings
    (results.json's `attack`, but the number of trials and the storage), the content of
    every data and eval file, and how the sets are measured."""
    from undo_cli.checkpoint import fingerprint_data
    from undo_cli.records import parse_weighted_spec

    settings = {k: v for k, v in attack.items() if k != "data"}
    settings["search"] = {k: v for k, v in (attack.get("search") or {}).items()
                          if k not in ("trials", "storage")}
    data_specs = [parse_weighted_spec(spec) for spec in data]
    return {"checkpoint": digest, "attack": settings,
            "data": [[fingerprint_data(path), weight] for path, weight in data_specs],
            "eval": [[name, fingerprint_data(path)] for name, path in eval_specs],
            "forget_metric": forget_metric, "eval_limit": measurement.eval_limit,
            "choice_format": evals.choice_format, "max_new_tokens": evals.max_new_tokens,
            "until": list(evals.until or [])}


def retain_metric_of(measurement: AttackMeasurement, available: Sequence[str]) -> str:
    """--retain-metric, checked, or retain.accuracy / retain.loss when a set named retain
    gives one."""
    metric = measurement.retain_metric
    if metric is None:
        metric = next((m for m in ("retain.accuracy", "retain.accuracy_norm", "retain.loss")
                       if m in available), None)
        if metric is None:
            raise UsageError("--max-retain-drop and --ablate-direction need the retain "
                             "utility: give --retain-metric SET.METRIC (or an --eval set "
                             "named retain)")
    if metric not in available:
        raise UsageError(f"--retain-metric {metric!r} is not a metric of the eval sets; "
                         f"available: {', '.join(available)}")
    metric_direction(metric)
    return metric


def quantize_settings(config: AttackConfig) -> dict[str, Any] | None:
    """The `attack.quantize` entry: bits and group size (RTN), or the library scheme."""
    if config.quantize is None:
        return None
    if isinstance(config.quantize, str):
        from undo_cli.options.attack import QUANTIZE_SCHEMES

        assert config.quantize in QUANTIZE_SCHEMES
        library = "optimum-quanto" if config.quantize == "int4" else "bitsandbytes"
        return {"bits": 8 if config.quantize == "int8" else 4, "group_size": None,
                "scheme": config.quantize, "library": library, "qlora": config.qlora}
    return {"bits": config.quantize, "group_size": config.group_size}


def family_settings(config: AttackConfig) -> dict[str, Any]:
    """The `attack` entries of the families of `undo_cli.relearn.families`."""
    prune = ({"method": config.prune[0], "sparsity": config.prune[1]}
             if config.prune is not None else None)
    embedding = ({"steps": config.embedding_attack, "prompt_tokens": config.prompt_tokens,
                  "lr": config.prompt_lr, "optimizer": "adamw"}
                 if config.embedding_attack else None)
    return {"prune": prune, "embedding_attack": embedding,
            "benign_data": list(config.benign_data) if config.benign_data else None}


def shrink_perturb_settings(config: AttackConfig) -> dict[str, Any] | None:
    """The `attack.shrink_perturb` entry of results.json: what noised the model before the
    attack (None without --shrink-perturb)."""
    if config.shrink_perturb is None:
        return None
    return {"alpha": config.shrink_perturb, "beta": config.shrink_perturb_beta,
            "seed": config.train.seed, "noise": "xavier-uniform"}


