"""Group-relative (GRPO) advantages.

In S2L-PO a group holds samples from both the explorer and the learner; they are normalised
TOGETHER, over the combined group, exactly like a single-source GRPO group. That is the point of
the method: an explorer success raises the bar the learner's own samples are measured against,
and learner samples are compared with explorer samples of the same prompt.
"""

from __future__ import annotations

import torch


def _check_rewards(rewards: torch.Tensor, name: str = "rewards") -> None:
    if not isinstance(rewards, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (num_groups, group_size), got {type(rewards)}")
    if rewards.dim() != 2:
        raise ValueError(
            f"{name} must have shape (num_groups, group_size), got {tuple(rewards.shape)}; "
            "stack each prompt's rewards as one row"
        )
    if not rewards.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {rewards.dtype}; call .float() first")
    finite = torch.isfinite(rewards).all(dim=1)
    if not bool(finite.all()):
        bad = torch.nonzero(~finite).flatten().tolist()
        raise ValueError(f"{name} rows {bad[:10]} contain NaN or inf; every sample needs a finite reward")


def group_advantages(rewards: torch.Tensor, normalize_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Advantage of every sample relative to its group.

    rewards: (num_groups, group_size) float. Returns the same shape and dtype:
    `(r - mean) / (std + eps)` with the UNBIASED (n - 1) std of each row, as verl and TRL compute
    it, or `r - mean` when `normalize_std=False`.

    Groups whose rewards are all equal (including group_size 1, where the std is undefined) get
    exactly zero advantage: they carry no learning signal, and rounding in the mean must not
    invent one.

    >>> group_advantages(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    tensor([[ 0.7071, -0.7071],
            [ 0.0000,  0.0000]])
    """
    _check_rewards(rewards)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    num_groups, group_size = rewards.shape
    if group_size == 1 or num_groups == 0:
        return torch.zeros_like(rewards)
    mean = rewards.mean(dim=1, keepdim=True)  # (num_groups, 1)
    centred = rewards - mean  # (num_groups, group_size)
    if normalize_std:
        std = rewards.std(dim=1, keepdim=True, unbiased=True)  # (num_groups, 1)
        centred = centred / (std + eps)
    constant = rewards.amax(dim=1, keepdim=True) == rewards.amin(dim=1, keepdim=True)
    return torch.where(constant, torch.zeros_like(centred), centred)
