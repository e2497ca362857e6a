"""Losses and targets as pure functions on batched logits.

Shapes: logits (R, B, K) for R independent runs of B samples each. Every loss returns
(loss per run (R,), gradient w.r.t. the logits (R, B, K)); the trainer chains the gradient into
the linear head by hand, which avoids autograd's per-step overhead on these tiny matmuls. The tests
check every gradient against autograd.
"""
import torch

GCE_Q = 0.7  # the paper's generalised cross-entropy exponent for the PLL student


def label_smoothed_targets(labels: torch.Tensor, num_classes: int, alpha: torch.Tensor) -> torch.Tensor:
    """(1 - alpha) one-hot + alpha / K, torch's CrossEntropyLoss(label_smoothing=alpha) target.

    labels (R, B) int; alpha (R,) float -> (R, B, K). alpha = 0 gives the exact one-hot."""
    a = alpha.to(torch.float32).view(-1, 1, 1)
    one_hot = torch.nn.functional.one_hot(labels, num_classes).to(torch.float32)
    return one_hot * (1 - a) + a / num_classes


def distillation_targets(teacher_logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """softmax(teacher_logits / T), the soft targets of a distillation student. T (R,)."""
    t = temperature.to(teacher_logits.dtype).view(-1, *([1] * (teacher_logits.ndim - 1)))
    return torch.softmax(teacher_logits / t, dim=-1)


def pll_candidates(teacher_logits: torch.Tensor) -> torch.Tensor:
    """Indices of the teacher's two largest logits: the PLL student's candidate set (..., 2).

    Independent of any temperature, since dividing the logits by T > 0 keeps their order."""
    return teacher_logits.topk(2, dim=-1).indices


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: torch.Tensor):
    """T^2 * mean over samples of CE(targets, softmax(logits / T)), and its gradient.

    The T^2 factor (Hinton et al.) keeps the gradient's size independent of T:
    d/dz = T * (softmax(z/T) - q) / B. With T = 1 this is plain cross-entropy against `targets`,
    bit for bit (dividing and multiplying by 1.0 is exact)."""
    t = temperature.to(logits.dtype).view(-1, 1, 1)
    batch = logits.shape[1]
    log_p = torch.log_softmax(logits / t, dim=-1)
    loss = -(targets * log_p).sum(-1).mean(-1) * t.view(-1) ** 2
    grad = (log_p.exp() - targets) * (t / batch)
    return loss, grad


def generalized_cross_entropy(logits: torch.Tensor, candidates: torch.Tensor, q: float = GCE_Q):
    """Mean over samples and candidates of (1 - p_c^q) / q, with p = softmax(logits), and its
    gradient. candidates (R, B, C) class indices (C = 2 for the PLL student).

    d/dz_j (1 - p_c^q)/q = -p_c^q (delta_cj - p_j)."""
    batch, num_cand = logits.shape[1], candidates.shape[-1]
    p = torch.softmax(logits, dim=-1)
    p_c_q = p.gather(-1, candidates).pow(q)                        # (R, B, C)
    loss = ((1 - p_c_q) / q).mean(dim=(1, 2))
    weight = p_c_q / (batch * num_cand)                            # (R, B, C)
    grad = p * weight.sum(-1, keepdim=True)
    grad.scatter_add_(-1, candidates, -weight)
    return loss, grad


def cross_entropy_per_run(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE against hard labels per run, for evaluation. logits (R, N, K), labels (R, N) or (N,)."""
    log_p = torch.log_softmax(logits, dim=-1)
    labels = labels.expand(logits.shape[:2])
    return -log_p.gather(-1, labels.unsqueeze(-1)).squeeze(-1).mean(-1)
