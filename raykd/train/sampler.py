"""Sharded global batches.

Each rank draws its own disjoint share of every global batch.  The order is a seeded permutation per
pass over the data ("epoch"), the same on every rank; global batch ``s`` is positions
``[s*G, (s+1)*G)`` of the endless sequence of permutations, and rank ``r`` of ``W`` takes the
contiguous slice ``[r*G/W, (r+1)*G/W)`` of it.  The indices of a step are a pure function of
``(seed, step, rank, world_size)``: a resumed run continues exactly where it stopped, and the global
batch is the configured size whatever the worker count.
"""

from __future__ import annotations

import torch


class GlobalBatchSampler:
    """Indices of this rank's share of each global batch over a dataset of ``n`` samples.

    Args:
        n: dataset size.
        global_batch: samples per global batch (must be divisible by ``world_size``).
        rank, world_size: this worker's place in the DDP group.
        seed: permutation seed (different streams should use different seeds).
    """

    def __init__(self, n: int, global_batch: int, rank: int, world_size: int, seed: int):
        if n <= 0:
            raise ValueError("cannot sample from an empty dataset")
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by world size {world_size}")
        self.n, self.global_batch = n, global_batch
        self.local = global_batch // world_size
        self.offset = rank * self.local
        self.seed = seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        perm = self._perms.get(epoch)
        if perm is None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.n, generator=g)
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = perm
        return perm

    def indices(self, step: int) -> torch.Tensor:
        """This rank's indices for global step ``step`` (0-based)."""
        start = step * self.global_batch + self.offset
        pos = torch.arange(start, start + self.local)
        epochs = pos // self.n
        out = torch.empty(self.local, dtype=torch.long)
        for e in torch.unique(epochs).tolist():
            sel = epochs == e
            out[sel] = self._perm(e)[pos[sel] % self.n]
        return out
