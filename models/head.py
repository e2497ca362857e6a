"""The linear head: nn.Linear(d, K, bias=False), kept as a weight matrix so R heads stack."""
import math

import torch


def init_head_weights(num_classes: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """Same distribution as nn.Linear's default init: U(-1/sqrt(d), 1/sqrt(d)), float32 (K, d)."""
    bound = 1.0 / math.sqrt(dim)
    return (torch.rand(num_classes, dim, generator=generator, dtype=torch.float32) * 2 - 1) * bound


def head_state_dict(weight: torch.Tensor) -> dict:
    """Checkpoint form: loadable into nn.Linear(d, K, bias=False).load_state_dict."""
    return {"weight": weight.detach().cpu().clone()}
