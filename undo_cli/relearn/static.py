"""Attacks without finetuning: prompting with demonstrations (`--few-shot K`) and directional
ablation (`--ablate-direction`). Each is a `StaticAttack` for `run_attack`: given the model and
the measuring function, it yields `(run, attacked model or None)`; a static run is evaluated
once (step 0) and its value holds at every step of the worst case (the attacker can use it at
any time; `undo_cli.relearn.worst_case`).
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from undo_cli.evaluate import last_token_hidden_states
from undo_cli.records import EvalData

FEWSHOT_DELIMITER = "\n\n"  # between demonstrations, and before the prompt (lm-eval's default)
MAX_DIRECTION_PROMPTS = 256  # prompts per side used to estimate a direction


def _static_run(attack: str, config: str, seed: int | None, metrics: dict[str, float],
                seconds: float, **extra: Any) -> dict[str, Any]:
    return {"attack": attack, "config": config, "static": True, "lr": None, "seed": seed,
            "quantize": None, "curve": [{"step": 0, **metrics}], "diverged": False,
            "diverged_step": None, "steps": 0, "tokens": 0, "flops": 0.0,
            "cost": [{"step": 0, "tokens": 0, "flops": 0.0}], "trainable_parameters": 0,
            "train_loss": None, "wall_time_s": seconds, "eval_time_s": seconds, **extra}


# ----------------------------------------------------------------------------- few-shot


def demonstrations(records: Sequence[dict[str, Any]]) -> list[str]:
    """The demonstration texts of attack-data records: a `{"text"}` record's text, a
    `{"prompt", "completion"|"answer"}` record's prompt followed by its completion."""
    out = []
    for rec in records:
        if "text" in rec:
            out.append(str(rec["text"]))
        elif "prompt" in rec:
            out.append(str(rec["prompt"]) + str(rec.get("completion", rec.get("answer", ""))))
    return [d for d in out if d.strip()]


def with_demonstrations(data: EvalData, pool: Sequence[str], k: int, seed: int) -> EvalData:
    """`data` with `k` demonstrations before every prompt (a multiple-choice item's question),
    each item's drawn from `pool` by a generator seeded with (seed, set name, item index):

        DEMO_1 + "\\n\\n" + ... + DEMO_k + "\\n\\n" + PROMPT

    A demonstration that contains the item's own prompt is never drawn (it would show the
    answer: training text can hold the very facts evaluated). Text sets (loss only) are kept
    as they are."""
    if data.shape == "text":
        return data
    items = []
    for index, item in enumerate(data.items):
        prompt = item[0]
        allowed = [d for d in pool if prompt.strip() not in d]
        rng = random.Random(f"{seed}:{data.name}:{index}")
        shots = rng.sample(allowed, min(k, len(allowed)))
        prefix = "".join(d + FEWSHOT_DELIMITER for d in shots)
        items.append((prefix + prompt, *item[1:]))
    return EvalData(name=data.name, shape=data.shape, source=data.source,
                    records=data.records, items=items)


def few_shot_attack(data: Sequence[EvalData], pool: Sequence[str], k: int, seeds: Sequence[int],
                    measure_sets: Callable[[list[EvalData]], dict[str, float]]):
    """The `--few-shot K` attack: one run per seed (different demonstrations), measured by
    `measure_sets(eval data with demonstrations)` on the unchanged model."""

    def attack(model: torch.nn.Module, measure) -> Iterator[tuple[dict[str, Any], None]]:
        for seed in seeds:
            t0 = time.perf_counter()
            sets = [with_demonstrations(d, pool, k, seed) for d in data]
            measure_shots = measure_sets(sets)
            metrics = measure_shots(model)
            run = _static_run("few-shot", f"few-shot k{k}", seed, metrics,
                              time.perf_counter() - t0, few_shot=k)
            run["_items"] = {0: getattr(measure_shots, "items", {})}
            yield run, None

    return attack


# ----------------------------------------------------------------------------- directions


# Modules whose output is added to the residual stream, by their name's last part: attention
# and MLP output projections of Llama / Qwen2 / Gemma-2 / Mistral (o_proj, down_proj), GPT-2
# (c_proj), GPT-NeoX (dense, dense_4h_to_h) and others (out_proj, wo).
RESIDUAL_WRITERS = ("o_proj", "down_proj", "c_proj", "out_proj", "dense", "dense_4h_to_h", "wo")


def residual_writers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The embedding modules and every layer's output projections (`RESIDUAL_WRITERS`)."""
    base = getattr(model, "get_base_model", lambda: model)()
    out = [("embed", base.get_input_embeddings())]
    for name, module in base.named_modules():
        last = name.rsplit(".", 1)[-1]
        weight = getattr(module, "weight", None)
        if weight is None or getattr(weight, "ndim", 0) != 2:
            continue
        if last in ("wpe", "embed_positions") or last in RESIDUAL_WRITERS:
            out.append((name, module))
    return out


def orthogonalize_(model: torch.nn.Module, direction: torch.Tensor) -> int:
    """Project the unit vector `direction` (`[H]`) out of every weight that writes to the
    residual stream, in place (Arditi et al. 2024, "Refusal is mediated by a single
    direction"): with d = direction / |d|,

        W_out <- (I - d d^T) W_out    for a Linear writer (weight [H, in], bias b <- b - (d.b) d)
        W     <- W (I - d d^T)        for a GPT-2 Conv1D writer (weight [in, H])
        E     <- E (I - d d^T)        for embeddings ([V, H] rows written into the stream)

    so no writer can put a component along d into the residual stream, and every component
    orthogonal to d is unchanged. Exact for architectures whose branches write through these
    projections (Llama, Qwen2, Mistral, GPT-2); Gemma-2's norm after each branch rescales the
    output per dimension, so there the direction is removed only approximately. Returns the
    number of tensors changed."""
    d = direction.detach().float()
    d = d / d.norm()
    changed = 0
    with torch.no_grad():
        for _name, module in residual_writers(model):
            w = module.weight
            dd = d.to(w.device, torch.float32)
            wf = w.float()
            if isinstance(module, torch.nn.Linear) and w.shape[0] == dd.shape[0]:
                new = wf - dd[:, None] * (dd[None, :] @ wf)  # outputs are columns: [H, in]
            elif w.shape[-1] == dd.shape[0]:  # embeddings, GPT-2 Conv1D: rows are [*, H]
                new = wf - (wf @ dd)[:, None] * dd[None, :]
            else:
                continue
            w.copy_(new.to(w.dtype))
            changed += 1
            bias = getattr(module, "bias", None)
            if bias is not None and bias.shape[0] == dd.shape[0]:
                b = bias.float()
                bias.copy_((b - (b @ dd) * dd).to(bias.dtype))
    return changed


def last_token_states(model: torch.nn.Module, prompts: Sequence[Sequence[int]],
                      batch_size: int = 16) -> list[torch.Tensor]:
    """Per layer l (0-based), the mean over `prompts` of the residual state after layer l at
    each prompt's last token: `[H]` tensors."""
    states = last_token_hidden_states(model, prompts, batch_size)
    return list(states[1:].mean(1)) if len(prompts) else []


def direction_attack(forget_prompts: Sequence[Sequence[int]],
                     retain_prompts: Sequence[Sequence[int]]):
    """The `--ablate-direction` attack: for each layer l, d_l = mean state(forget) - mean
    state(retain) after layer l at the last prompt token; the model with d_l projected out of
    its weights (`orthogonalize_`) is evaluated; one run per layer (the worst case takes the
    best layer)."""

    def attack(model: torch.nn.Module, measure) -> Iterator[tuple[dict[str, Any], Any]]:
        forget = last_token_states(model, forget_prompts)
        retain = last_token_states(model, retain_prompts)
        for layer, (f, r) in enumerate(zip(forget, retain)):
            t0 = time.perf_counter()
            diff = f - r
            norm = float(diff.norm())
            if norm == 0:
                continue
            ablated = copy.deepcopy(model)
            orthogonalize_(ablated, diff)
            metrics = measure(ablated)
            run = _static_run("ablate-direction", f"ablate-direction layer {layer}", None,
                              metrics, time.perf_counter() - t0, layer=layer,
                              direction_norm=norm)
            run["_items"] = {0: getattr(measure, "items", {})}
            yield run, ablated
            del ablated

    return attack


def sample_prompts(prompts: Sequence[Sequence[int]], seed: int,
                   limit: int = MAX_DIRECTION_PROMPTS) -> list[Sequence[int]]:
    """At most `limit` of `prompts`, a seeded sample in their order."""
    if len(prompts) <= limit:
        return list(prompts)
    picked = sorted(random.Random(seed).sample(range(len(prompts)), limit))
    return [prompts[i] for i in picked]
