"""Distillation losses against direct computations; the chunked loss equals the plain one."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TEST_ALPHABET

from undo_cli.distill import chunked_distill_loss
from undo_cli.losses import forward_kl, kd_objective, next_token_mask, topk_forward_kl


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 labels: torch.Tensor, temperature: float = 1.0,
                 ce_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """loss = T^2 * mean_{kept t} KL(p_T(.|t) || q_T(.|t)) + ce_weight * CE(student, labels).

    `[B, T, V]` logits, `[B, T]` labels (-100 = not distilled); see `kd_objective` for the
    terms. The plain, unchunked reference the engine's chunked distillation loss
    (`undo_cli.distill.kd_loss_fn`) is tested against.
    """
    mask = next_token_mask(labels)
    kl = forward_kl(student_logits[mask], teacher_logits[mask], temperature)
    ce = None
    if ce_weight > 0:
        targets = labels[:, 1:][mask[:, :-1]]
        ce = F.cross_entropy(student_logits[:, :-1][mask[:, :-1]].float(), targets,
                             reduction="sum")
    return kd_objective(kl.sum(), ce, mask.sum(), temperature, ce_weight)


def _hand_kl(s_row, t_row, temperature=1.0):
    ps = [math.exp(v / temperature) for v in t_row]
    qs = [math.exp(v / temperature) for v in s_row]
    zp, zq = sum(ps), sum(qs)
    return sum((p / zp) * math.log((p / zp) / (q / zq)) for p, q in zip(ps, qs, strict=True))


def test_forward_kl_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    for temperature in (1.0, 2.5):
        got = forward_kl(s, t, temperature)
        want = [_hand_kl(s[i].tolist(), t[i].tolist(), temperature) for i in range(4)]
        torch.testing.assert_close(got, torch.tensor(want), rtol=1e-5, atol=1e-6)
    assert torch.allclose(forward_kl(t, t), torch.zeros(4), atol=1e-6)


def test_topk_kl_is_exact_at_full_k_and_a_lower_bound_below():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 8, generator=g), 3 * torch.randn(5, 8, generator=g)
    logp = torch.log_softmax(t, -1)
    full = forward_kl(s, t)
    lp_all, ids_all = logp.topk(8, dim=-1)
    torch.testing.assert_close(topk_forward_kl(s, lp_all, ids_all), full, rtol=1e-5, atol=1e-6)
    lp3, ids3 = logp.topk(3, dim=-1)
    approx = topk_forward_kl(s, lp3, ids3)
    assert torch.all(approx <= full + 1e-6) and torch.all(approx >= -1e-6)
    # Hand formula for one row.
    p = lp3[0].exp()
    q = torch.softmax(s[0], -1)
    r, q_rest = 1 - p.sum(), 1 - q[ids3[0]].sum()
    want = (p * (p.log() - q[ids3[0]].log())).sum() + r * (r.log() - q_rest.log())
    torch.testing.assert_close(approx[0], want, rtol=1e-4, atol=1e-6)


def test_distill_loss_uses_only_kept_positions_and_scales_with_temperature():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    labels = torch.tensor([[1, 2, -100, 3, 4], [-100, -100, 5, 6, -100]])
    mask = next_token_mask(labels)
    # position t is kept when labels[t+1] is kept; the last position never is
    assert mask.tolist() == [[True, False, True, True, False], [False, True, True, False, False]]
    loss, terms = distill_loss(s, t, labels)
    rows = [_hand_kl(s[b, i].tolist(), t[b, i].tolist())
            for b in range(2) for i in range(5) if mask[b, i]]
    assert loss.item() == pytest.approx(sum(rows) / len(rows), rel=1e-5)
    s2 = s.clone()
    s2[~mask] = 100 * torch.randn_like(s2[~mask])  # masked positions contribute nothing
    assert distill_loss(s2, t, labels)[0].item() == pytest.approx(loss.item(), rel=1e-6)
    hot, hot_terms = distill_loss(s, t, labels, temperature=2.0)
    rows_t = [_hand_kl(s[b, i].tolist(), t[b, i].tolist(), 2.0)
              for b in range(2) for i in range(5) if mask[b, i]]
    assert hot_terms["kd_loss"].item() == pytest.approx(sum(rows_t) / len(rows_t), rel=1e-5)
    assert hot.item() == pytest.approx(4 * hot_terms["kd_loss"].item(), rel=1e-6)
    mixed, mixed_terms = distill_loss(s, t, labels, ce_weight=0.5)
    logq = torch.log_softmax(s, -1)
    ce = -sum(logq[b, i, labels[b, i + 1]].item() for b in range(2) for i in range(4) if mask[b, i])
    assert mixed_terms["ce"].item() == pytest.approx(ce / len(rows), rel=1e-5)
    assert mixed.item() == pytest.approx(loss.item() + 0.5 * ce / len(rows), rel=1e-5)


_MODELS: dict[str, tuple] = {}


def _pair(arch: str):
    """A (teacher, student) pair of tiny random models, built once per architecture."""
    if arch not in _MODELS:
        from undo_cli.modelfactory import (
            ModelShape,
            build_char_tokenizer,
            build_config,
            random_model,
        )

        config = build_config(arch, ModelShape(2, 32, 4, 64, 64),
                              build_char_tokenizer(TEST_ALPHABET))
        _MODELS[arch] = (random_model(config, seed=1), random_model(config, seed=2))
    return _MODELS[arch]


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
@pytest.mark.parametrize("chunk_size", [1, 5, 10_000])
def test_chunked_loss_and_gradient_equal_the_plain_ones(arch, chunk_size):
    teacher, student = _pair(arch)
    student.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(4, teacher.config.vocab_size, (2, 9), generator=g)
    attention = torch.ones_like(ids)
    labels = ids.clone()
    labels[0, :3] = -100  # a masked prompt
    labels[1, 7:] = -100
    batch = {"input_ids": ids, "attention_mask": attention, "labels": labels}

    with torch.no_grad():
        t_logits = teacher(input_ids=ids, attention_mask=attention).logits
    plain, plain_terms = distill_loss(student(input_ids=ids, attention_mask=attention).logits,
                                      t_logits, labels, temperature=2.0, ce_weight=0.3)
    plain.backward()
    plain_grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()

    chunked, chunked_terms = chunked_distill_loss(student, teacher, batch, temperature=2.0,
                                                  ce_weight=0.3, chunk_size=chunk_size)
    chunked.backward()
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked_terms["ce"], plain_terms["ce"], rtol=1e-5, atol=1e-6)
    for name, p in student.named_parameters():
        torch.testing.assert_close(p.grad, plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert all(p.grad is None for p in teacher.parameters())
