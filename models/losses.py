"""BLIP's retrieval losses as small functions of tensors (written by hand: no library has them).

ITC: contrastive loss with momentum distillation, positives = every entry with the same image id.
ITM: 2-way matching loss on positives and hard negatives sampled by contrastive similarity.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

IGNORED_LABEL = -100  # cross_entropy's default ignore_index


def same_id_targets(idx: torch.Tensor, idx_all: torch.Tensor) -> torch.Tensor:
    """(B,) ids of the batch vs (K,) ids of the candidates -> (B, K) positives, each row summing to 1."""
    positives = (idx[:, None] == idx_all[None, :]).float()
    return positives / positives.sum(dim=1, keepdim=True)


def distilled_targets(sim_momentum: torch.Tensor, hard_targets: torch.Tensor, alpha: float) -> torch.Tensor:
    """Mix the momentum model's soft predictions with the ground-truth positives."""
    return alpha * F.softmax(sim_momentum, dim=1) + (1 - alpha) * hard_targets


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum(targets * log_softmax(logits))."""
    return -(F.log_softmax(logits, dim=1) * targets).sum(dim=1).mean()


def itc_loss(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor,
             targets_i2t: torch.Tensor, targets_t2i: torch.Tensor) -> torch.Tensor:
    """Image-text contrastive loss, averaged over both directions."""
    return (soft_cross_entropy(sim_i2t, targets_i2t) + soft_cross_entropy(sim_t2i, targets_t2i)) / 2


def hard_negative_weights(sim: torch.Tensor, same_id: torch.Tensor) -> torch.Tensor:
    """Sampling weights for hard negatives: softmax of the similarities, same-image entries set to 0."""
    return F.softmax(sim.float(), dim=1).masked_fill(same_id, 0)


def itm_loss(logits: torch.Tensor, batch_size: int, no_negative: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Cross-entropy of the 2-way head: the first `batch_size` rows are matches, the rest negatives.

    `no_negative` flags negative rows that had no candidate: they are left out of the mean (an ignored label, so
    that with none flagged the loss is computed exactly as without them).
    """
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    labels[:batch_size] = 1
    if no_negative is not None:
        labels[batch_size:] = labels[batch_size:].masked_fill(no_negative, IGNORED_LABEL)
    return F.cross_entropy(logits, labels, ignore_index=IGNORED_LABEL)
