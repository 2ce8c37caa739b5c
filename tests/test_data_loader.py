"""Tests for repa_probe.data's order: ResumableSampler, infinite_loader (exact resume, with workers) and the
stateless per-epoch flips."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from repa_probe.data import DatasetError, ResumableSampler, collate, flip_coin, infinite_loader


# ----------------------------------------------------------------------------- sampler
class _IndexDataset(Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"image": torch.zeros(3, 2, 2, dtype=torch.uint8), "label": torch.tensor(i, dtype=torch.int64)}


def test_sampler_ranks_disjoint_and_cover():
    for n, drop in ((40, True), (43, True), (43, False)):
        parts = [ResumableSampler(n, seed=5, rank=r, world_size=4, drop_last=drop) for r in range(4)]
        idx = [list(p) for p in parts]
        assert len({len(x) for x in idx}) == 1 and all(len(x) == len(parts[0]) for x in idx)
        flat = sum(idx, [])
        if drop:
            assert len(set(flat)) == len(flat) == 4 * (n // 4)
        else:
            assert set(flat) == set(range(n)) and len(flat) == 4 * 11
    a, b = ResumableSampler(40, seed=5, rank=0, world_size=2), ResumableSampler(40, seed=5, rank=1, world_size=2)
    assert not set(a) & set(b) and set(a) | set(b) == set(range(40))


def test_sampler_epochs_differ_and_are_seeded():
    s = ResumableSampler(50, seed=1)
    e0, e1 = s.epoch_indices(0), s.epoch_indices(1)
    assert sorted(e0.tolist()) == sorted(e1.tolist()) == list(range(50)) and not torch.equal(e0, e1)
    assert torch.equal(ResumableSampler(50, seed=1).epoch_indices(0), e0)
    assert not torch.equal(ResumableSampler(50, seed=2).epoch_indices(0), e0)
    assert list(ResumableSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]


def test_sampler_advance_and_state():
    s = ResumableSampler(10, batch_size=4, seed=0)
    assert len(s) == 8
    full = list(s)
    s.advance(4)
    assert list(s) == full[4:] and s.state_dict()["position"] == 4
    s.advance(4)
    assert (s.epoch, s.position) == (1, 0) and list(s) == s.epoch_indices(1).tolist()
    with pytest.raises(DatasetError):
        s.advance(12)
    with pytest.raises(DatasetError, match="world_size"):
        ResumableSampler(10, batch_size=4, world_size=2).load_state_dict(s.state_dict())
    t = ResumableSampler(10, batch_size=4, seed=0)
    t.load_state_dict({"epoch": 3, "position": 4})
    assert list(t) == t.epoch_indices(3)[4:].tolist()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_infinite_loader_resume_is_exact(num_workers):
    n, bs, ws = 23, 4, 2
    ds = _IndexDataset(n)
    for rank in range(ws):
        ref_sampler = ResumableSampler(n, seed=7, rank=rank, world_size=ws)
        ref_it = infinite_loader(ds, ref_sampler, bs, num_workers=num_workers)
        ref = [next(ref_it)["label"].tolist() for _ in range(9)]  # 11 per rank -> 2 batches/epoch: > 4 epochs
        s1 = ResumableSampler(n, seed=7, rank=rank, world_size=ws)
        it = infinite_loader(ds, s1, bs, num_workers=num_workers)
        first = [next(it)["label"].tolist() for _ in range(3)]  # stops mid-epoch (epoch 1, 1 batch in)
        state = s1.state_dict()
        assert (state["epoch"], state["position"]) == (1, 4)
        del it
        s2 = ResumableSampler(n, seed=7, rank=rank, world_size=ws)
        s2.load_state_dict(state)
        it2 = infinite_loader(ds, s2, bs, num_workers=num_workers)
        rest = [next(it2)["label"].tolist() for _ in range(6)]
        assert first + rest == ref
        assert ref[0] != ref[2]  # epochs differ
        del it2, ref_it


def test_collate_stacks_and_checks():
    b = collate([{"image": torch.zeros(3, 2, 2), "label": torch.tensor(1)},
                 {"image": torch.ones(3, 2, 2), "label": torch.tensor(2)}])
    assert b["image"].shape == (2, 3, 2, 2) and b["label"].tolist() == [1, 2]
    with pytest.raises(DatasetError, match="image"):
        collate([{"image": torch.zeros(3, 2, 2)}, {"image": torch.zeros(3, 4, 4)}])


# ----------------------------------------------------------------------------- resumable flips
def test_flip_coin_is_stateless_about_half_and_new_each_epoch():
    idx = range(4000)
    e0 = [flip_coin(3, 0, i) for i in idx]
    assert 0.46 < sum(e0) / len(e0) < 0.54
    assert e0 == [flip_coin(3, 0, i) for i in idx]  # no state: the same answer on every call
    e1 = [flip_coin(3, 1, i) for i in idx]
    assert 0.46 < sum(a != b for a, b in zip(e0, e1)) / len(e0) < 0.54  # independent across epochs
    assert e0 != [flip_coin(4, 0, i) for i in idx]  # and across seeds


class _AsymmetricDataset(Dataset):
    """Sample i: image / moments / mask whose columns count up from i, so a flip along W is visible."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        ramp = torch.arange(4) + i
        return {"image": ramp.to(torch.uint8).expand(3, 2, 4).clone(), "moments": ramp.float().expand(2, 2, 4).clone(),
                "mask": ramp.expand(2, 4).clone(), "label": torch.tensor(i)}


def test_loader_flips_all_spatial_keys_by_seed_epoch_index_and_resumes_exactly():
    n, bs, seed = 24, 4, 5
    ds = _AsymmetricDataset(n)
    it = infinite_loader(ds, ResumableSampler(n, batch_size=bs, seed=seed), bs, num_workers=2, flip=True)
    batches = [next(it) for _ in range(3 * n // bs)]  # 3 epochs
    del it
    flipped = {}
    for k, b in enumerate(batches):
        epoch = k // (n // bs)
        for row, i in enumerate(b["label"].tolist()):
            ramp = torch.arange(4) + i
            f = flip_coin(seed, epoch, i)
            want = ramp.flip(-1) if f else ramp
            assert torch.equal(b["image"][row, 1, 1], want.to(torch.uint8))
            assert torch.equal(b["moments"][row, 0, 1], want.float()) and torch.equal(b["mask"][row, 1], want)
            flipped.setdefault(epoch, {})[i] = f
    assert all(0.2 < sum(e.values()) / n < 0.8 for e in flipped.values())  # flips happen (about half) ...
    assert flipped[0] != flipped[1] != flipped[2]  # ... and differ across epochs
    resumed = ResumableSampler(n, batch_size=bs, seed=seed)  # after 7 batches (epoch 1, 1 batch in), new workers
    resumed.load_state_dict({"epoch": 1, "position": bs})
    rest = infinite_loader(ds, resumed, bs, num_workers=2, flip=True)
    for b in batches[7:]:
        r = next(rest)
        assert all(torch.equal(r[key], b[key]) for key in b)


def test_loader_options_are_the_keywords_and_not_both():
    from repa_probe.data import LoaderOptions

    ds = _IndexDataset(12)
    a = infinite_loader(ds, ResumableSampler(12, batch_size=4, seed=1), 4, LoaderOptions(drop_last=True))
    b = infinite_loader(ds, ResumableSampler(12, batch_size=4, seed=1), 4, drop_last=True)
    assert [next(a)["label"].tolist() for _ in range(4)] == [next(b)["label"].tolist() for _ in range(4)]
    with pytest.raises(TypeError, match="not both"):
        next(infinite_loader(ds, ResumableSampler(12, batch_size=4), 4, LoaderOptions(), flip=True))
