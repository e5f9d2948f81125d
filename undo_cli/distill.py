"""Distillation on outputs: forward KL(teacher || student) over next-token distributions.

The loss formulas are in `undo_cli.losses` (`forward_kl`, `topk_forward_kl`, `kd_objective`);
here are the model-level pieces (the KL computed in chunks from hidden states so that the full
logits never exist, the teacher cache), the student's initial weights and the command's
library entry point `distill_checkpoint`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from undo_cli import losses, stage
from undo_cli.data import model_inputs
from undo_cli.errors import UndoError, UsageError
from undo_cli.losses import forward_kl, next_token_mask, topk_forward_kl
from undo_cli.options import (
    DISTILL_EVAL_EVERY,
    DISTILL_STOP_WHEN_CAP,
    TRAIN_STEPS,
    DataOptions,
    DistillOptions,
    EvalOptions,
    LoadOptions,
    NoiseOptions,
    SaveOptions,
    TrainConfig,
    check,
)

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
    out = model.base_model(**model_inputs(batch))
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def chunked_distill_loss(student, teacher, batch: dict[str, torch.Tensor], *,
                         temperature: float = 1.0, ce_weight: float = 0.0,
                         chunk_size: int = 1024) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`distill_loss` computed `chunk_size` kept positions at a time from hidden states.

    Neither model's full `[B, T, V]` logits ever exist: each chunk's logits are computed from
    the final hidden states and the student's are recomputed in the backward pass (activation
    checkpointing), so peak memory grows with `chunk_size * V` instead of `B * T * V`. Value
    and gradient equal the plain loss (tests/unit/test_distill_losses.py).
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
    out = model(**model_inputs(batch), output_hidden_states=True, logits_to_keep=1)
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
            student_rows = model(**model_inputs(batch)).logits[mask]
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
        if "num_targets" in batch:  # the step's mean count (undo_cli.losses, `normalizer`)
            count = batch["num_targets"].to(kl_sum)
        return losses.kd_objective(kl_sum, ce_sum, count, temperature, ce_weight)

    return loss_fn


# --------------------------------------------------------------------------- teacher cache


CACHE_INFO = "cache.json"
TOKENS_KEY = "global_tokens"  # metadata of a cached micro-batch: its tokens over all processes
TARGETS_KEY = "global_targets"  # ... and its predicted tokens
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
                meta = f.metadata() or {}
            self.stream.position = index + 1  # batches are a pure function of the position
            # The engine counts tokens from the stream's `last_tokens` and `last_targets` (the
            # global micro-batch, all processes): restore the counts stored with the batch
            # (None: the engine counts this process's tokens times the processes).
            for attribute, key in (("last_tokens", TOKENS_KEY), ("last_targets", TARGETS_KEY)):
                stored = meta.get(key)
                setattr(self.stream, attribute, int(stored) if stored is not None else None)
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
        counts = {key: getattr(self.stream, attribute, None) for attribute, key in
                  (("last_tokens", TOKENS_KEY), ("last_targets", TARGETS_KEY))}
        save_file({k: v.contiguous() for k, v in batch.items()}, str(tmp),
                  metadata={k: str(v) for k, v in counts.items() if v is not None} or None)
        os.replace(tmp, file)
        return batch


# --------------------------------------------------------------------------- the command


def build_student(spec: str, teacher, noise: NoiseOptions, noise_seed: int, seed: int, *,
                  load: LoadOptions | None = None):
    """The model to train: a checkpoint, `random` (fresh init with the teacher's config), or,
    with `--alpha/--beta`, the teacher noised in memory exactly as `undo perturb` would."""
    import copy

    from undo_cli.checkpoint import load_model
    from undo_cli.modelfactory import random_model
    from undo_cli.perturb import perturb_model_

    load = load or LoadOptions()
    if noise.alpha is not None:
        if spec not in ("teacher", ""):
            raise UsageError("--alpha/--beta noise the teacher in memory: give --student "
                             "teacher (or leave --student out), not another model")
        student = copy.deepcopy(teacher).train().requires_grad_(True)
        perturb_model_(student, noise.alpha, noise.beta, seed=noise_seed, noise=noise.noise,
                       include=noise.include or None, exclude=noise.exclude or None)
        return student
    if spec == "random":
        # A seed of its own: `undo init --seed S` and `--seed S` here must not give the base
        # model's starting weights back.
        return random_model(teacher.config, seed=RANDOM_STUDENT_SEED_OFFSET + seed)
    if spec == "teacher":
        raise UsageError("--student teacher noises the teacher in memory: give --alpha A "
                         "--beta B (the paper: --alpha 0.6 --beta 0.1)")
    if spec == "":
        raise UsageError("--student is needed: a checkpoint directory (e.g. the output of "
                         "`undo perturb`), `random`, or `teacher` with --alpha/--beta")
    return load_model(spec, allow_pickle=load.allow_pickle,
                      trust_remote_code=load.trust_remote_code, base_model=load.base_model)


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
                       data: Sequence[str], options: DistillOptions | None = None,
                       noise: NoiseOptions | None = None, train: TrainConfig | None = None,
                       data_options: DataOptions | None = None,
                       evals: EvalOptions | None = None, load: LoadOptions | None = None,
                       overwrite: bool = False, callbacks: stage.Callbacks | None = None,
                       save: SaveOptions | None = None) -> dict[str, Any]:
    """Distil `teacher_path` into `student` (a checkpoint, `random`, or `teacher` noised in
    memory with `noise`, as `undo perturb` with seed `options.perturb_seed`) on `data` and
    write the result to `out`; returns the summary printed by `undo distill`.

    No budget in `train` means `TRAIN_STEPS` steps, or with `options.stop_when` alone a
    generous cap (`DISTILL_STOP_WHEN_CAP`) and evaluation every `DISTILL_EVAL_EVERY` steps
    unless `train.eval_every` says otherwise; the `evals` sets are measured on the teacher
    once and on the student at each evaluation. The model is written in the student's dtype
    and sharding (the teacher's for `random` and `teacher`) unless `save` says otherwise.
    """
    from undo_cli.checkpoint import fingerprint, load_model, load_tokenizer, save_layout
    from undo_cli.data import build_stream, fit_packing
    from undo_cli.engine import training_device
    from undo_cli.evaluate import expected_metrics
    from undo_cli.gates import StopCondition

    started = time.time()
    teacher_path = Path(teacher_path)
    options, data_options = options or DistillOptions(), data_options or DataOptions()
    evals, load = evals or EvalOptions(), load or LoadOptions()
    save = save or SaveOptions()
    save.validate()
    noise = noise or NoiseOptions(alpha=None, beta=None)
    train = train or TrainConfig(lr=1e-3)
    student = student or ("teacher" if noise.alpha is not None else "")
    check(options)
    noise.validate()
    budget = train.max_steps or train.max_tokens or train.max_flops
    if budget is None:
        train = replace(train, max_steps=DISTILL_STOP_WHEN_CAP if options.stop_when
                        else TRAIN_STEPS)
    if options.stop_when and train.eval_every is None:
        train = replace(train, eval_every=DISTILL_EVAL_EVERY)
    config = train.for_output(out)
    config.validate()
    stop = StopCondition(options.stop_when) if options.stop_when else None
    if stop is not None and not evals.eval:
        raise UsageError("--stop-when needs --eval sets to measure")
    if student == "teacher" and noise.alpha is None:
        build_student(student, None, noise, 0, config.seed)  # the clear error, before work
    student_is_dir = student not in ("random", "teacher", "")
    inputs = [teacher_path] + ([Path(student)] if student_is_dir else [])
    infos = stage.check_inputs(
        out, inputs, load, overwrite=overwrite,
        reads=[*stage.data_paths("--data", data), *stage.eval_paths(evals)],
        writes=[("--state-dir", config.state_dir), ("--cache-teacher", options.cache_teacher)])
    data_options = stage.fit_length(data_options, infos[0].config)
    if student_is_dir:
        stage.check_length(data_options.max_length, infos[1].config)

    tok = load_tokenizer(teacher_path, trust_remote_code=load.trust_remote_code,
                         base_model=load.base_model)
    student_tok = (load_tokenizer(student, trust_remote_code=load.trust_remote_code,
                                  base_model=load.base_model)
                   if student_is_dir else None)
    stream = build_stream(tok, data, data_options.max_length, config.batch_size, config.seed,
                          name="train", packing=data_options.packing)
    sets = stage.load_eval_sets(evals, tok)
    if stop is not None:  # before any model is loaded
        stop.check_names(set(expected_metrics(sets)))

    device = training_device(config.device)
    teacher = load_model(teacher_path, allow_pickle=load.allow_pickle,
                         trust_remote_code=load.trust_remote_code,
                         base_model=load.base_model).to(device).eval()
    teacher.requires_grad_(False)
    model = build_student(student, teacher, noise, options.perturb_seed, config.seed, load=load)
    check_compatible(teacher, model, tok, student_tok)

    measure = stage.measure(tok, sets, evals)
    teacher_metrics = measure(teacher) if sets else {}
    streams: dict = {"train": stream}
    fit_packing(streams, [teacher, model])  # before the teacher cache sees a batch
    frozen = sum(p.numel() for p in {id(p): p for p in teacher.parameters()}.values())
    cache = None
    if options.cache_teacher is not None:
        key = {"teacher": fingerprint(teacher_path), "data": list(data), "seed": config.seed,
               "batch_size": config.batch_size, "max_length": data_options.max_length,
               "packing": "documents-padded" if stream.padded_documents
               else data_options.packing}
        cache = TeacherCache(stream, teacher, options.cache_teacher, key, k=options.cache_topk,
                             temperature=options.temperature, device=device)
        streams = {"train": cache}
    loss_fn = kd_loss_fn(teacher, temperature=options.temperature,
                         ce_weight=options.ce_weight, chunk_size=options.kd_chunk_size)
    should_stop = None
    if stop is not None:
        def should_stop(step, metrics):  # noqa: ARG001
            return f"stop_when: {stop.text}" if stop.holds(metrics, teacher_metrics) else None

    def amend(compute: dict) -> dict:
        if cache is not None:  # the teacher ran only on batches missing from the cache
            compute["flops_frozen"] = 2.0 * frozen * cache.teacher_tokens
            compute["flops"] = compute["flops_trained"] + compute["flops_frozen"]
            compute["teacher_cache"] = {"dir": str(options.cache_teacher), "hits": cache.hits,
                                        "teacher_tokens": cache.teacher_tokens}
        compute["flops_student"] = compute["flops_trained"]
        compute["flops_teacher"] = compute["flops_frozen"]
        return compute

    parents = {"teacher": teacher_path, **({"student": Path(student)} if student_is_dir
                                           else {})}
    arguments = stage.arguments(config, data_options, evals, teacher=teacher_path,
                                student=student, data=list(data), settings=asdict(options),
                                noise=asdict(noise))
    written = stage.train_and_write(
        "distill", out, model=model, tokenizer=tok, loss_fn=loss_fn, streams=streams,
        config=config, inputs=inputs, source=teacher_path,
        parents=stage.with_bases(parents, infos),
        arguments=arguments, overwrite=overwrite, started=started,
        evaluate=stage.evaluation_hook(tok, sets, evals), should_stop=should_stop,
        frozen_forward_params=0 if cache is not None else frozen, callbacks=callbacks,
        compute=amend, extra={"teacher_metrics": teacher_metrics},
        layout=save_layout(save, infos[-1]))
    result, compute = written.result, written.compute
    return stage.summary(out, result, started, teacher=str(teacher_path), student=student,
                         flops_student=compute["flops_student"],
                         flops_teacher=compute["flops_teacher"],
                         kd_loss=result.loss.get("kd_loss"), teacher_metrics=teacher_metrics)
