"""Losses and targets as pure functions on batched logits.

Shapes: logits (R, B, K) for R independent runs of B samples each. Every loss returns
(loss per run (R,), gradient w.r.t. the logits (R, B, K)); the trainer chains the gradient into
the linear head by hand, which avoids autograd's per-step overhead on these tiny matmuls. The tests
check every gradient against autograd.
"""
import torch

GCE_Q = 0.7  # the paper's generalised cross-entropy exponent for the PLL student


def distillation_targets(teacher_logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """softmax(teacher_logits / T), the soft targets of a distillation student. T (R,)."""
    t = temperature.to(teacher_logits.dtype).view(-1, *([1] * (teacher_logits.ndim - 1)))
    return torch.softmax(teacher_logits / t, dim=-1)


def pll_candidates(teacher_logits: torch.Tensor) -> torch.Tensor:
    """Indices of the teacher's two largest logits: the PLL student's candidate set (..., 2).

    Independent of any temperature, since dividing the logits by T > 0 keeps their order."""
    return teacher_logits.topk(2, dim=-1).indices


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature=None):
    """T^2 * mean over samples of CE(targets, softmax(logits / T)), and its gradient.

    The T^2 factor (Hinton et al.) keeps the gradient's size independent of T:
    d/dz = T * (softmax(z/T) - q) / B. temperature (R,) or None for T = 1, which skips the
    scaling passes and gives the same bits as T = 1.0 (dividing and multiplying by 1.0 is exact)."""
    batch = logits.shape[1]
    if temperature is None:
        log_p = torch.log_softmax(logits, dim=-1)
        loss = -(targets * log_p).sum(-1).mean(-1)
        return loss, (log_p.exp() - targets).mul_(1.0 / batch)
    t = temperature.to(logits.dtype).view(-1, 1, 1)
    log_p = torch.log_softmax(logits / t, dim=-1)
    loss = -(targets * log_p).sum(-1).mean(-1) * t.view(-1) ** 2
    grad = (log_p.exp() - targets) * (t / batch)
    return loss, grad


def hard_label_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, alpha=None):
    """Mean over samples of CE against label-smoothed targets q = (1 - alpha) one-hot + alpha / K
    (torch's CrossEntropyLoss(label_smoothing=alpha)), and its gradient (p - q) / B.

    labels (R, B) int; alpha (R,) float or None for plain one-hot targets. The targets are never
    built: the gradient is p - alpha / K with the label's entry overwritten by p_y - q_y, which is
    bit for bit what subtracting the full target gives, in two (R, B, K) passes fewer."""
    batch, num_classes = logits.shape[1], logits.shape[-1]
    log_p = torch.log_softmax(logits, dim=-1)
    at_label = labels.unsqueeze(-1)
    log_p_label = log_p.gather(-1, at_label).squeeze(-1)           # (R, B)
    p = log_p.exp()
    if alpha is None:
        loss = -log_p_label.mean(-1)
        grad = p.scatter_add_(-1, at_label, torch.full_like(log_p_label, -1.0).unsqueeze(-1))
    else:
        a = alpha.to(logits.dtype).view(-1, 1, 1)
        off_label = a / num_classes
        loss = -((1 - a[..., 0]) * log_p_label + off_label[..., 0] * log_p.sum(-1)).mean(-1)
        q_label = (1 - a) + off_label
        grad = (p - off_label).scatter_(-1, at_label, p.gather(-1, at_label) - q_label)
    return loss, grad.mul_(1.0 / batch)


def generalized_cross_entropy(logits: torch.Tensor, candidates: torch.Tensor, q: float = GCE_Q):
    """Mean over samples and candidates of (1 - p_c^q) / q, with p = softmax(logits), and its
    gradient. candidates (R, B, C) class indices (C = 2 for the PLL student).

    d/dz_j (1 - p_c^q)/q = -p_c^q (delta_cj - p_j)."""
    batch, num_cand = logits.shape[1], candidates.shape[-1]
    log_p = torch.log_softmax(logits, dim=-1)
    p = log_p.exp()
    # p_c^q as exp(q log p_c): torch's pow rounds the tail of a tensor (scalar code) differently
    # from its body (vector code), so a run's numbers would depend on its place in the batch
    p_c_q = log_p.gather(-1, candidates).mul_(q).exp_()           # (R, B, C)
    loss = ((1 - p_c_q) / q).mean(dim=(1, 2))
    weight = p_c_q / (batch * num_cand)                            # (R, B, C)
    grad = p * weight.sum(-1, keepdim=True)
    grad.scatter_add_(-1, candidates, -weight)
    return loss, grad
