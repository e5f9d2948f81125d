"""Distillation on outputs: forward KL(teacher || student) over next-token distributions.

Loss functions come first (pure functions, formula in each docstring), then the model-level
pieces (logits computed in chunks from hidden states, the teacher cache) and the command's
library entry point `distill_checkpoint`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from undo_cli.errors import UndoError, UsageError

IGNORE_INDEX = -100


# ------------------------------------------------------------------------------------ losses


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
               temperature: float = 1.0) -> torch.Tensor:
    """Per-row KL(p || q) = sum_v p_v (log p_v - log q_v), p = softmax(teacher / T),
    q = softmax(student / T). Rows are positions (`[N, V]` -> `[N]`), computed in fp32.

    This is the true KL, teacher entropy included (it is 0 when the distributions match).
    """
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def topk_forward_kl(student_logits: torch.Tensor, teacher_topk_logprobs: torch.Tensor,
                    teacher_topk_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL between the teacher's top-k distribution plus one "rest" bucket and the student's
    distribution coarsened the same way, per row (`[N, V]`, `[N, k]`, `[N, k]` -> `[N]`):

    KL = sum_{i in topk} p_i (log p_i - log q_i) + r (log r - log q_rest),
    r = 1 - sum_{topk} p_i, q_rest = sum_{v not in topk} q_v (0 * log 0 taken as 0).

    With k = V it equals `forward_kl`; for k < V it is a lower bound of the full KL (the
    data-processing inequality) that stays well defined because the remaining mass is kept.
    `teacher_topk_logprobs` are log-probabilities at the same temperature.
    """
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_q_top = log_q.gather(-1, teacher_topk_ids.long())
    log_p_top = teacher_topk_logprobs.float()
    p_top = log_p_top.exp()
    kl_top = (p_top * (log_p_top - log_q_top)).sum(-1)
    # Remaining teacher mass; below 1e-6 it is rounding error (e.g. k = V) and counts as 0.
    rest_p = 1.0 - p_top.sum(-1)
    rest_p = torch.where(rest_p > 1e-6, rest_p, torch.zeros_like(rest_p))
    # log of the student's mass outside the top-k, computed stably with the top-k masked out
    # (clamped so that an empty rest, -inf, gives no NaN gradient).
    masked = log_q.scatter(-1, teacher_topk_ids.long(), float("-inf"))
    log_q_rest = torch.logsumexp(masked, dim=-1).clamp_min(-1e4)
    rest_term = rest_p * (torch.log(rest_p.clamp_min(1e-30)) - log_q_rest)
    return kl_top + rest_term


def next_token_mask(labels: torch.Tensor) -> torch.Tensor:
    """`[B, T]` bool: position t is distilled when its next token `labels[:, t+1]` is kept.

    The last position has no next token and is never used (as in the causal LM loss).
    """
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 labels: torch.Tensor, temperature: float = 1.0,
                 ce_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """loss = T^2 * mean_{kept t} KL(p_T(.|t) || q_T(.|t)) + ce_weight * CE(student, labels).

    `[B, T, V]` logits, `[B, T]` labels (-100 = not distilled). Returns the loss and its terms:
    `kd_loss` (the mean KL itself, at temperature T) and `ce` (the hard-label cross-entropy,
    computed only when `ce_weight` > 0). The T^2 factor keeps gradient scales comparable across
    temperatures (Hinton et al.); at T = 1 the loss is the KL.
    """
    mask = next_token_mask(labels)
    kl = forward_kl(student_logits[mask], teacher_logits[mask], temperature)
    count = mask.sum().clamp_min(1)
    kd = kl.sum() / count
    loss = temperature**2 * kd
    terms = {"kd_loss": kd.detach()}
    if ce_weight > 0:
        targets = labels[:, 1:][mask[:, :-1]]
        ce = F.cross_entropy(student_logits[:, :-1][mask[:, :-1]].float(), targets,
                             reduction="sum") / count
        loss = loss + ce_weight * ce
        terms["ce"] = ce.detach()
    return loss, terms


# --------------------------------------------------------------- chunked logits from hidden


def output_logits(model, hidden: torch.Tensor, head=None) -> torch.Tensor:
    """The LM head applied to final hidden states, with Gemma-2-style soft-capping if set.

    `head`, if given, is called instead of the model's own output embedding module."""
    logits = (head if head is not None else model.get_output_embeddings())(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def final_hidden(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """`[B, T, H]` final hidden states (after the final norm), without computing logits."""
    out = model.base_model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def chunked_distill_loss(student, teacher, batch: dict[str, torch.Tensor], *,
                         temperature: float = 1.0, ce_weight: float = 0.0,
                         chunk_size: int = 1024) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`distill_loss` computed `chunk_size` kept positions at a time from hidden states.

    Neither model's full `[B, T, V]` logits ever exist: each chunk's logits are computed from
    the final hidden states and the student's are recomputed in the backward pass (activation
    checkpointing), so peak memory grows with `chunk_size * V` instead of `B * T * V`. Value
    and gradient equal the plain loss (tests/test_distill_losses.py).
    """
    loss_fn = kd_loss_fn(teacher, temperature=temperature, ce_weight=ce_weight,
                         chunk_size=chunk_size)
    return loss_fn(student, {"train": batch})


def _unwrap(model):
    """The module inside a DDP / accelerate wrapper (the model itself otherwise)."""
    return getattr(model, "module", model)


def _is_fsdp(model) -> bool:
    """True for a model sharded by FSDP2 (`fully_shard`)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _gathered_head(model):
    """The student's LM head as a function of hidden states for the chunked loss, or None.

    Without FSDP: the output embedding module itself. Under FSDP2 the head module must not
    be called outside the model's forward: its hooks would register a second post-backward
    for its unit (accelerate's final norm + head), which then frees the norm's weight before
    the norm's backward (a segmentation fault on the CPU). So the unit is kept gathered from
    forward to backward (`set_reshard_after_forward(False)`, as accelerate sets it) and the
    head is applied with `F.linear` on its gathered weight, bypassing the hooks: exact, and
    its gradient lands where FSDP reduce-scatters from. None (the caller then takes the full
    logits from the forward) for a head that is not an `nn.Linear`.
    """
    head = _unwrap(model).get_output_embeddings()
    if not _is_fsdp(model):
        return head
    if not isinstance(head, torch.nn.Linear) or type(head).forward is not torch.nn.Linear.forward:
        return None  # (FSDP swaps the class for a subclass of its own, same forward)
    if _is_fsdp(head):
        head.set_reshard_after_forward(False, recurse=False)

    def apply(hidden: torch.Tensor) -> torch.Tensor:
        if hasattr(head.weight, "to_local"):  # a DTensor: the unit was resharded
            raise UndoError("distill under FSDP: the LM head's weight is sharded after the "
                            "forward; wrap the head in an FSDP unit of its own (accelerate's "
                            "default) or run without FSDP")
        return F.linear(hidden, head.weight, head.bias)

    return apply


def student_hidden_states(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Final hidden states through the model's own forward (so DDP sees the call), with the LM
    head applied to one position only (`logits_to_keep=1`): the full logits never exist."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                output_hidden_states=True, logits_to_keep=1)
    return out.hidden_states[-1]


def kd_loss_fn(teacher, *, temperature: float = 1.0, ce_weight: float = 0.0,
               chunk_size: int = 1024, stream: str = "train"):
    """The engine loss of distillation: chunked forward KL to `teacher` on `stream`'s batches.

    A batch that carries cached teacher outputs (`teacher_topk_logprobs`, `teacher_topk_ids`
    for its kept positions, see `TeacherCache`) is scored with `topk_forward_kl` instead, and
    the teacher is not run.
    """

    def loss_fn(model, batches):
        batch = batches[stream]
        mask = next_token_mask(batch["labels"])
        count = mask.sum().clamp_min(1)
        targets = torch.zeros_like(batch["labels"])
        targets[:, :-1] = batch["labels"][:, 1:]
        kept_targets = targets[mask]
        head_owner = _unwrap(model)
        cached = "teacher_topk_ids" in batch
        if cached:
            teacher_rows = (batch["teacher_topk_logprobs"], batch["teacher_topk_ids"])
        else:
            with torch.no_grad():
                teacher_rows = final_hidden(teacher, batch)[mask]
        head = _gathered_head(model)
        whole = head is None  # FSDP with a head we cannot call: full logits from the forward
        if whole:
            student_rows = model(input_ids=batch["input_ids"],
                                 attention_mask=batch.get("attention_mask")).logits[mask]
        else:
            student_rows = student_hidden_states(model, batch)[mask]

        def chunk_terms(h_student, target_rows, y, *topk):
            z_student = h_student if whole else output_logits(head_owner, h_student, head)
            if topk:
                kl = topk_forward_kl(z_student, topk[0], topk[1], temperature).sum()
            else:
                with torch.no_grad():
                    z_teacher = output_logits(teacher, target_rows)
                kl = forward_kl(z_student, z_teacher, temperature).sum()
            ce = (F.cross_entropy(z_student.float(), y, reduction="sum") if ce_weight > 0
                  else torch.zeros((), device=kl.device))
            return kl, ce

        kl_sum = student_rows.new_zeros((), dtype=torch.float32)
        ce_sum = student_rows.new_zeros((), dtype=torch.float32)
        step = max(1, chunk_size)
        for start in range(0, student_rows.shape[0], step):
            sl = slice(start, start + step)
            if cached:
                args = (student_rows[sl], None, kept_targets[sl],
                        teacher_rows[0][sl], teacher_rows[1][sl])
            else:
                args = (student_rows[sl], teacher_rows[sl], kept_targets[sl])
            kl, ce = (chunk_terms(*args) if whole
                      else checkpoint(chunk_terms, *args, use_reentrant=False))
            kl_sum = kl_sum + kl
            ce_sum = ce_sum + ce
        kd = kl_sum / count
        loss = temperature**2 * kd
        terms = {"kd_loss": kd.detach()}
        if ce_weight > 0:
            loss = loss + ce_weight * ce_sum / count
            terms["ce"] = (ce_sum / count).detach()
        return loss, terms

    return loss_fn


# --------------------------------------------------------------------------- teacher cache


CACHE_INFO = "cache.json"
TOKENS_KEY = "global_tokens"  # metadata of a cached micro-batch: its tokens over all processes
RANDOM_STUDENT_SEED_OFFSET = 7919


class TeacherCache:
    """A batch stream wrapper that stores (or reads back) the teacher's top-k outputs.

    Each micro-batch `i` of the wrapped stream is kept in `DIR/mb-{i}-r{rank}of{world}.safetensors`
    with its inputs and, for every distilled position, the teacher's `k` largest
    log-probabilities (at the distillation temperature) and their token ids. A later run with
    the same teacher, data, seed, batch size, sequence length, temperature and k reads batches
    from the cache instead of running the teacher, so a sweep over alpha pays for the teacher
    once. Batches beyond the cached ones are computed and added. `DIR/cache.json` holds the key;
    a cache made with other settings is refused.
    """

    def __init__(self, stream, teacher, directory: str | Path, key: dict, *, k: int,
                 temperature: float = 1.0, device: torch.device | None = None):
        self.stream, self.teacher = stream, teacher
        self.directory = Path(directory)
        self.k, self.temperature = k, temperature
        self.device = device
        self.rank, self.world = 0, 1
        self.key = {**key, "k": k, "temperature": temperature}
        self.hits = 0
        self.teacher_tokens = 0  # tokens the teacher was run on (FLOP accounting)
        info_file = self.directory / CACHE_INFO
        if info_file.is_file():
            stored = json.loads(info_file.read_text())
            if stored != json.loads(json.dumps(self.key)):
                diff = sorted(k for k in set(stored) | set(self.key)
                              if stored.get(k) != json.loads(json.dumps(self.key)).get(k))
                raise UsageError(f"--cache-teacher {directory} was made with other settings "
                                 f"({', '.join(diff)} differ); use another directory")
        else:
            self.directory.mkdir(parents=True, exist_ok=True)
            info_file.write_text(json.dumps(self.key, indent=2) + "\n")

    # The engine talks to streams through these.
    def shard(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world
        self.stream.shard(rank, world)
        self.key["processes"] = world

    def __getattr__(self, name: str):
        return getattr(self.stream, name)

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)

    def __iter__(self):
        return self

    def _file(self, index: int) -> Path:
        return self.directory / f"mb-{index:08d}-r{self.rank}of{self.world}.safetensors"

    def __next__(self) -> dict[str, torch.Tensor]:
        from safetensors import safe_open
        from safetensors.torch import save_file

        index = self.stream.position
        file = self._file(index)
        if file.is_file():
            with safe_open(str(file), "pt") as f:
                batch = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a dict)
                stored = (f.metadata() or {}).get(TOKENS_KEY)
            self.stream.position = index + 1  # batches are a pure function of the position
            # The engine counts tokens from the stream's `last_tokens` (the global micro-batch,
            # all processes): restore the count stored with the batch (None: the engine
            # counts this process's tokens times the processes).
            self.stream.last_tokens = int(stored) if stored is not None else None
            self.hits += 1
            return batch
        batch = next(self.stream)
        mask = next_token_mask(batch["labels"])
        device = self.device or next(self.teacher.parameters()).device
        with torch.no_grad():
            on_device = {k: v.to(device) for k, v in batch.items()}
            hidden = final_hidden(self.teacher, on_device)[mask.to(device)]
            logprobs = torch.log_softmax(
                output_logits(self.teacher, hidden).float() / self.temperature, dim=-1)
            top_lp, top_ids = logprobs.topk(min(self.k, logprobs.shape[-1]), dim=-1)
        self.teacher_tokens += int(batch["attention_mask"].sum()) * self.world
        batch = {**batch, "teacher_topk_logprobs": top_lp.cpu().contiguous(),
                 "teacher_topk_ids": top_ids.to(torch.int32).cpu().contiguous()}
        tmp = file.with_name(file.name + ".tmp")
        tokens = getattr(self.stream, "last_tokens", None)
        save_file({k: v.contiguous() for k, v in batch.items()}, str(tmp),
                  metadata={TOKENS_KEY: str(tokens)} if tokens is not None else None)
        os.replace(tmp, file)
        return batch


# --------------------------------------------------------------------------- the command


@dataclass
class DistillSettings:
    """What `undo distill` adds to the shared training options."""

    temperature: float = 1.0
    ce_weight: float = 0.0
    chunk_size: int = 1024
    alpha: float | None = None
    beta: float | None = None
    noise: str = "xavier-uniform"
    perturb_seed: int = 0
    stop_when: str | None = None
    cache_dir: Path | None = None
    cache_topk: int = 64
    eval_batch_size: int | None = None
    max_new_tokens: int = 16

    def validate(self) -> None:
        """Raise `UsageError` for impossible settings (named as the CLI options)."""
        if not self.temperature > 0:
            raise UsageError(f"--temperature must be positive (got {self.temperature})")
        if self.ce_weight < 0:
            raise UsageError(f"--ce-weight must not be negative (got {self.ce_weight})")
        if self.chunk_size < 1:
            raise UsageError(f"--kd-chunk-size must be at least 1 (got {self.chunk_size})")
        if (self.alpha is None) != (self.beta is None):
            raise UsageError("--alpha and --beta go together")
        if self.alpha is not None and not 0 <= self.alpha <= 1:
            raise UsageError(f"--alpha must lie in [0, 1] (got {self.alpha})")
        if self.beta is not None and self.beta < 0:
            raise UsageError(f"--beta must not be negative (got {self.beta})")
        if self.cache_topk < 1:
            raise UsageError(f"--cache-topk must be at least 1 (got {self.cache_topk})")


class StopCondition:
    """`--stop-when`: a gate expression comparing student metrics with the teacher's.

    Names are `SET.METRIC` (the student's metric on an `--eval` set), `teacher.SET.METRIC` (the
    teacher's, measured once before training), or bare `teacher`: the teacher's value of the
    one student metric in the expression, e.g. `retain.accuracy >= teacher - 0.05`.
    """

    def __init__(self, text: str):
        from undo_cli.gates import parse_expression

        self.text = text
        try:
            self.expr = parse_expression(text)
        except UsageError as e:
            raise UsageError(f"--stop-when: {e}") from e
        names = set(self.expr.names())
        self.student_names = sorted(n for n in names if n != "teacher"
                                    and not n.startswith("teacher."))
        self.teacher_names = sorted(n for n in names if n.startswith("teacher."))
        self.bare_teacher = "teacher" in names
        if self.bare_teacher and len(self.student_names) != 1:
            raise UsageError(f"--stop-when {text!r}: bare 'teacher' needs exactly one student "
                             "metric to refer to; name it as teacher.SET.METRIC instead")
        if not self.student_names:
            raise UsageError(f"--stop-when {text!r} names no student metric (SET.METRIC)")

    def metrics_needed(self) -> set[str]:
        """Flat metric names (`SET.METRIC`) the condition reads, student and teacher alike."""
        return set(self.student_names) | {n[len("teacher."):] for n in self.teacher_names}

    def check_names(self, available: set[str]) -> None:
        """`UsageError` if the condition reads a metric the eval sets do not produce."""
        missing = sorted(self.metrics_needed() - available)
        if missing:
            raise UsageError(f"--stop-when {self.text!r}: unknown metric(s) {', '.join(missing)}; "
                             f"available: {', '.join(sorted(available)) or 'none (add --eval)'}")

    def holds(self, student: dict[str, float], teacher: dict[str, float]) -> bool:
        values = dict(student)
        values.update({f"teacher.{k}": v for k, v in teacher.items()})
        if self.bare_teacher:
            values["teacher"] = teacher[self.student_names[0]]
        try:
            return bool(self.expr.evaluate(values))
        except UndoError:  # a NaN metric (diverging student) never satisfies the condition
            return False


def build_student(spec: str, teacher, teacher_path: Path, settings: DistillSettings, seed: int,
                  *, allow_pickle: bool = False, trust_remote_code: bool = False):
    """The model to train: a checkpoint, `random` (fresh init with the teacher's config), or,
    with `--alpha/--beta`, the teacher noised in memory exactly as `undo perturb` would."""
    import copy

    from undo_cli.checkpoint import load_model
    from undo_cli.modelfactory import random_model
    from undo_cli.perturb import perturb_model_

    if settings.alpha is not None:
        if spec not in ("teacher", ""):
            raise UsageError("--alpha/--beta noise the teacher in memory: give --student "
                             "teacher (or leave --student out), not another model")
        student = copy.deepcopy(teacher).train().requires_grad_(True)
        perturb_model_(student, settings.alpha, settings.beta, seed=settings.perturb_seed,
                       noise=settings.noise)
        return student
    if spec == "random":
        # A seed of its own: `undo init --seed S` and `--seed S` here must not give the base
        # model's starting weights back.
        return random_model(teacher.config, seed=RANDOM_STUDENT_SEED_OFFSET + seed)
    if spec in ("teacher", ""):
        raise UsageError("--student is needed: a checkpoint directory (e.g. the output of "
                         "`undo perturb`), `random`, or `teacher` with --alpha/--beta")
    return load_model(spec, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)


def check_compatible(teacher, student, teacher_tok, student_tok) -> None:
    """Teacher and student must share the tokenizer and the vocabulary size."""
    tv = teacher.get_output_embeddings().weight.shape[0]
    sv = student.get_output_embeddings().weight.shape[0]
    if tv != sv:
        raise UsageError(f"teacher and student vocabularies differ ({tv} vs {sv} tokens): "
                         "distillation needs the same tokenizer")
    if student_tok is not None and teacher_tok.get_vocab() != student_tok.get_vocab():
        raise UsageError("teacher and student tokenizers differ: distillation needs the same "
                         "tokenizer")


def distill_checkpoint(teacher_path: str | Path, student: str, out: str | Path, *,
                       data: list[str], evals: list[tuple[str, str]], config,
                       max_length: int, settings: DistillSettings, overwrite: bool = False,
                       allow_pickle: bool = False, trust_remote_code: bool = False,
                       arguments: dict | None = None) -> dict:
    """Distil `teacher_path` into `student` (a checkpoint, `random`, or the noised teacher) and
    write the result to `out`; returns the summary printed by `undo distill`.

    `config` is the engine's `TrainConfig` (budgets, optimizer, schedule, state directory);
    `evals` are `(name, path)` sets used by `--stop-when` and the periodic evaluation.
    """
    import time
    from dataclasses import asdict

    from undo_cli.checkpoint import (
        build_manifest,
        check_output_path,
        fingerprint,
        inspect_checkpoint,
        load_model,
        load_tokenizer,
        save_model,
        write_manifest,
    )
    from undo_cli.data import build_stream
    from undo_cli.engine import train, training_device, training_output
    from undo_cli.evaluate import (
        evaluate_model,
        expected_metrics,
        flatten_metrics,
        load_eval_set,
    )

    started = time.time()
    teacher_path = Path(teacher_path)
    settings.validate()
    config.validate()
    stop = StopCondition(settings.stop_when) if settings.stop_when else None
    if stop is not None and not evals:
        raise UsageError("--stop-when needs --eval sets to measure")
    student_is_dir = student not in ("random", "teacher", "")
    inputs = [teacher_path] + ([Path(student)] if student_is_dir else [])
    for path in inputs:
        inspect_checkpoint(path, allow_pickle=allow_pickle)
    check_output_path(out, inputs=inputs, overwrite=overwrite)

    tok = load_tokenizer(teacher_path, trust_remote_code=trust_remote_code)
    student_tok = (load_tokenizer(student, trust_remote_code=trust_remote_code)
                   if student_is_dir else None)
    stream = build_stream(tok, data, max_length, config.batch_size, config.seed, name="train")
    sets = [load_eval_set(name, path, tok) for name, path in evals]
    if stop is not None:  # before any model is loaded
        stop.check_names(set(expected_metrics(sets)))

    device = training_device(config)
    teacher = load_model(teacher_path, allow_pickle=allow_pickle,
                         trust_remote_code=trust_remote_code).to(device).eval()
    teacher.requires_grad_(False)
    model = build_student(student, teacher, teacher_path, settings, config.seed,
                          allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    check_compatible(teacher, model, tok, student_tok)
    limit = getattr(teacher.config, "max_position_embeddings", None) or getattr(
        teacher.config, "n_positions", None)
    if limit is not None and max_length > limit:
        raise UsageError(f"--max-length {max_length} exceeds the model's maximum length {limit}")

    eval_kwargs = dict(batch_size=settings.eval_batch_size,
                       max_new_tokens=settings.max_new_tokens)
    teacher_metrics: dict[str, float] = {}
    if sets:
        teacher_metrics = flatten_metrics(evaluate_model(teacher, tok, sets, **eval_kwargs))

    streams: dict = {"train": stream}
    frozen = sum(p.numel() for p in {id(p): p for p in teacher.parameters()}.values())
    cache = None
    if settings.cache_dir is not None:
        key = {"teacher": fingerprint(teacher_path), "data": list(data),
               "seed": config.seed, "batch_size": config.batch_size, "max_length": max_length}
        cache = TeacherCache(stream, teacher, settings.cache_dir, key, k=settings.cache_topk,
                             temperature=settings.temperature, device=device)
        streams = {"train": cache}
    loss_fn = kd_loss_fn(teacher, temperature=settings.temperature,
                         ce_weight=settings.ce_weight, chunk_size=settings.chunk_size)

    evaluate = should_stop = None
    if sets:
        def evaluate(m, step):  # noqa: ARG001 - the engine passes the step
            return flatten_metrics(evaluate_model(m, tok, sets, **eval_kwargs))
    if stop is not None:
        def should_stop(step, metrics):  # noqa: ARG001
            return f"stop_when: {stop.text}" if stop.holds(metrics, teacher_metrics) else None

    with training_output(out, config, inputs=inputs, overwrite=overwrite) as (tmp, run_config):
        result = train(model, loss_fn, streams, run_config,
                       frozen_forward_params=0 if cache is not None else frozen,
                       evaluate=evaluate, should_stop=should_stop)
        compute = result.compute()
        if cache is not None:  # the teacher ran only on batches missing from the cache
            compute["flops_frozen"] = 2.0 * frozen * cache.teacher_tokens
            compute["flops"] = compute["flops_trained"] + compute["flops_frozen"]
            compute["teacher_cache"] = {"dir": str(settings.cache_dir), "hits": cache.hits,
                                        "teacher_tokens": cache.teacher_tokens}
        compute["flops_student"] = compute["flops_trained"]
        compute["flops_teacher"] = compute["flops_frozen"]
        final = result.final_metrics()
        if tmp is not None:
            save_model(result.model, tok, tmp, source=teacher_path)
            parents = {"teacher": teacher_path}
            if student_is_dir:
                parents["student"] = Path(student)
            write_manifest(tmp, build_manifest(
                "distill", arguments={**(arguments or {}), "settings": asdict(settings)},
                parents=parents, seed=config.seed, wall_time_s=time.time() - started,
                compute=compute, metrics={"train": result.loss, **final},
                extra={"teacher_metrics": teacher_metrics, "stop_reason": result.stop_reason,
                       "parameters": result.parameters,
                       "data": {"train": stream.describe()}},
            ))
    return {"output": str(out), "teacher": str(teacher_path), "student": student,
            "steps": result.steps, "tokens": result.tokens,
            "flops_student": compute["flops_student"], "flops_teacher": compute["flops_teacher"],
            "stop_reason": result.stop_reason, "kd_loss": result.loss.get("kd_loss"),
            "teacher_metrics": teacher_metrics, "metrics": final,
            "diverged_step": result.diverged_step, "resumed_from": result.resumed_from,
            "wall_time_s": round(time.time() - started, 3),
            "is_main_process": result.is_main_process}
