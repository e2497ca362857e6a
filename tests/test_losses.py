"""Losses and targets: values by hand, gradients against autograd, conventions against torch."""
import math

import pytest
import torch
import torch.nn.functional as F

from utils.losses import (GCE_Q, distillation_targets, generalized_cross_entropy,
                          hard_label_cross_entropy, pll_candidates, soft_cross_entropy)

LN2, LN3 = math.log(2.0), math.log(3.0)


def test_soft_cross_entropy_by_hand():
    # sample 1: p = softmax(0, ln 3) = (1/4, 3/4), q = (1/2, 1/2); sample 2: p = (1/2, 1/2), q = (1, 0)
    logits = torch.tensor([[[0.0, LN3], [0.0, 0.0]]], dtype=torch.float64)
    q = torch.tensor([[[0.5, 0.5], [1.0, 0.0]]], dtype=torch.float64)
    loss, grad = soft_cross_entropy(logits, q, torch.tensor([1.0]))
    ce1 = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    assert loss.item() == pytest.approx((ce1 + LN2) / 2, abs=1e-12)
    expected = torch.tensor([[[-1 / 8, 1 / 8], [-1 / 4, 1 / 4]]], dtype=torch.float64)
    torch.testing.assert_close(grad, expected, atol=1e-12, rtol=0)


def test_soft_cross_entropy_temperature_two_by_hand():
    # z / T = (0, ln 3) -> p = (1/4, 3/4); loss = T^2 CE; grad = T (p - q) / B with B = 1
    logits = torch.tensor([[[0.0, 2 * LN3]]], dtype=torch.float64)
    q = torch.tensor([[[0.5, 0.5]]], dtype=torch.float64)
    loss, grad = soft_cross_entropy(logits, q, torch.tensor([2.0]))
    ce = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    assert loss.item() == pytest.approx(4 * ce, abs=1e-12)
    torch.testing.assert_close(grad, torch.tensor([[[2 * -0.25, 2 * 0.25]]], dtype=torch.float64),
                               atol=1e-12, rtol=0)


@pytest.mark.parametrize("temps", [[1.0, 1.0, 1.0], [2.0, 0.5, 4.0]], ids=["T1", "mixed_T"])
def test_soft_cross_entropy_gradient_matches_autograd(temps):
    torch.manual_seed(0)
    r, b, k = 3, 5, 4
    logits = torch.randn(r, b, k, dtype=torch.float64, requires_grad=True)
    q = torch.softmax(torch.randn(r, b, k, dtype=torch.float64), -1)
    t = torch.tensor(temps, dtype=torch.float64)
    loss, grad = soft_cross_entropy(logits.detach(), q, t)
    ref = torch.stack([(t[i] ** 2) * -(q[i] * torch.log_softmax(logits[i] / t[i], -1)).sum(-1).mean()
                       for i in range(r)])
    torch.testing.assert_close(loss, ref.detach(), atol=1e-12, rtol=1e-12)
    ref.sum().backward()  # runs are independent: d(sum)/d(logits of run i) = d(loss_i)/d(logits_i)
    torch.testing.assert_close(grad, logits.grad, atol=1e-12, rtol=1e-10)
    # the T^2 convention in closed form
    closed = t.view(-1, 1, 1) * (torch.softmax(logits.detach() / t.view(-1, 1, 1), -1) - q) / b
    torch.testing.assert_close(grad, closed, atol=1e-12, rtol=1e-10)


def test_soft_cross_entropy_at_T1_is_plain_cross_entropy_bit_for_bit():
    torch.manual_seed(1)
    logits = torch.randn(2, 9, 6)
    labels = torch.randint(0, 6, (2, 9))
    q = F.one_hot(labels, 6).float()
    loss, grad = soft_cross_entropy(logits, q, torch.ones(2))
    assert torch.equal(loss, -(q * torch.log_softmax(logits, -1)).sum(-1).mean(-1))
    torch.testing.assert_close(loss, torch.stack([F.cross_entropy(logits[i], labels[i]) for i in range(2)]),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(grad, (torch.softmax(logits, -1) - q) / 9, atol=1e-7, rtol=0)


def test_gce_by_hand():
    # p = softmax(ln(1, 2, 1)) = (1/4, 1/2, 1/4); candidates {1, 0}
    logits = torch.tensor([[[0.0, LN2, 0.0]], [[0.0, 0.0, 0.0]]], dtype=torch.float64)
    cands = torch.tensor([[[1, 0]], [[2, 1]]])
    loss, _ = generalized_cross_entropy(logits, cands)
    q = 0.7
    assert GCE_Q == q
    run0 = ((1 - 0.5 ** q) + (1 - 0.25 ** q)) / 2 / q
    run1 = (1 - (1 / 3) ** q) / q
    torch.testing.assert_close(loss, torch.tensor([run0, run1], dtype=torch.float64), atol=1e-12, rtol=0)


def test_gce_gradient_matches_autograd():
    torch.manual_seed(2)
    r, b, k = 2, 6, 5
    logits = torch.randn(r, b, k, dtype=torch.float64, requires_grad=True)
    cands = torch.stack([torch.stack([torch.randperm(k)[:2] for _ in range(b)]) for _ in range(r)])
    loss, grad = generalized_cross_entropy(logits.detach(), cands)
    p_c = torch.softmax(logits, -1).gather(-1, cands)
    ref = ((1 - p_c ** GCE_Q) / GCE_Q).mean(dim=(1, 2))
    torch.testing.assert_close(loss, ref.detach(), atol=1e-12, rtol=1e-12)
    ref.sum().backward()
    torch.testing.assert_close(grad, logits.grad, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5, 0.9])
def test_label_smoothing_matches_torch_cross_entropy(alpha):
    torch.manual_seed(3)
    logits = torch.randn(1, 11, 7, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 7, (1, 11))
    loss, grad = hard_label_cross_entropy(logits.detach(), labels, torch.tensor([alpha], dtype=torch.float64))
    ref = F.cross_entropy(logits[0], labels[0], label_smoothing=alpha)
    assert loss.item() == pytest.approx(ref.item(), abs=1e-12)
    ref.backward()
    torch.testing.assert_close(grad, logits.grad, atol=1e-12, rtol=1e-10)


def test_label_smoothing_by_hand():
    # K = 3, alpha = 0.3: q = (0.1, 0.8, 0.1); logits 0 -> p = 1/3 each; CE = ln 3; grad = (p - q) / B
    loss, grad = hard_label_cross_entropy(torch.zeros(1, 2, 3, dtype=torch.float64), torch.tensor([[1, 1]]),
                                          torch.tensor([0.3], dtype=torch.float64))
    assert loss.item() == pytest.approx(LN3, abs=1e-12)
    third = 1 / 3
    row = [(third - 0.1) / 2, (third - 0.8) / 2, (third - 0.1) / 2]
    torch.testing.assert_close(grad, torch.tensor([[row, row]], dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("alpha", [None, [0.0, 0.0, 0.0], [0.0, 0.1, 0.35]], ids=["none", "zeros", "mixed"])
@pytest.mark.parametrize("batch", [8, 19])
def test_hard_labels_give_the_gradient_of_the_full_target_bit_for_bit(alpha, batch):
    # the trainer never builds the (R, B, K) target; it must still take exactly the same steps
    torch.manual_seed(5)
    logits, labels = torch.randn(3, batch, 6) * 4, torch.randint(0, 6, (3, batch))
    a = torch.zeros(3) if alpha is None else torch.tensor(alpha)
    q = F.one_hot(labels, 6).float() * (1 - a.view(-1, 1, 1)) + a.view(-1, 1, 1) / 6
    ref_loss, ref_grad = soft_cross_entropy(logits, q, torch.ones(3))
    loss, grad = hard_label_cross_entropy(logits, labels, None if alpha is None else a)
    assert torch.equal(grad, ref_grad)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=0)
    if alpha is None:
        assert torch.equal(loss, ref_loss)


def test_soft_cross_entropy_without_temperature_is_T1_bit_for_bit():
    torch.manual_seed(6)
    logits = torch.randn(2, 13, 5) * 3
    q = torch.softmax(torch.randn(2, 13, 5), -1)
    loss, grad = soft_cross_entropy(logits, q)
    ref_loss, ref_grad = soft_cross_entropy(logits, q, torch.ones(2))
    assert torch.equal(loss, ref_loss) and torch.equal(grad, ref_grad)


def test_distillation_targets_are_tempered_softmax():
    z = torch.tensor([[[0.0, 2 * LN3]], [[0.0, 2 * LN3]]], dtype=torch.float64)
    q = distillation_targets(z, torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(q[0, 0], torch.tensor([0.1, 0.9], dtype=torch.float64))
    torch.testing.assert_close(q[1, 0], torch.tensor([0.25, 0.75], dtype=torch.float64))


def test_pll_candidates_are_top2_and_temperature_free():
    z = torch.tensor([[[1.0, 5.0, 3.0, 4.0], [-1.0, -3.0, 0.5, -2.0]]])
    assert pll_candidates(z).tolist() == [[[1, 3], [2, 0]]]
    torch.manual_seed(4)
    z = torch.randn(3, 50, 10)
    top2 = pll_candidates(z)
    for t in (0.3, 2.0, 10.0):
        assert torch.equal(pll_candidates(z / t), top2)
    # the two entries are the two largest logits
    sorted_idx = z.argsort(-1, descending=True)[..., :2]
    assert torch.equal(top2, sorted_idx)
