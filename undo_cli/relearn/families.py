"""The attack families beyond plain finetuning on the forget data, each as runs of its own in
results.json (docs/relearn-results.md), measured on the same evaluation sets and seeds:

- `prune` (`--prune magnitude:S|wanda:S`, `undo_cli.relearn.prune`): the pruned model alone
  (a static run, `attack: "prune"`) and, with finetuning, every configuration of the grid
  finetuned from the pruned model (`attack: "prune+finetune"`, config `prune METHOD:S + ...`);
- `quantize` with a library scheme (`--quantize nf4|int8|int4`) and finetuning: the original
  model quantised as well (a static run, config `original`), besides each run's quantised twin;
- `qlora` (`--quantize SCHEME --qlora`): LoRA adapters finetuned on the quantised model, the
  model evaluated as quantised base + adapter (`attack: "qlora"`);
- `benign` (`--benign-data FILE`): every configuration of the grid finetuned on data with no
  forget content (`attack: "benign-finetune"`, config `benign ...`);
- `embedding` (`--embedding-attack STEPS`, `undo_cli.relearn.soft_prompt`): one soft prompt
  per seed (`attack: "embedding"`).

"Every configuration of the grid" is the grid's product; with `--search`, the configuration
the search found strongest (every seed). Finetuning families reuse the runner's run
(`finetune(original, spec, stream, initial, initial_items)`), so every run has the same
evaluation schedule, divergence handling, cost records (`cost`: attacker tokens and FLOPs
at each evaluation) and per-item values. A run that starts from a changed model (pruned,
quantised) leaves out step 0 from its curve: the static run of that change is its step 0.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch

from undo_cli.options import AttackConfig, RunSpec
from undo_cli.quantize import quantize_model_with
from undo_cli.relearn.prune import calibration_rows, prune_model_
from undo_cli.relearn.soft_prompt import PrefixedStream, attach_soft_prompt, prefix_eval_set
from undo_cli.stage import Measure


@dataclass
class FamilyContext:
    """What the families need from `run_attack`."""

    model: torch.nn.Module
    config: AttackConfig
    measure: Any
    grid: list[RunSpec]
    finetune: Callable[..., tuple[dict[str, Any], torch.nn.Module]]
    attack_stream: Callable[[int, int], Any] | None
    benign_stream: Callable[[int, int], Any] | None
    lora_rank: int
    tokenizer: Any = None
    eval_sets: Any = None
    evals: Any = None
    progress: Any = None


def _static(attack: str, config: str, metrics: dict[str, float], items: Any, seconds: float,
            **extra: Any) -> dict[str, Any]:
    return {"attack": attack, "config": config, "static": True, "lr": None, "seed": None,
            "quantize": None, "curve": [{"step": 0, **metrics}], "diverged": False,
            "diverged_step": None, "steps": 0, "tokens": 0, "flops": 0.0,
            "cost": [{"step": 0, "tokens": 0, "flops": 0.0}], "trainable_parameters": 0,
            "train_loss": None, "wall_time_s": seconds, "eval_time_s": seconds,
            "_items": {0: items}, **extra}


def _from_changed(run: dict[str, Any]) -> dict[str, Any]:
    """A run that starts from a changed model: its step 0 is the static run's."""
    run["curve"] = [e for e in run["curve"] if e["step"] != 0]
    run["cost"] = [e for e in run.get("cost", []) if e["step"] != 0]
    run.get("_items", {}).pop(0, None)
    return run


def prune_family(ctx: FamilyContext) -> Iterator[tuple[dict[str, Any], Any]]:
    """`--prune`: the pruned model, then (with finetuning) the grid from it."""
    method, sparsity = ctx.config.prune
    name = f"prune {method}:{sparsity:g}"
    t0 = time.perf_counter()
    pruned = copy.deepcopy(ctx.model)
    rows = None
    if method == "wanda":
        seed, bs = ctx.grid[0].seed if ctx.grid else ctx.config.train.seed, 8
        rows = calibration_rows(ctx.attack_stream(seed, bs))
    summary = prune_model_(pruned, method, sparsity, rows)
    metrics = ctx.measure(pruned)
    items = ctx.measure.items
    yield _static("prune", name, metrics, items, time.perf_counter() - t0,
                  prune=summary), pruned
    for spec in ctx.grid if ctx.config.finetune else []:
        run, attacked = ctx.finetune(pruned, spec, ctx.attack_stream(spec.seed, spec.batch_size),
                                     metrics, items)
        run.update(config=f"{name} + {spec.config_id}", attack="prune+finetune", prune=summary)
        yield _from_changed(run), attacked


def quantized_original_family(ctx: FamilyContext) -> Iterator[tuple[dict[str, Any], Any]]:
    """`--quantize nf4|int8|int4` with finetuning: the original model quantised too (a static
    run; without finetuning the runner quantises it anyway)."""
    t0 = time.perf_counter()
    quantized = copy.deepcopy(ctx.model)
    settings = quantize_model_with(quantized, ctx.config.quantize, ctx.config.group_size)
    metrics = ctx.measure(quantized)
    run = _static("quantize", "original", metrics, ctx.measure.items,
                  time.perf_counter() - t0)
    run["quantize"] = settings
    yield run, quantized


def qlora_family(ctx: FamilyContext) -> Iterator[tuple[dict[str, Any], Any]]:
    """`--qlora`: LoRA on the quantised model, every configuration of the grid."""
    quantized = copy.deepcopy(ctx.model)
    settings = quantize_model_with(quantized, ctx.config.quantize, ctx.config.group_size)
    quantized.requires_grad_(False)
    alpha = ctx.config.alpha_for(ctx.lora_rank)
    for spec in ctx.grid:
        spec = replace(spec, lora_rank=ctx.lora_rank, lora_alpha=alpha)
        run, attacked = ctx.finetune(quantized, spec,
                                     ctx.attack_stream(spec.seed, spec.batch_size), None, None)
        run.update(config=f"qlora {settings['scheme']} + {spec.config_id}", attack="qlora",
                   qlora={k: settings[k] for k in ("scheme", "library", "bits")})
        yield _from_changed(run), attacked


def benign_family(ctx: FamilyContext) -> Iterator[tuple[dict[str, Any], Any]]:
    """`--benign-data`: the grid, finetuned on the benign data."""
    for spec in ctx.grid:
        run, attacked = ctx.finetune(ctx.model, spec,
                                     ctx.benign_stream(spec.seed, spec.batch_size), None, None)
        run.update(config=f"benign {spec.config_id}", attack="benign-finetune")
        yield run, attacked


def embedding_family(ctx: FamilyContext) -> Iterator[tuple[dict[str, Any], Any]]:
    """`--embedding-attack STEPS`: one soft prompt per seed, AdamW at `--prompt-lr`, batch
    size `--batch-size`, evaluated with the prompt in front on the schedule of
    `AttackConfig.eval_steps(STEPS)`."""

    c = ctx.config
    for seed in c.seed_list():
        prompted, ids = attach_soft_prompt(ctx.model, c.prompt_tokens, seed)
        sets = [prefix_eval_set(s, ids) for s in ctx.eval_sets]
        measure = Measure(ctx.tokenizer, sets, ctx.measure.evals)
        spec = RunSpec(lr=c.prompt_lr, seed=seed, optimizer="adamw", schedule="constant",
                       batch_size=c.train.batch_size)
        steps = c.embedding_attack
        stream = PrefixedStream(ctx.attack_stream(seed, spec.batch_size), ids,
                                ctx.tokenizer.pad_token_id)
        run, attacked = ctx.finetune(prompted, spec, stream, None, None, measure=measure,
                                     steps=steps, frozen_ok=True)
        ctx.measure.eval_s += measure.eval_s
        ctx.measure.evaluations += measure.evaluations
        run.update(config=f"embedding p{c.prompt_tokens} lr{c.prompt_lr:g}",
                   attack="embedding", mode="soft-prompt",
                   embedding={"prompt_tokens": c.prompt_tokens, "steps": steps,
                              "lr": c.prompt_lr})
        yield run, attacked


def planned_runs(config: AttackConfig, grid_size: int) -> int:
    """How many runs the families of `config` add (for the progress display); `grid_size`:
    the configurations x seeds they finetune (1 per seed with --search)."""
    twins = 2 if config.quantize is not None else 1
    grid = len(config.seed_list()) if config.search else grid_size
    n = 0
    if config.prune is not None:
        n += 1 + (grid * twins if config.finetune else 0)
    if isinstance(config.quantize, str) and config.finetune:
        n += 1
    if config.qlora:
        n += grid
    if config.benign_data:
        n += grid * twins
    if config.embedding_attack:
        n += len(config.seed_list())
    return n


def families_for(config: AttackConfig) -> list[Callable[[FamilyContext], Iterator]]:
    """The families `config` asks for, in results order."""
    out: list[Callable[[FamilyContext], Iterator]] = []
    if config.prune is not None:
        out.append(prune_family)
    if isinstance(config.quantize, str) and config.finetune:
        out.append(quantized_original_family)
    if config.qlora:
        out.append(qlora_family)
    if config.benign_data:
        out.append(benign_family)
    if config.embedding_attack:
        out.append(embedding_family)
    return out
