"""Resumable training order and train-time modality dropout.

The order of an epoch is a pure function of ``(seed, epoch)`` (and the rank, under DDP), so a
resumed run rebuilds it and skips the first ``position`` batches: exactly the batches the killed
run already trained on. No generator state has to be stored for the sampler.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

from clinical_moe.data.dataset import ModalityCountSampler


class TrainSampler(Sampler[int]):
    """Shuffled (``random``) or Flex-MoE warm-up (``by_modality_count``) order, resumable mid-epoch.

    Under DDP every rank takes an interleaved slice of the same order, dropping the tail so that all
    ranks run the same number of steps (unequal step counts would hang the gradient all-reduce).

    Args:
        present: ``bool[N, M]`` natural missingness of the training split.
        kind: ``"random"`` or ``"by_modality_count"``.
        seed: Run seed.
        warmup_epochs: Ordered epochs for ``by_modality_count``.
        num_replicas: DDP world size.
        rank: This process's rank.
    """

    def __init__(
        self,
        present: np.ndarray,
        kind: str = "random",
        seed: int = 0,
        warmup_epochs: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if kind not in ("random", "by_modality_count"):
            raise ValueError(f"unknown sampler {kind!r}; use random or by_modality_count")
        self.n = len(present)
        self.kind, self.seed = kind, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch, self.start = 0, 0
        self._count = ModalityCountSampler(present, warmup_epochs, seed, num_replicas, rank)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's order and skip its first ``start`` indices (resume)."""
        self.epoch, self.start = epoch, start
        self._count.set_epoch(epoch)

    def order(self) -> np.ndarray:
        """This rank's full order for the current epoch (before skipping)."""
        if self.kind == "by_modality_count":
            return self._count.order()
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=gen).numpy()
        n = self.n - self.n % self.num_replicas
        return perm[:n][self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.start :].tolist())

    def __len__(self) -> int:
        return max(0, len(self.order()) - self.start)


def modality_dropout(
    present: torch.Tensor, p: float, generator: torch.Generator, single: float = 0.0
) -> torch.Tensor:
    """Drop each observed modality with probability ``p``, never all of a sample's modalities.

    Args:
        present: ``BoolTensor[B, M]``, at least one True per row.
        p: Drop probability in ``[0, 1)``.
        generator: CPU generator (its state is checkpointed, so resumed runs draw the same masks).
        single: Share of rows shown exactly one of their modalities, chosen uniformly among the
            present ones (the evaluation's single-modality patterns, e.g. CXR-only, which
            independent drops at ``p`` = 0.3 rarely produce for a stay with four modalities).
            The other rows get the independent drops. 0 (default) draws exactly what earlier
            versions drew.

    Returns:
        A new ``BoolTensor[B, M]`` that is a subset of ``present`` with >= 1 True per row: when every
        observed modality of a row is drawn for dropping, the one with the highest draw is kept.
    """
    if p <= 0 and single <= 0:
        return present
    u = torch.rand(present.shape, generator=generator).to(present.device)  # (B, M)
    keep = present & (u >= p)
    empty = ~keep.any(1) & present.any(1)  # (B,)
    if bool(empty.any()):
        score = torch.where(present, u, torch.full_like(u, -1.0))  # (B, M)
        rescue = torch.zeros_like(present).scatter_(1, score.argmax(1, keepdim=True), True)
        keep = torch.where(empty.unsqueeze(1), rescue & present, keep)
    if single > 0:
        rows = torch.rand(present.shape[0], generator=generator).to(present.device) < single  # (B,)
        pick = torch.rand(present.shape, generator=generator).to(present.device)  # (B, M)
        pick = torch.where(present, pick, torch.full_like(pick, -1.0))
        one = torch.zeros_like(present).scatter_(1, pick.argmax(1, keepdim=True), True) & present
        keep = torch.where(rows.unsqueeze(1), one, keep)
    return keep
