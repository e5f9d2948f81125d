"""Metrics on data files: loss/perplexity, greedy exact-match accuracy, multiple choice.

Used by `undo eval` and, in-process on a model already in memory, by distillation's stop
condition and the relearning attack. The API:
    sets = [load_eval_set("retain", "retain_eval.jsonl", tokenizer)]   # read + tokenise once
    metrics = evaluate_model(model, tokenizer, sets)    # {"retain": {"loss": .., "accuracy": ..}}
    flatten_metrics(metrics)                            # {"retain.loss": .., "retain.accuracy": ..}

`evaluate_model` runs in eval mode under `torch.no_grad` and puts every submodule back in
the train/eval mode it found it in, so it can be called in the middle of training.

The record shape of a file decides its metrics (see `undo_cli.records`):

- `text` (`{"text"}`): `loss`, the mean cross-entropy (nats) over every predicted token of
  every document (token-weighted over the set); `ppl = exp(loss)`; `tokens`, the number of
  predicted tokens; `n`, documents. A document is tokenised with the tokenizer's special tokens
  (a BOS if the tokenizer adds one, no EOS appended), and its tokens from the second on are
  predicted, as `model(ids, labels=ids).loss` does. A document longer than the window
  (`max_length`, default the model's maximum length, at most 4096) is cut into windows of
  that many tokens, each starting at the last token of the previous one, so every token is
  predicted exactly once; the context restarts at each window.
- `completion` (`{"prompt", "completion"|"answer"}`): `loss`, the mean cross-entropy of the
  completion tokens given the prompt, tokenised exactly as training does and as
  lm-evaluation-harness tokenises a context and its continuation
  (`undo_cli.data.encode_prompt_completion`: the prompt's trailing whitespace moves to the
  completion, the whole text is tokenised once and cut after the prompt's tokens; EOS
  appended); `target_delimiter` (default "") goes between prompt and answer.
  `accuracy`: greedy generation from the prompt's tokens (batched, left padding; see
  `undo_cli.generation`), without the whitespace the prompt gave up, cut at EOS and at the
  first stop string (`until`, lm-eval's name; default a newline), equal to the answer after
  stripping whitespace on both sides; two numbers compare as numbers ("84" equals "84.0").
  (lm-eval's `generate_until` generates after the context as given; the two agree on prompts
  that end without whitespace, and on others a BPE model then sees the tokens it was trained
  and scored on.) `tokens`, `n` as above. A sequence longer than the window keeps its last
  tokens.
- `choice` (`{"question", "choices", "answer"}`, answer an index, a digit string or a letter
  A-Z): each choice is scored by the summed log-likelihood of its continuation after the
  question (the lm-evaluation-harness convention); `accuracy` counts questions whose correct
  choice scores highest, `accuracy_norm` the same with each score divided by the length of
  the choice text in characters, without the separating space (lm-eval's `acc_norm`); ties
  go to the first choice. Prompt
  formats (`choice_format`), each exactly lm-eval's (its `target_delimiter` " " between
  context and choice):
    - `qa` (default): context `"Question: {question}\\nAnswer:"`, continuation
      `" " + choice` (lm-eval's ARC layout, `{{question}}` as given);
    - `letters`: context `"{question.strip()}\\nA. {choice 0}\\nB. {choice 1}\\n...
      \\nAnswer:"`, continuations `" A"`, `" B"`, ... (lm-eval's MMLU/WMDP layout; here
      `accuracy_norm` equals `accuracy`);
    - `raw`: context is the question as given, continuation the choice as given (a task with
      `target_delimiter: ""`).
  `target_delimiter` replaces the " " (or raw's ""). Context and continuation are tokenised
  as prompt and completion are (`encode_prompt_completion` without EOS).

Batches: sequences are sorted by length and batched with right padding for scoring (left
padding for generation); results do not depend on the batching. `batch_size=None` picks rows
per batch from a token budget; a CUDA out-of-memory error halves the batch and retries.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from undo_cli.data import (
    encode_prompt_completion,
    encode_text,
    ensure_special_tokens,
    split_pair,
)
from undo_cli.errors import DataError, UsageError
from undo_cli.generation import (
    DEFAULT_UNTIL,
    greedy_generate,
    model_device,
    model_max_length,
    run_batched,
    stop_strings,
    unwrap_model,
)
from undo_cli.options import CHOICE_FORMATS
from undo_cli.records import EvalData, read_eval_data
from undo_cli.stats import proportion_stderr, ratio_stderr, wilson_interval

DEFAULT_MAX_NEW_TOKENS = 32
SCORE_TOKEN_BUDGET = 65536  # tokens per scoring batch when batch_size is None
SCORE_LOGIT_BUDGET = 2**27  # logit elements (tokens x vocabulary) per scoring batch
SCORE_MAX_ROWS = 256
LM_EVAL_HINT = ("--lm-eval-tasks needs lm-evaluation-harness: pip install 'lm_eval[hf]' "
                "(its own tasks download data sets from the Hugging Face Hub: run them with "
                "HF_HUB_OFFLINE=0 or with the data sets cached; local tasks need neither)")

# ----------------------------------------------------------------------------- tokenising


@dataclass
class EvalSet:
    """A data set read, validated and tokenised once, ready for `evaluate_model`.

    `sequences[i]` is scored from token `starts[i]` on (every token at or after it is
    predicted from the ones before). Per shape: `text` -> one sequence per document
    (start 1); `completion` -> prompt + completion (start = prompt length), with the gold
    `answers`; `choice` -> one sequence per choice, `groups[q]` the (first, end) range of
    question q's choices, `targets[q]` its correct choice, `lengths[i]` the length of the
    choice's text in characters (for `accuracy_norm`). `moved[i]` is the whitespace a
    completion item's prompt gave up to its answer (`split_pair`); `shown[i]` what a sample
    log shows of item i (its texts).
    """

    name: str
    shape: str
    source: str
    n: int
    sequences: list[list[int]] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    groups: list[tuple[int, int]] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    moved: list[str] = field(default_factory=list)
    shown: list[dict[str, Any]] = field(default_factory=list)


DEFAULT_DELIMITERS = {"qa": " ", "letters": " ", "raw": ""}  # lm-eval's target_delimiter


def choice_prompt(question: str, choices: Sequence[str], fmt: str = "qa",
                  target_delimiter: str | None = None) -> tuple[str, list[str]]:
    """(context, continuations) of a multiple-choice question in format `fmt` (module doc):
    each continuation is `target_delimiter` (default: the format's) + the choice, as lm-eval
    builds them."""
    if fmt not in CHOICE_FORMATS:
        raise UsageError(f"unknown choice format {fmt!r}; choose one of "
                         f"{', '.join(CHOICE_FORMATS)}")
    delimiter = DEFAULT_DELIMITERS[fmt] if target_delimiter is None else target_delimiter
    if fmt == "qa":
        return f"Question: {question}\nAnswer:", [delimiter + c for c in choices]
    if fmt == "letters":
        letters = [chr(ord("A") + i) for i in range(len(choices))]
        lines = [question.strip()] + [f"{x}. {c}" for x, c in zip(letters, choices)]
        return "\n".join(lines) + "\nAnswer:", [delimiter + x for x in letters]
    return question, [delimiter + c for c in choices]


def tokenize_eval_data(data: EvalData, tokenizer, *, choice_format: str = "qa",
                       target_delimiter: str | None = None) -> EvalSet:
    """Tokenise validated data with `tokenizer` (the same tokenisation training uses);
    `target_delimiter` goes between prompt and answer (default "") or question and choice
    (default: the format's)."""

    if choice_format not in CHOICE_FORMATS:
        raise UsageError(f"unknown choice format {choice_format!r}; choose one of "
                         f"{', '.join(CHOICE_FORMATS)}")
    ensure_special_tokens(tokenizer)
    out = EvalSet(name=data.name, shape=data.shape, source=data.source, n=len(data.items))
    if data.shape == "text":
        for text in data.items:
            out.sequences.append(encode_text(tokenizer, text, special=True))
            out.starts.append(1)
            out.shown.append({"text": text})
        if all(len(s) < 2 for s in out.sequences):
            raise DataError("no text record has two or more tokens: nothing to predict",
                            data.source)
    elif data.shape == "completion":
        delimiter = target_delimiter or ""
        for rec, (prompt, answer) in zip(data.records, data.items):
            ids, labels = encode_prompt_completion(tokenizer, prompt, delimiter + answer)
            start = _prompt_length(ids, labels)
            if start == 0:
                raise rec.error("the prompt is empty (and the tokenizer adds no BOS token): "
                                "there is nothing to generate from")
            out.sequences.append(ids)
            out.starts.append(start)
            out.answers.append(answer)
            context, continuation = split_pair(prompt, delimiter + answer)
            out.moved.append(continuation[:len(continuation) - len(continuation.lstrip())])
            out.shown.append({"prompt": prompt, "target": answer})
    else:
        for rec, (question, choices, target) in zip(data.records, data.items):
            context, continuations = choice_prompt(question, choices, choice_format,
                                                   target_delimiter)
            out.shown.append({"context": context, "choices": continuations,
                              "target": int(target)})
            first = len(out.sequences)
            shown = ([chr(ord("A") + k) for k in range(len(choices))]
                     if choice_format == "letters" else choices)
            for cont, text in zip(continuations, shown):
                ids, labels = encode_prompt_completion(tokenizer, context, cont, add_eos=False)
                start = _prompt_length(ids, labels)
                if start == 0:
                    raise rec.error("the question is empty (and the tokenizer adds no BOS "
                                    "token): nothing to condition the choices on")
                if start == len(ids):
                    raise rec.error(f"choice {cont!r} has no tokens")
                out.sequences.append(ids)
                out.starts.append(start)
                out.lengths.append(len(text))
            out.groups.append((first, len(out.sequences)))
            out.targets.append(target)
    return out


def _prompt_length(ids: Sequence[int], labels: Sequence[int]) -> int:
    """Prompt tokens of an `encode_prompt_completion` pair: labels differ from the ids (they
    are masked) exactly on the prompt."""
    n = 0
    while n < len(labels) and labels[n] != ids[n]:
        n += 1
    return n


def load_eval_set(name: str, path: str | Path, tokenizer, limit: int | None = None,
                  seed: int = 0, *, choice_format: str = "qa",
                  target_delimiter: str | None = None) -> EvalSet:
    """Read, validate and tokenise a data file (or built-in set) once for `evaluate_model`."""
    data = read_eval_data(name, path, limit=limit, seed=seed)
    return tokenize_eval_data(data, tokenizer, choice_format=choice_format,
                              target_delimiter=target_delimiter)


# ----------------------------------------------------------------------------- scoring


def _windows(ids: list[int], start: int, length: int, chunk: bool) -> list[tuple[list[int], int]]:
    """(window, start) pairs covering the scored tokens of `ids` with windows <= `length`.

    `chunk`: windows overlapping by one token (each token predicted once, module doc);
    otherwise one window holding the last `length` tokens.
    """
    if len(ids) <= length:
        return [(ids, start)]
    if not chunk:
        cut = len(ids) - length
        return [(ids[cut:], max(1, start - cut))]
    out = []
    pos = 0
    while pos < len(ids) - 1:
        window = ids[pos:pos + length]
        out.append((window, max(1, start - pos)))
        pos += length - 1
    return [(w, s) for w, s in out if s < len(w)]


def _vocab_size(model) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and hasattr(head, "weight"):
        return int(head.weight.shape[0])
    config = model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(getattr(config, "vocab_size", 32000))


def score_sequences(model, requests: Sequence[tuple[Sequence[int], int]], *,
                    batch_size: int | None = None, pad_id: int = 0,
                    device: torch.device | str | None = None) -> list[tuple[float, int]]:
    """Per (ids, start): the summed log-probability of `ids[start:]`, each token given the
    ones before it, and the number of those tokens. Batched with right padding; the caller
    sets eval mode and `torch.no_grad`."""
    model = unwrap_model(model)
    device = torch.device(device) if device is not None else model_device(model)
    vocab = _vocab_size(model)
    results: list[tuple[float, int]] = [(0.0, 0)] * len(requests)
    order = sorted(range(len(requests)), key=lambda i: (-len(requests[i][0]), i))

    def rows_for(rest: Sequence[int]) -> int:
        width = len(requests[rest[0]][0])
        return min(SCORE_MAX_ROWS, SCORE_TOKEN_BUDGET // width,
                   SCORE_LOGIT_BUDGET // (width * vocab))

    def run(chunk: Sequence[int]) -> None:
        width = max(len(requests[i][0]) for i in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            seq = requests[i][0]
            ids[row, :len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[row, :len(seq)] = 1
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        # Ids past the output vocabulary (a soft prompt's, before `start`) are never scored.
        targets = ids[:, 1:].clamp(max=logprobs.shape[-1] - 1)
        token_lp = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).double().cpu()
        for row, i in enumerate(chunk):
            seq, start = requests[i]
            values = token_lp[row, start - 1:len(seq) - 1]
            results[i] = (float(values.sum()), int(values.numel()))

    run_batched(order, rows_for, run, batch_size)
    return results


# ----------------------------------------------------------------------------- metrics

_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


def answers_match(generated: str, answer: str) -> bool:
    """Exact match after stripping whitespace from both (`generated` was cut at the stop
    strings, `--until`); two numbers compare as numbers ("84" equals "84.0")."""
    a = generated.strip()
    b = str(answer).strip()
    if a == b:
        return True
    if _NUMBER.fullmatch(a) and _NUMBER.fullmatch(b):
        return float(a) == float(b)
    return False


def _loss_metrics(scores: list[tuple[float, int]]) -> dict[str, float]:
    total = sum(s for s, _ in scores)
    count = sum(n for _, n in scores)
    loss = -total / count if count else float("nan")
    stderr = ratio_stderr([-s for s, _ in scores], [n for _, n in scores])
    return {"loss": loss, "loss_stderr": stderr, "tokens": count}


def _accuracy_metrics(name: str, outcomes: list[float]) -> dict[str, float]:
    """`name` (the mean of 0/1 outcomes), its standard error (lm-eval's `acc_stderr`) and
    its 95% Wilson interval (`name_lower`, `name_upper`)."""
    n = len(outcomes)
    lower, upper = wilson_interval(sum(outcomes), n)
    return {name: sum(outcomes) / n if n else float("nan"),
            f"{name}_stderr": proportion_stderr(outcomes), f"{name}_lower": lower,
            f"{name}_upper": upper}


def _eval_share(model) -> tuple[int, int]:
    """`(rank, world)` over which evaluation work is split.

    Under a multi-process launch (a process group exists) each process scores and generates
    for its own contiguous share of the requests, and all gather the results in order: the
    same numbers as one process, each process doing about 1/N of the work. `(0, 1)` without
    a process group, and for a sharded model (FSDP DTensors, DeepSpeed ZeRO-3), whose every
    forward is a collective that all processes must take part in: there each process
    evaluates everything.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return 0, 1
    if any(hasattr(p, "to_local") or hasattr(p, "ds_id") for p in model.parameters()):
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _shared_map(function: Callable[[list], list], items: list, share: tuple[int, int]) -> list:
    """`function(items)`, computed share by share: process `rank` of `world` maps its
    contiguous slice and the slices are gathered back in order."""
    rank, world = share
    if world == 1:
        return function(items)
    import torch.distributed as dist

    size = -(-len(items) // world)
    mine = items[rank * size:(rank + 1) * size]
    parts: list[list | None] = [None] * world
    dist.all_gather_object(parts, function(mine) if mine else [])
    return [x for part in parts for x in part]


def _evaluate_set(model, tokenizer, es: EvalSet, *, batch_size: int | None,
                  max_new_tokens: int, generate: bool, max_length: int,
                  device: torch.device, share: tuple[int, int] = (0, 1),
                  until: Sequence[str] = DEFAULT_UNTIL, samples: list | None = None
                  ) -> tuple[dict[str, float], list[str] | None, dict[str, Any]]:
    """(metrics, generated answers or None, per-item results): `accuracy` / `accuracy_norm`
    0/1 per item, `loss` as `(sums, counts)` of each item's negative log-likelihood and
    tokens. `samples`, if given, gets one record per item (`sample_records`)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    chunk = es.shape == "text"
    requests: list[tuple[list[int], int]] = []
    owner: list[int] = []
    for i, (seq, start) in enumerate(zip(es.sequences, es.starts)):
        for window, first in _windows(seq, start, max_length, chunk):
            if first < len(window):  # something to predict
                requests.append((window, first))
                owner.append(i)
    scores = _shared_map(lambda mine: score_sequences(model, mine, batch_size=batch_size,
                                                      pad_id=pad, device=device),
                         requests, share)
    per_seq = [(0.0, 0)] * len(es.sequences)
    for i, (s, n) in zip(owner, scores):
        per_seq[i] = (per_seq[i][0] + s, per_seq[i][1] + n)

    items: dict[str, Any] = {"loss": ([-s for s, _ in per_seq], [n for _, n in per_seq])}
    if es.shape == "text":
        metrics = _loss_metrics(per_seq)
        metrics["ppl"] = math.exp(metrics["loss"]) if metrics["loss"] < 700 else float("inf")
        metrics["n"] = es.n
        if samples is not None:
            samples += [{**shown, "loglikelihood": s, "tokens": n}
                        for shown, (s, n) in zip(es.shown, per_seq)]
        return _ordered(metrics, ("loss", "loss_stderr", "ppl", "tokens", "n")), None, items
    if es.shape == "completion":
        metrics = _loss_metrics(per_seq)
        answers = None
        if generate:
            prompts = [seq[:start] for seq, start in zip(es.sequences, es.starts)]
            answers = _shared_map(
                lambda mine: greedy_generate(model, tokenizer, [prompts[i] for i in mine],
                                             max_new_tokens=max_new_tokens,
                                             batch_size=batch_size, max_length=max_length,
                                             device=device, until=until,
                                             prefixes=[es.moved[i] for i in mine]),
                list(range(len(prompts))), share)
            items["accuracy"] = [float(answers_match(a, b)) for a, b in zip(answers, es.answers)]
            metrics.update(_accuracy_metrics("accuracy", items["accuracy"]))
        metrics["n"] = es.n
        if samples is not None:
            for i, (shown, (s, n)) in enumerate(zip(es.shown, per_seq)):
                record = {**shown, "loglikelihood": s, "tokens": n}
                if answers is not None:
                    record.update(generated=answers[i], correct=bool(items["accuracy"][i]))
                samples.append(record)
        order = ("loss", "loss_stderr", "accuracy", "accuracy_stderr", "accuracy_lower",
                 "accuracy_upper", "tokens", "n")
        return _ordered(metrics, order), answers, items
    correct, correct_norm = [], []
    for q, ((first, end), target) in enumerate(zip(es.groups, es.targets)):
        ll = [per_seq[j][0] for j in range(first, end)]
        norm = [per_seq[j][0] / es.lengths[j] for j in range(first, end)]
        best = max(range(len(ll)), key=lambda k: (ll[k], -k))
        best_norm = max(range(len(norm)), key=lambda k: (norm[k], -k))
        correct.append(float(best == target))
        correct_norm.append(float(best_norm == target))
        if samples is not None:
            samples.append({**es.shown[q], "loglikelihoods": ll, "predicted": best,
                            "predicted_norm": best_norm, "correct": best == target,
                            "correct_norm": best_norm == target})
    items = {"accuracy": correct, "accuracy_norm": correct_norm}
    return {**_accuracy_metrics("accuracy", correct),
            **_accuracy_metrics("accuracy_norm", correct_norm), "n": es.n}, None, items


def _ordered(metrics: dict[str, float], keys: Sequence[str]) -> dict[str, float]:
    return {k: metrics[k] for k in keys if k in metrics}


def evaluate_model(model, tokenizer, sets: Sequence[EvalSet], *, batch_size: int | None = None,
                   max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, generate: bool = True,
                   max_length: int | None = None, device: torch.device | str | None = None,
                   answers: dict[str, list[str]] | None = None,
                   items: dict[str, dict[str, Any]] | None = None,
                   until: Sequence[str] | None = None,
                   samples: dict[str, list[dict[str, Any]]] | None = None
                   ) -> dict[str, dict[str, float]]:
    """Metrics of `model` on each set: `{set name: {metric: value}}` (module doc), with the
    uncertainty of each (`METRIC_stderr`; `METRIC_lower`/`_upper`, a 95% Wilson interval, for
    accuracies).

    `batch_size`: rows per batch (None: from a token budget). `generate=False` skips greedy
    generation (no `accuracy` on completion sets). `max_length`: the window (default: the
    model's maximum length, at most 4096). `device`: where inputs go (default: the model's).
    `answers`: if given, filled with each completion set's generated answers; `items`: with
    each set's per-item results (`_evaluate_set`), for bootstraps; `samples`: with one record
    per item (`--log-samples`: its texts, log-likelihoods, generated answer, correct or
    not). `until`: the stop strings of generation (default a newline). Runs in eval
    mode under `torch.no_grad`; every submodule's train/eval mode is restored afterwards.
    Under a multi-process launch every process must call it: the work is split among them
    (`_eval_share`) and every process gets all the metrics.
    """
    if batch_size is not None and batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1 (got {batch_size})")
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1 (got {max_new_tokens})")
    names = [s.name for s in sets]
    if len(set(names)) != len(names):
        raise UsageError(f"data set names must be unique (got {names})")
    model = unwrap_model(model)
    window = max_length or model_max_length(model)
    if window < 2:
        raise UsageError(f"--max-length must be at least 2 (got {window})")
    device = torch.device(device) if device is not None else model_device(model)
    share = _eval_share(model)
    modes = {m: m.training for m in model.modules()}
    results: dict[str, dict[str, float]] = {}
    try:
        model.eval()
        with torch.no_grad():
            for es in sets:
                logged = [] if samples is not None else None
                results[es.name], generated, per_item = _evaluate_set(
                    model, tokenizer, es, batch_size=batch_size, max_new_tokens=max_new_tokens,
                    generate=generate, max_length=window, device=device, share=share,
                    until=stop_strings(until), samples=logged)
                if samples is not None:
                    samples[es.name] = [{"index": i, **r} for i, r in enumerate(logged)]
                if answers is not None and generated is not None:
                    answers[es.name] = generated
                if items is not None:
                    items[es.name] = per_item
    finally:
        for module, training in modes.items():
            module.training = training
    return results


# Metrics each record shape produces (with generation), as `evaluate_model` computes them.
SHAPE_METRICS = {"text": ("loss", "loss_stderr", "ppl", "tokens", "n"),
                 "completion": ("loss", "loss_stderr", "accuracy", "accuracy_stderr",
                                "accuracy_lower", "accuracy_upper", "tokens", "n"),
                 "choice": ("accuracy", "accuracy_stderr", "accuracy_lower", "accuracy_upper",
                            "accuracy_norm", "accuracy_norm_stderr", "accuracy_norm_lower",
                            "accuracy_norm_upper", "n")}


def expected_metrics(sets: Sequence[Any]) -> list[str]:
    """The flat metric names `evaluate_model` gives for these eval sets (with generation), known
    before any model is loaded: commands check `--forget-metric`, `--stop-when` and `--fail-if`
    names against them."""
    return [f"{s.name}.{m}" for s in sets for m in SHAPE_METRICS.get(s.shape, ())]


def flatten_metrics(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    """`{"retain": {"accuracy": x}}` -> `{"retain.accuracy": x}`."""
    return {f"{name}.{key}": value for name, values in metrics.items()
            for key, value in values.items()}


def last_token_hidden_states(model: torch.nn.Module, prompts: Sequence[Sequence[int]],
                             batch_size: int = 16) -> torch.Tensor:
    """`[layers + 1, len(prompts), H]` (float32, on the CPU): the residual state after the
    embedding and after every decoder layer at each prompt's last token (prompts right-padded
    in batches; used by `undo probe` and the `--ablate-direction` attack)."""
    device = next(model.parameters()).device
    rows: list[torch.Tensor] = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, p in enumerate(chunk):
                ids[row, :len(p)] = torch.tensor(list(p))
                mask[row, :len(p)] = 1
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                        output_hidden_states=True, use_cache=False)
            last = (mask.sum(1) - 1).to(device)
            index = torch.arange(len(chunk), device=device)
            rows.append(torch.stack([h[index, last].float().cpu() for h in out.hidden_states]))
    return torch.cat(rows, dim=1)
