"""Every loss against an independent, direct computation (loops, explicit formulas)."""

from __future__ import annotations

import math

import pytest
import torch

from undo_cli import losses

IGNORE = losses.IGNORE_INDEX


def _random_case(seed: int = 0, b: int = 3, t: int = 6, v: int = 7):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g) * 2
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, :2] = IGNORE          # a masked prompt
    labels[1, -2:] = IGNORE         # padding
    labels[2, 3] = IGNORE           # a hole in the middle
    return logits, labels


def _kept_positions(labels):
    """(b, t) pairs whose prediction counts: position t predicts labels[b, t + 1]."""
    b, t = labels.shape
    return [(i, j) for i in range(b) for j in range(t - 1) if labels[i, j + 1] != IGNORE]


def _log_softmax_by_hand(row):
    m = max(row.tolist())
    z = sum(math.exp(x - m) for x in row.tolist())
    return [x - m - math.log(z) for x in row.tolist()]


def test_token_cross_entropy_matches_loop():
    logits, labels = _random_case()
    total, n = 0.0, 0
    for i, j in _kept_positions(labels):
        total -= _log_softmax_by_hand(logits[i, j])[labels[i, j + 1]]
        n += 1
    assert losses.token_cross_entropy(logits, labels).item() == pytest.approx(total / n, rel=1e-5)


def test_maxent_is_kl_from_uniform_by_hand():
    logits, labels = _random_case(1)
    v = logits.shape[-1]
    total, n = 0.0, 0
    for i, j in _kept_positions(labels):
        p = [math.exp(x) for x in _log_softmax_by_hand(logits[i, j])]
        total += sum((1 / v) * math.log((1 / v) / pv) for pv in p)  # KL(U || p)
        n += 1
    assert losses.maxent_kl(logits, labels).item() == pytest.approx(total / n, rel=1e-5)


def test_maxent_is_zero_at_uniform_and_positive_elsewhere():
    labels = torch.zeros(2, 5, dtype=torch.long)
    assert losses.maxent_kl(torch.zeros(2, 5, 9), labels).item() == pytest.approx(0.0, abs=1e-6)
    assert losses.maxent_kl(torch.randn(2, 5, 9), labels).item() > 0


def test_sequence_log_prob_matches_loop():
    logits, labels = _random_case(2)
    expected = [0.0] * labels.shape[0]
    for i, j in _kept_positions(labels):
        expected[i] += _log_softmax_by_hand(logits[i, j])[labels[i, j + 1]]
    got = losses.sequence_log_prob(logits, labels)
    assert got.tolist() == pytest.approx(expected, rel=1e-5)


def test_per_document_log_prob_of_packed_rows_matches_each_document_alone():
    torch.manual_seed(3)
    # Row 0: documents of 4 and 3 tokens; row 1: one of 5 plus 2 tokens of padding.
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2], [0, 1, 2, 3, 4, 5, 6]])
    labels = torch.randint(0, 9, (2, 7))
    labels[0, 4] = losses.IGNORE_INDEX  # a document's first token is never a target
    labels[1, 5:] = losses.IGNORE_INDEX  # padding
    logits = torch.randn(2, 7, 9)
    got = losses.sequence_log_prob(logits, labels, positions)
    spans = [(0, 0, 4), (0, 4, 7), (1, 0, 7)]
    expected = [losses.sequence_log_prob(logits[r:r + 1, a:b], labels[r:r + 1, a:b]).item()
                for r, a, b in spans]
    assert got.tolist() == pytest.approx(expected, rel=1e-5)
    assert losses.sequence_has_targets(labels, positions).tolist() == [True, True, True]
    labels[0, 5:] = losses.IGNORE_INDEX
    assert losses.sequence_has_targets(labels, positions).tolist() == [True, False, True]
    assert losses.document_index(positions).tolist() == [[0, 0, 0, 0, 1, 1, 1],
                                                        [2, 2, 2, 2, 2, 2, 2]]


@pytest.mark.parametrize("fn", [losses.token_cross_entropy, losses.maxent_kl])
def test_a_normalizer_replaces_the_batch_count(fn):
    logits, labels = _random_case(4)
    kept = int((labels[:, 1:] != losses.IGNORE_INDEX).sum())
    mean = fn(logits, labels)
    assert fn(logits, labels, torch.tensor(float(kept))).item() == pytest.approx(mean.item())
    # Two halves normalised by the whole's count sum to the whole's mean.
    halves = [fn(logits[i:i + 1], labels[i:i + 1], kept) for i in range(2)]
    assert sum(h.item() for h in halves) == pytest.approx(fn(logits[:2], labels[:2]).item()
                                                        * int((labels[:2, 1:] != -100).sum())
                                                        / kept, rel=1e-5)


@pytest.mark.parametrize("fn", [losses.token_cross_entropy, losses.maxent_kl,
                                losses.sequence_log_prob])
def test_masked_positions_contribute_nothing(fn):
    logits, labels = _random_case(3)
    logits = logits.clone().requires_grad_(True)
    base = fn(logits, labels)
    # Change the logits of every position whose target is ignored (and the last position,
    # which predicts nothing): the loss must not move and their gradient must be zero.
    ignored = torch.ones(labels.shape, dtype=torch.bool)
    for i, j in _kept_positions(labels):
        ignored[i, j] = False
    changed = logits.detach().clone()
    changed[ignored] += 100 * torch.randn_like(changed[ignored])
    assert torch.allclose(fn(changed, labels), base.detach(), atol=1e-5)
    base.sum().backward()
    assert logits.grad[ignored].abs().max().item() == 0.0


def test_all_masked_batch_gives_zero_not_nan():
    logits = torch.randn(2, 4, 5, requires_grad=True)
    labels = torch.full((2, 4), IGNORE)
    for fn in (losses.token_cross_entropy, losses.maxent_kl):
        value = fn(logits, labels)
        assert value.item() == 0.0
        value.backward()
        assert torch.isfinite(logits.grad).all()


def test_npo_matches_formula():
    logp = torch.tensor([-3.0, -10.0, -0.5])
    ref = torch.tensor([-4.0, -9.0, -0.5])
    beta = 0.7
    expected = sum(-(2 / beta) * math.log(1 / (1 + math.exp(beta * (a - r))))
                   for a, r in zip(logp.tolist(), ref.tolist(), strict=True)) / 3
    assert losses.npo_loss(logp, ref, beta).item() == pytest.approx(expected, rel=1e-6)
    # `valid` drops sequences.
    valid = torch.tensor([True, False, True])
    expected2 = sum(-(2 / beta) * math.log(1 / (1 + math.exp(beta * (a - r))))
                    for a, r, ok in zip(logp.tolist(), ref.tolist(), valid.tolist(), strict=True)
                    if ok) / 2
    assert losses.npo_loss(logp, ref, beta, valid).item() == pytest.approx(expected2, rel=1e-6)


def test_npo_gradient_tends_to_gradient_ascent_as_beta_vanishes():
    torch.manual_seed(0)
    b, t, v = 4, 8, 11
    labels = torch.randint(0, v, (b, t))  # equal lengths: GA's token mean = sum / const
    base = torch.randn(b, t, v)
    ref_logp = losses.sequence_log_prob(base + 0.3 * torch.randn(b, t, v), labels)

    def grad_of(loss_fn):
        logits = base.clone().requires_grad_(True)
        loss_fn(logits).backward()
        return logits.grad.flatten()

    ga = grad_of(lambda lg: -losses.token_cross_entropy(lg, labels))
    cosines = {}
    for beta in (1e-3, 1.0, 10.0):
        npo = grad_of(lambda lg, beta=beta: losses.npo_loss(
            losses.sequence_log_prob(lg, labels), ref_logp, beta))
        cosines[beta] = torch.nn.functional.cosine_similarity(npo, ga, dim=0).item()
    assert cosines[1e-3] > 0.9999
    assert cosines[10.0] < cosines[1e-3]  # larger beta re-weights sequences


def test_npo_rejects_non_positive_beta():
    with pytest.raises(ValueError):
        losses.npo_loss(torch.zeros(2), torch.zeros(2), 0.0)


def test_masked_mse_matches_loop_and_ignores_masked_positions():
    g = torch.Generator().manual_seed(4)
    h = torch.randn(2, 5, 3, generator=g)
    target = torch.randn(3, generator=g)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    total, n = 0.0, 0
    for i in range(2):
        for j in range(5):
            if mask[i, j]:
                total += sum((h[i, j, k].item() - target[k].item()) ** 2 for k in range(3)) / 3
                n += 1
    assert losses.masked_mse(h, target, mask).item() == pytest.approx(total / n, rel=1e-5)
    h2 = h.clone()
    h2[~mask] = 1e3
    assert losses.masked_mse(h2, target, mask).item() == pytest.approx(total / n, rel=1e-5)
    full = ((h - target) ** 2).mean().item()
    assert losses.masked_mse(h, target).item() == pytest.approx(full, rel=1e-5)


def test_gaussian_mmd_matches_loop():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 3, generator=g)
    y = torch.randn(5, 3, generator=g) + 1.0
    pooled = torch.cat([x, y]).tolist()
    d2 = [[sum((a - b) ** 2 for a, b in zip(p, q, strict=True)) for q in pooled] for p in pooled]
    m = len(pooled)
    bandwidth = sum(map(sum, d2)) / (m * m - m)
    scales = [bandwidth / 2 ** 2 * 2 ** i for i in range(5)]

    def k(i, j):
        return sum(math.exp(-d2[i][j] / s) for s in scales)

    xs, ys = range(4), range(4, 9)
    expected = (sum(k(i, j) for i in xs for j in xs) / 16 + sum(k(i, j) for i in ys for j in ys)
                / 25 - 2 * sum(k(i, j) for i in xs for j in ys) / 20)
    assert losses.gaussian_mmd(x, y).item() == pytest.approx(expected, rel=1e-5)
    assert losses.gaussian_mmd(x, x).item() == pytest.approx(0.0, abs=1e-6)


def test_repnoise_loss_formula_and_mask():
    g = torch.Generator().manual_seed(6)
    h1 = torch.randn(2, 4, 3, generator=g)
    h2 = torch.randn(2, 4, 3, generator=g)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    ce = torch.tensor(2.5)
    got = losses.repnoise_loss([h1, h2], mask, ce, alpha=0.5, beta=0.1,
                               generator=torch.Generator().manual_seed(9))
    noise_g = torch.Generator().manual_seed(9)
    mmds = []
    for h in (h1, h2):
        acts = torch.stack([h[i, j] for i in range(2) for j in range(4) if mask[i, j]])
        mmds.append(losses.gaussian_mmd(acts, torch.randn(acts.shape, generator=noise_g)))
    expected = 0.1 * (mmds[0] + mmds[1]) / 2 - 0.5 * math.log(1 + 2.5)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    # Masked-out activations do not matter.
    h1b = h1.clone()
    h1b[~mask] = 1e4
    again = losses.repnoise_loss([h1b, h2], mask, ce, alpha=0.5, beta=0.1,
                                 generator=torch.Generator().manual_seed(9))
    assert again.item() == pytest.approx(got.item(), rel=1e-5)


def test_hidden_state_mse_matches_a_loop_over_layers_and_positions():
    g = torch.Generator().manual_seed(5)
    b, t, h, n_layers = 2, 5, 3, 3
    student = [torch.randn(b, t, h, generator=g) for _ in range(n_layers)]
    teacher = [torch.randn(b, t, h, generator=g) for _ in range(n_layers)]
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    total, n = 0.0, 0
    for i in range(b):
        for j in range(t):
            if not mask[i, j]:
                continue
            n += 1
            per_layer = [sum((float(s[i, j, k]) - float(te[i, j, k])) ** 2 for k in range(h)) / h
                         for s, te in zip(student, teacher)]
            total += sum(per_layer) / n_layers
    got = losses.hidden_state_mse(student, teacher, mask)
    assert got.item() == pytest.approx(total / n, rel=1e-5)
    # With the engine's normalizer the sum is divided by it instead.
    assert losses.hidden_state_mse(student, teacher, mask, 4.0).item() == pytest.approx(
        total / 4.0, rel=1e-5)
    # Empty mask: exactly 0, never NaN.
    assert losses.hidden_state_mse(student, teacher, torch.zeros_like(mask)).item() == 0.0


def test_hidden_state_mse_gradient_reaches_only_the_student_at_kept_positions():
    g = torch.Generator().manual_seed(6)
    student = [torch.randn(2, 4, 3, generator=g, requires_grad=True) for _ in range(2)]
    teacher = [torch.randn(2, 4, 3, generator=g, requires_grad=True) for _ in range(2)]
    mask = torch.tensor([[1, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    losses.hidden_state_mse(student, teacher, mask).backward()
    for s, te in zip(student, teacher):
        assert te.grad is None  # the teacher's states are constants
        assert torch.all(s.grad[~mask] == 0)
        assert torch.all(s.grad[mask].abs().sum(-1) > 0)
        # d/ds of (1/N)(1/|L|)(1/H)||s - t||^2 = 2 (s - t) / (N |L| H)
        expected = 2 * (s - te).detach() / (int(mask.sum()) * 2 * 3) * mask.unsqueeze(-1)
        assert torch.allclose(s.grad, expected, atol=1e-6)
