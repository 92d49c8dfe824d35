"""Helpers shared by the preference and RL stages (DPO, PPO, GRPO, SPO): per-token log-probs,
sequence log-probs, rewards and rollouts live here once."""
import torch
import torch.nn.functional as F


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target_t | prefix) for every position: (B, T, V), (B, T) -> (B, T) in fp32.

    cross_entropy computes the log-softmax row by row without keeping a (B, T, V) log-prob tensor
    for the backward pass next to the logits (the original materialised it with log_softmax+gather)."""
    b, t, v = logits.shape
    return -F.cross_entropy(logits.reshape(-1, v).float(), targets.reshape(-1), reduction="none").view(b, t)


def sequence_logps(logp: torch.Tensor, mask: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Masked per-sequence log-prob: the mean over supervised tokens (the original's DPO) or the sum."""
    total = (logp * mask).sum(-1)
    if reduction == "sum":
        return total
    return total / mask.sum(-1).clamp_min(1e-8)
