"""The distillation loss on models: forward KL(teacher || student) computed in chunks from
hidden states (the full logits never exist), plus the optional hidden-state term and the
choice of teacher per micro-batch. The formulas are in `undo_cli.losses` (`forward_kl`,
`topk_forward_kl`, `kd_objective`, `hidden_state_mse`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from undo_cli import losses
from undo_cli.data import model_inputs
from undo_cli.errors import UndoError
from undo_cli.losses import forward_kl, next_token_mask, topk_forward_kl

# A batch entry set by `undo_cli.distill.teachers.TeacherSwitch`: 1 when the micro-batch's
# targets come from the second teacher.
SECOND_TEACHER_KEY = "second_teacher"

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


def teacher_states(teacher, batch: dict[str, torch.Tensor], *, all_layers: bool = False
                   ) -> tuple[torch.Tensor, ...]:
    """The teacher's hidden states on `batch`, without gradient: `(final,)`, or with
    `all_layers` every state transformers returns (embeddings, then each decoder layer's
    output; the last one after the final norm), computing the LM head on one position only."""
    with torch.no_grad():
        if not all_layers:
            return (final_hidden(teacher, batch),)
        out = teacher(**model_inputs(batch), output_hidden_states=True, logits_to_keep=1)
        return tuple(out.hidden_states)


def kd_loss_fn(teacher, *, temperature: float = 1.0, ce_weight: float = 0.0,
               chunk_size: int = 1024, stream: str = "train", hidden_weight: float = 0.0,
               hidden_layers: Sequence[int] | None = None, second_teacher=None):
    """The engine loss of distillation: chunked forward KL to `teacher` on `stream`'s batches,

        loss = T^2 * KL + ce_weight * CE + hidden_weight * hidden_state_mse

    (`losses.kd_objective`, `losses.hidden_state_mse`; every term a mean over the distilled
    positions). The hidden-state term, when `hidden_weight` > 0, compares the outputs of the
    decoder layers `hidden_layers` (0-based; None: all) of student and teacher, each running
    its own forward pass; the teacher's states are constants (no gradient reaches it).

    A batch marked `SECOND_TEACHER_KEY` (by `TeacherSwitch`) takes every target, distribution
    and hidden states, from `second_teacher` instead. A batch that carries cached teacher
    outputs (`teacher_topk_logprobs`, `teacher_topk_ids` for its kept positions, see
    `TeacherCache`) is scored with `topk_forward_kl` instead, and the teacher is not run.
    """
    want_states = hidden_weight > 0

    def loss_fn(model, batches):
        batch = batches[stream]
        mask = next_token_mask(batch["labels"])
        count = mask.sum().clamp_min(1)
        targets = torch.zeros_like(batch["labels"])
        targets[:, :-1] = batch["labels"][:, 1:]
        kept_targets = targets[mask]
        head_owner = _unwrap(model)
        use_second = second_teacher is not None and bool(batch.get(SECOND_TEACHER_KEY, False))
        source = second_teacher if use_second else teacher
        cached = "teacher_topk_ids" in batch
        states: tuple[torch.Tensor, ...] = ()
        if cached:
            teacher_rows = (batch["teacher_topk_logprobs"], batch["teacher_topk_ids"])
        else:
            states = teacher_states(source, batch, all_layers=want_states)
            teacher_rows = states[-1][mask]
        head = _gathered_head(model)
        whole = head is None  # FSDP with a head we cannot call: full logits from the forward
        if whole:
            out = model(**model_inputs(batch), output_hidden_states=want_states)
            student_rows = out.logits[mask]
        else:
            out = model(**model_inputs(batch), output_hidden_states=True, logits_to_keep=1)
            student_rows = out.hidden_states[-1][mask]

        def chunk_terms(h_student, target_rows, y, *topk):
            z_student = h_student if whole else output_logits(head_owner, h_student, head)
            if topk:
                kl = topk_forward_kl(z_student, topk[0], topk[1], temperature).sum()
            else:
                with torch.no_grad():
                    z_teacher = output_logits(source, target_rows)
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
        loss, terms = losses.kd_objective(kl_sum, ce_sum, count, temperature, ce_weight)
        if want_states:
            hidden = hidden_term(out.hidden_states, states, mask, hidden_layers, count)
            loss = loss + hidden_weight * hidden
            terms["hidden_mse"] = hidden.detach()
        if second_teacher is not None:  # its log mean is the share of second-teacher batches
            terms["second_teacher"] = float(use_second)
        return loss, terms

    return loss_fn


def hidden_term(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor],
                mask: torch.Tensor, layers: Sequence[int] | None,
                normalizer: torch.Tensor | float | None = None) -> torch.Tensor:
    """`losses.hidden_state_mse` over decoder layers `layers` (None: all) of the hidden-state
    tuples transformers returns (index 0 the embeddings, l + 1 the output of layer l)."""
    chosen = range(len(student) - 1) if layers is None else layers
    return losses.hidden_state_mse([student[i + 1] for i in chosen],
                                   [teacher[i + 1] for i in chosen], mask, normalizer)
