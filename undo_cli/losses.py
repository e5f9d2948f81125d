"""Loss functions: small pure functions on tensors, each with its formula in the docstring.

Conventions shared by every function here:

- `logits` are `[B, T, V]` and `labels` are `[B, T]`, aligned with the input ids (Hugging Face
  convention): the functions do the causal shift themselves, so position `t` of the logits is
  scored against `labels[:, t + 1]`. A label equal to `IGNORE_INDEX` (-100) marks a token that
  contributes nothing (padding, prompt tokens).
- "Mean over tokens" is the mean over the kept (non-ignored) target tokens of the whole batch,
  so every kept token weighs the same whatever sequence it is in. A batch with no kept token
  gives a loss of exactly 0 (with a gradient of 0), never NaN.
- `normalizer` (where a function takes one): divide the sum by it instead of by this batch's
  own count. The engine passes the mean count per micro-batch over a whole optimizer step
  (all micro-batches of gradient accumulation, all processes: the batch's `num_targets`), so
  that every kept token of the step weighs the same, however the tokens fall into
  micro-batches and processes: the step equals one on the whole global batch.
- Every loss is computed in fp32 whatever the dtype of its inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shift_for_next_token(logits: torch.Tensor,
                         labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(logits[:, :-1], labels[:, 1:], mask)`: the prediction of each position and its target.

    `mask` is True where the target is kept (`label != IGNORE_INDEX`); ignored targets are
    replaced by 0 in the returned labels so that they can be used as indices.
    """
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(f"expected logits [B, T, V] and labels [B, T], got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")
    pred = logits[:, :-1, :].float()
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    return pred, target.masked_fill(~mask, 0), mask


def _masked_mean(values: torch.Tensor, mask: torch.Tensor,
                 normalizer: torch.Tensor | float | None = None) -> torch.Tensor:
    """Sum of `values` over `mask` divided by the mask's count (or by `normalizer`); 0 (keeping
    the graph) when the mask is empty."""
    mask = mask.to(values.dtype)
    count = mask.sum() if normalizer is None else torch.as_tensor(
        normalizer, dtype=values.dtype, device=values.device)
    return (values * mask).sum() / count.clamp_min(1.0)


def token_log_probs(logits: torch.Tensor,
                    labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(log p(y_{t+1} | y_{<=t}) [B, T-1], mask [B, T-1])`; ignored targets have log-prob 0."""
    pred, target, mask = shift_for_next_token(logits, labels)
    logp = torch.log_softmax(pred, dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return logp.masked_fill(~mask, 0.0), mask


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                        normalizer: torch.Tensor | float | None = None) -> torch.Tensor:
    """CE = -(1/N) * sum_{kept t} log p(y_{t+1} | y_{<=t}), N = number of kept target tokens
    (or `normalizer`)."""
    pred, target, mask = shift_for_next_token(logits, labels)
    nll = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1),
                          reduction="none").view_as(target)
    return _masked_mean(nll, mask, normalizer)


def maxent_kl(logits: torch.Tensor, labels: torch.Tensor,
              normalizer: torch.Tensor | float | None = None) -> torch.Tensor:
    """MaxEnt: mean over kept positions of KL(U || p_t) = -log V - (1/V) sum_v log p_t(v).

    U is the uniform distribution over the V vocabulary entries, so KL(U || p_t) =
    sum_v (1/V) log((1/V) / p_t(v)) = -log V - mean_v log p_t(v) >= 0, zero iff p_t is uniform.
    Position t counts when its target `labels[:, t + 1]` is kept (the value of the label is
    not used: only which positions belong to the forget text). N = `normalizer` if given.
    """
    pred, _, mask = shift_for_next_token(logits, labels)
    vocab = pred.shape[-1]
    kl = -math.log(vocab) - torch.log_softmax(pred, dim=-1).mean(dim=-1)
    return _masked_mean(kl, mask, normalizer)


def sequence_log_prob(logits: torch.Tensor, labels: torch.Tensor,
                      position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """log p(y | x) per sequence: sum_{kept t} log p(y_{t+1} | y_{<=t}).

    Without `position_ids`, a sequence is a row (`[B]`). With them, a sequence is a document
    of a packed row (it starts where the position ids restart at 0): `[D]`, the documents in
    row-major order (padding continues the last document and adds nothing: its labels are
    ignored)."""
    logp, _ = token_log_probs(logits, labels)
    if position_ids is None:
        return logp.sum(dim=-1)
    document = document_index(position_ids)[:, 1:]  # the document of each target
    total = logp.new_zeros(int(document.max()) + 1)
    return total.index_add(0, document.reshape(-1), logp.reshape(-1))


def sequence_has_targets(labels: torch.Tensor,
                         position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Per sequence (as in `sequence_log_prob`), whether it has a kept target token."""
    kept = (labels[:, 1:] != IGNORE_INDEX)
    if position_ids is None:
        return kept.any(dim=-1)
    document = document_index(position_ids)[:, 1:]
    counts = torch.zeros(int(document_index(position_ids).max()) + 1, dtype=torch.long,
                         device=labels.device)
    return counts.index_add(0, document.reshape(-1), kept.reshape(-1).long()) > 0


def document_index(position_ids: torch.Tensor) -> torch.Tensor:
    """`[B, T]` index of each token's document, counted row-major from 0: a document starts
    at every position id 0."""
    starts = (position_ids == 0).reshape(-1)
    return (starts.cumsum(0) - 1).clamp_min(0).view_as(position_ids)


def npo_loss(log_prob: torch.Tensor, ref_log_prob: torch.Tensor, beta: float,
             valid: torch.Tensor | None = None) -> torch.Tensor:
    """NPO: mean over sequences of -(2/beta) log sigmoid(-beta (log p_theta(y|x) - log p_ref(y|x))).

    `log_prob` and `ref_log_prob` are sequence log-probabilities `[B]` (see
    `sequence_log_prob`); `ref_log_prob` is treated as a constant. `valid` `[B]` (optional)
    drops sequences that have no kept token. As beta -> 0 the loss tends to
    (2/beta) log 2 + mean(log p_theta - log p_ref), whose gradient is that of gradient ascent
    on the sequence log-likelihood; larger beta bounds the loss below (it is >= 0 always).
    (Zhang et al. 2024, "Negative Preference Optimization".)
    """
    if beta <= 0:
        raise ValueError("NPO needs beta > 0")
    ratio = log_prob.float() - ref_log_prob.detach().float()
    per_seq = -(2.0 / beta) * F.logsigmoid(-beta * ratio)
    if valid is None:
        return per_seq.mean()
    return _masked_mean(per_seq, valid)


def masked_mse(hidden: torch.Tensor, target: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """MSE = (1/(N*H)) * sum_{kept (b, t)} ||h_{b,t} - target_{b,t}||^2 over `[B, T, H]` states.

    `target` broadcasts against `hidden` (e.g. a steering vector c*u of shape `[H]`) and is
    treated as given (detach it yourself if it depends on the model); `mask` `[B, T]` selects
    the N positions that count (all of them when None).
    """
    diff = (hidden.float() - target.float()).pow(2).mean(dim=-1)
    if mask is None:
        return diff.mean()
    return _masked_mean(diff, mask)


def hidden_state_mse(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor],
                     mask: torch.Tensor,
                     normalizer: torch.Tensor | float | None = None) -> torch.Tensor:
    """Hidden-state matching over layers L and the N kept positions:

        (1/N) * sum_{kept (b, t)} (1/|L|) * sum_{l in L} (1/H) * ||s_l[b,t] - t_l[b,t]||^2

    `student` and `teacher` are sequences of `[B, T, H]` states of the same layers L, one
    pair per layer; the teacher's are constants (detached here: no gradient reaches them).
    `mask` `[B, T]` selects the positions that count; N = their number, or `normalizer`.
    """
    if len(student) != len(teacher) or not student:
        raise ValueError(f"expected as many student as teacher states (got {len(student)} and "
                         f"{len(teacher)}), at least one")
    per_position = sum((s.float() - t.detach().float()).pow(2).mean(dim=-1)
                       for s, t in zip(student, teacher, strict=True)) / len(student)
    return _masked_mean(per_position, mask, normalizer)


def gaussian_mmd(x: torch.Tensor, y: torch.Tensor, *, kernel_mul: float = 2.0, kernel_num: int = 5,
                 bandwidth: float | torch.Tensor | None = None) -> torch.Tensor:
    """Squared MMD with a sum of Gaussian kernels: mean K(x,x') + mean K(y,y') - 2 mean K(x,y).

    x `[n, d]`, y `[m, d]`; K(a, b) = sum_{i<kernel_num} exp(-||a - b||^2 / (s * kernel_mul^i)),
    with s = bandwidth / kernel_mul^(kernel_num // 2) and, when `bandwidth` is None, bandwidth =
    the mean squared distance over distinct pairs of the pooled samples (not differentiated),
    as in RepNoise (Rosati et al. 2024). Biased (V-statistic) estimate: it is >= 0 and 0 when
    the two samples are equal.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"expected x [n, d] and y [m, d], got {tuple(x.shape)}, {tuple(y.shape)}")
    n = x.shape[0]
    total = torch.cat([x.float(), y.float()], dim=0)
    sq = torch.cdist(total, total).pow(2)
    if bandwidth is None:
        pairs = total.shape[0] * (total.shape[0] - 1)
        bandwidth = sq.detach().sum() / max(pairs, 1)
    bandwidth = torch.as_tensor(bandwidth, dtype=sq.dtype, device=sq.device).clamp_min(1e-12)
    base = bandwidth / (kernel_mul ** (kernel_num // 2))
    kernel = sum(torch.exp(-sq / (base * kernel_mul ** i)) for i in range(kernel_num))
    kxx = kernel[:n, :n].mean()
    kyy = kernel[n:, n:].mean()
    kxy = kernel[:n, n:].mean()
    return kxx + kyy - 2 * kxy


def repnoise_loss(hidden_states: list[torch.Tensor] | tuple[torch.Tensor, ...],
                  mask: torch.Tensor, forget_ce: torch.Tensor, *, alpha: float = 1.0,
                  beta: float = 1e-3, generator: torch.Generator | None = None) -> torch.Tensor:
    """RepNoise term: beta * mean_l MMD(h_l[forget tokens], N(0, I)) - alpha * log(1 + CE(forget)).

    `hidden_states` are the `[B, T, H]` activations of the layers to noise, `mask` `[B, T]`
    selects the forget tokens (one MMD sample per token), `forget_ce` is the forget cross-
    entropy. The first term pulls forget representations toward Gaussian noise, the second is
    a bounded gradient ascent on the forget data. Defaults alpha = 1, beta = 0.001 as in the
    RepNoise paper (Rosati et al. 2024); the retain term of that paper is the method's own.
    """
    noise_terms = []
    mask = mask.bool()
    if mask.any():
        for h in hidden_states:
            acts = h[mask].float()
            if generator is None:
                noise = torch.randn_like(acts)
            else:
                noise = torch.randn(acts.shape, generator=generator).to(acts.device)
            noise_terms.append(gaussian_mmd(acts, noise))
    noise_term = torch.stack(noise_terms).mean() if noise_terms else forget_ce.new_zeros(())
    return beta * noise_term - alpha * torch.log1p(forget_ce.float().clamp_min(0.0))


# ------------------------------------------------------------------------ distillation


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


def kd_objective(kl_sum: torch.Tensor, ce_sum: torch.Tensor | None, count: torch.Tensor,
                 temperature: float = 1.0,
                 ce_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """loss = T^2 * (sum KL) / N + ce_weight * (sum CE) / N over N distilled positions.

    Returns the loss and its terms: `kd_loss` (the mean KL itself, at temperature T) and, when
    `ce_weight` > 0, `ce` (the mean hard-label cross-entropy). The T^2 factor keeps gradient
    scales comparable across temperatures (Hinton et al.); at T = 1 the loss is the KL.
    """
    count = count.clamp_min(1)
    kd = kl_sum / count
    loss = temperature**2 * kd
    terms = {"kd_loss": kd.detach()}
    if ce_weight > 0 and ce_sum is not None:
        ce = ce_sum / count
        loss = loss + ce_weight * ce
        terms["ce"] = ce.detach()
    return loss, terms
