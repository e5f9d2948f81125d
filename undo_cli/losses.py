"""Loss functions: small pure functions on tensors, each with its formula in the docstring.

Conventions shared by every function here:

- `logits` are `[B, T, V]` and `labels` are `[B, T]`, aligned with the input ids (Hugging Face
  convention): the functions do the causal shift themselves, so position `t` of the logits is
  scored against `labels[:, t + 1]`. A label equal to `IGNORE_INDEX` (-100) marks a token that
  contributes nothing (padding, prompt tokens).
- "Mean over tokens" is the mean over the kept (non-ignored) target tokens of the whole batch,
  so every kept token weighs the same whatever sequence it is in. A batch with no kept token
  gives a loss of exactly 0 (with a gradient of 0), never NaN.
- Every loss is computed in fp32 whatever the dtype of its inputs.
"""

from __future__ import annotations

import math

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


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over `mask`; 0 (keeping the graph) when the mask is empty."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def token_log_probs(logits: torch.Tensor,
                    labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(log p(y_{t+1} | y_{<=t}) [B, T-1], mask [B, T-1])`; ignored targets have log-prob 0."""
    pred, target, mask = shift_for_next_token(logits, labels)
    logp = torch.log_softmax(pred, dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return logp.masked_fill(~mask, 0.0), mask


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CE = -(1/N) * sum_{kept t} log p(y_{t+1} | y_{<=t}), N = number of kept target tokens."""
    logp, mask = token_log_probs(logits, labels)
    return _masked_mean(-logp, mask)


def maxent_kl(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """MaxEnt: mean over kept positions of KL(U || p_t) = -log V - (1/V) sum_v log p_t(v).

    U is the uniform distribution over the V vocabulary entries, so KL(U || p_t) =
    sum_v (1/V) log((1/V) / p_t(v)) = -log V - mean_v log p_t(v) >= 0, zero iff p_t is uniform.
    Position t counts when its target `labels[:, t + 1]` is kept (the value of the label is
    not used: only which positions belong to the forget text).
    """
    pred, _, mask = shift_for_next_token(logits, labels)
    vocab = pred.shape[-1]
    kl = -math.log(vocab) - torch.log_softmax(pred, dim=-1).mean(dim=-1)
    return _masked_mean(kl, mask)


def sequence_log_prob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(y | x) per sequence, `[B]`: sum_{kept t} log p(y_{t+1} | y_{<=t})."""
    logp, _ = token_log_probs(logits, labels)
    return logp.sum(dim=-1)


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
