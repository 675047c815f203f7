"""Sharded global batches (DESIGN §6): disjoint per-rank shares, configured global size, resumable."""

from __future__ import annotations

import torch

from raykd.train.sampler import GlobalBatchSampler


def shares(n, batch, world, step, seed=0):
    return [GlobalBatchSampler(n, batch, r, world, seed).indices(step) for r in range(world)]


def test_ranks_draw_disjoint_shares_of_one_global_batch():
    for world in (1, 2, 4):
        parts = shares(100, 16, world, step=3)
        assert all(len(p) == 16 // world for p in parts)
        joined = torch.cat(parts)
        assert len(set(joined.tolist())) == 16  # disjoint, and together the configured global batch
        assert torch.equal(joined, shares(100, 16, 1, step=3)[0])  # same global batch for any world size


def test_each_epoch_is_a_permutation_and_epochs_differ():
    s = GlobalBatchSampler(40, 8, 0, 1, seed=1)
    epoch0 = torch.cat([s.indices(k) for k in range(5)])
    epoch1 = torch.cat([s.indices(k) for k in range(5, 10)])
    assert sorted(epoch0.tolist()) == list(range(40)) == sorted(epoch1.tolist())
    assert not torch.equal(epoch0, epoch1)


def test_batches_larger_than_the_dataset_wrap_across_epochs():
    s = GlobalBatchSampler(5, 12, 0, 1, seed=0)
    idx = s.indices(0)
    assert len(idx) == 12 and set(idx.tolist()) == set(range(5))


def test_indices_are_a_function_of_the_step_so_resume_is_exact():
    a = GlobalBatchSampler(50, 10, 1, 2, seed=3)
    seq = [a.indices(k) for k in range(12)]
    b = GlobalBatchSampler(50, 10, 1, 2, seed=3)
    assert all(torch.equal(b.indices(k), seq[k]) for k in range(7, 12))
