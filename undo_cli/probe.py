"""`undo probe`: how much of the forget knowledge is still linearly readable from the hidden
states? (Łucki et al. 2024: unlearned knowledge often remains in the representations.)

For every checkpoint, data set and layer: the residual state after that layer at the last
prompt token (a prompt/answer record's prompt, a multiple-choice record's question as
formatted for scoring) is the input of a linear probe, a multinomial logistic regression
predicting the answer's first token (prompt/answer sets) or the correct choice (multiple
choice). The records are split by a seeded shuffle into a training part (`train_share`) and
a held-out part; the probe is fitted on the first (L-BFGS on the mean cross-entropy plus
`l2` times the squared weights, features standardised on the training part) and scored on
the second. A probe that reads the answer scores well above the majority-class baseline (the
most frequent training label's share of the held-out part); on shuffled labels it scores at
chance. Layer -1 is the embedding output, 0..L-1 the decoder layers.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from undo_cli.checkpoint import (
    atomic_output,
    build_manifest,
    inspect_checkpoint,
    load_model,
    load_tokenizer,
    write_manifest,
)
from undo_cli.errors import UsageError
from undo_cli.evaluate import choice_prompt, last_token_hidden_states
from undo_cli.jsontext import to_json
from undo_cli.options.commands import TRAIN_SHARE
from undo_cli.plots import matplotlib_available, plot_probes
from undo_cli.records import EvalData, Record
from undo_cli.runtime import pick_device

L2 = 1e-3
MAX_ITER = 200


def probe_inputs(data: EvalData, tokenizer) -> tuple[list[list[int]], list[int]]:
    """(prompt token ids, label) per record: prompt/answer -> the answer's first token;
    multiple choice -> the correct choice's index (the prompt as `undo eval` scores it)."""
    prompts, labels, _ = _probe_items(data, tokenizer)
    return prompts, labels


def _probe_items(data: EvalData, tokenizer) -> tuple[list[list[int]], list[int], list[Record]]:
    """`probe_inputs` and the record of each prompt (for messages)."""

    if data.shape == "completion":
        prompts, labels, records = [], [], []
        for (prompt, answer), rec in zip(data.items, data.records):
            answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
            if not answer_ids:
                continue
            prompts.append(tokenizer(prompt, add_special_tokens=True)["input_ids"])
            labels.append(int(answer_ids[0]))
            records.append(rec)
        return prompts, labels, records
    if data.shape == "choice":
        prompts = [tokenizer(choice_prompt(q, choices)[0], add_special_tokens=True)["input_ids"]
                   for q, choices, _ in data.items]
        return prompts, [int(target) for _, _, target in data.items], list(data.records)
    raise UsageError(f"{data.source}: probing needs prompt/answer or multiple-choice records "
                     "(text records have no label)")


POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def check_fits_model(ckpt: str | Path, config: dict[str, Any], data: EvalData,
                     prompts: Sequence[Sequence[int]], records: Sequence[Record]) -> None:
    """`DataError` (file and line) for a prompt longer than the model's positions or holding a
    token id its embedding does not have (a tokenizer larger than the model's vocabulary):
    both failed inside the forward pass (`IndexError`)."""
    vocab = config.get("vocab_size")
    positions = next((config[k] for k in POSITION_KEYS
                      if isinstance(config.get(k), int) and config[k] > 0), None)
    for ids, rec in zip(prompts, records):
        if positions is not None and len(ids) > positions:
            raise rec.error(f"the prompt is {len(ids)} tokens long, longer than the "
                            f"{positions} positions of {ckpt}: shorten it")
        if isinstance(vocab, int) and ids and max(ids) >= vocab:
            raise rec.error(f"the tokenizer of {ckpt} gives token id {max(ids)}, but the "
                            f"model's embedding has {vocab} rows: a tokenizer larger than "
                            "the model's vocabulary")


def fit_probe(x: torch.Tensor, y: torch.Tensor, classes: int, *, l2: float = L2,
              max_iter: int = MAX_ITER) -> Callable[[torch.Tensor], torch.Tensor]:
    """A multinomial logistic regression fitted on `x` `[N, H]`, labels `y` `[N]` in
    `[0, classes)`: minimise mean CE(x W + b, y) + l2 * |W|^2 with L-BFGS (features
    standardised with the training mean and deviation). Returns the predict function."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    xs = (x - mean) / std
    weight = torch.zeros((x.shape[1], classes), requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(xs @ weight + bias, y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    w, b = weight.detach(), bias.detach()
    return lambda z: ((z - mean) / std @ w + b).argmax(-1)


def probe_layers(states: torch.Tensor, labels: Sequence[int], *, seed: int = 0,
                 train_share: float = TRAIN_SHARE) -> dict[str, Any]:
    """Probe accuracy per layer on a seeded held-out split (module doc) and the baseline."""
    n = len(labels)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    cut = max(1, min(n - 1, round(train_share * n)))
    train, test = order[:cut], order[cut:]
    values = sorted(set(labels))
    index = {v: i for i, v in enumerate(values)}
    y = torch.tensor([index[v] for v in labels])
    majority = Counter(y[train].tolist()).most_common(1)[0][0]
    baseline = float((y[test] == majority).float().mean())
    accuracy = []
    for layer in range(states.shape[0]):
        predict = fit_probe(states[layer, train], y[train], len(values))
        accuracy.append(float((predict(states[layer, test]) == y[test]).float().mean()))
    best = max(range(len(accuracy)), key=lambda i: accuracy[i])
    return {"records": n, "train": len(train), "test": len(test), "classes": len(values),
            "baseline": baseline, "accuracy": accuracy, "layers": list(range(-1, len(accuracy)
                                                                               - 1)),
            "best_layer": best - 1, "best_accuracy": accuracy[best],
            "above_baseline": accuracy[best] - baseline}


def probe_checkpoints(checkpoints: Sequence[str | Path], data: Sequence[EvalData], *,
                      seed: int = 0, train_share: float = TRAIN_SHARE,
                      allow_pickle: bool = False, trust_remote_code: bool = False,
                      base_model: str | Path | None = None, device: str | None = None,
                      on_start: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Probe every checkpoint on every set: `[{"checkpoint", "probes": {set: result}}]`."""

    if not 0 < train_share < 1:
        raise UsageError(f"--train-share must lie between 0 and 1 (got {train_share})")
    # Every prompt of every set, tokenised and checked against every model before any loads.
    inputs: dict[tuple[int, str], tuple[list[list[int]], list[int]]] = {}
    for i, ckpt in enumerate(checkpoints):
        info = inspect_checkpoint(ckpt, allow_pickle=allow_pickle, base_model=base_model)
        tokenizer = load_tokenizer(ckpt, trust_remote_code=trust_remote_code,
                                   base_model=base_model)
        for d in data:
            prompts, labels, records = _probe_items(d, tokenizer)
            if len(labels) < 4:
                raise UsageError(f"{d.source}: probing needs at least 4 records (got "
                                 f"{len(labels)})")
            check_fits_model(ckpt, info.config, d, prompts, records)
            inputs[i, d.name] = prompts, labels
    target = pick_device(device)
    out = []
    for i, ckpt in enumerate(checkpoints):
        if on_start is not None:
            on_start(str(ckpt))
        started = time.time()
        model = load_model(ckpt, device=target, allow_pickle=allow_pickle,
                           trust_remote_code=trust_remote_code, base_model=base_model)
        probes = {}
        for d in data:
            prompts, labels = inputs[i, d.name]
            states = last_token_hidden_states(model, prompts)
            probes[d.name] = probe_layers(states, labels, seed=seed, train_share=train_share)
        out.append({"checkpoint": str(ckpt), "probes": probes,
                    "wall_time_s": round(time.time() - started, 3)})
        del model
    return out


def write_probe(out: str | Path, payload: dict[str, Any], checkpoints: Sequence[str | Path], *,
                overwrite: bool = False, started: float | None = None) -> None:
    """`undo probe --out DIR`: probe.json, probe.png (with matplotlib) and undo.json, written
    atomically."""

    started = time.time() if started is None else started
    with atomic_output(out, inputs=list(checkpoints), overwrite=overwrite) as tmp:
        (Path(tmp) / "probe.json").write_text(to_json(payload, indent=2) + "\n")
        if matplotlib_available():
            plot_probes(payload["results"], Path(tmp) / "probe.png")
        write_manifest(tmp, build_manifest(
            "probe", arguments={"checkpoints": [str(c) for c in checkpoints],
                                "seed": payload["seed"], "train_share": payload["train_share"]},
            parents={f"checkpoint{i}": c for i, c in enumerate(checkpoints)},
            wall_time_s=time.time() - started,
            metrics={r["checkpoint"]: {n: p["best_accuracy"] for n, p in r["probes"].items()}
                     for r in payload["results"]}))
