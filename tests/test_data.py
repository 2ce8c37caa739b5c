"""Tests for repa_probe.data: datasets, centre crop, REPA layout, build_dataset, sampler, resumable flips."""
from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from repa_probe.data import (DATASET_NAMES, DatasetError, DigitsDataset, ImageFolderDataset, REPAFeatureDataset,
                             ShapesDataset, build_dataset, center_crop_arr, collate)


def _digest(img: torch.Tensor) -> bytes:
    return img.numpy().tobytes()


# ----------------------------------------------------------------------------- shapes
def test_shapes_sample_contract():
    ds = ShapesDataset(20, resolution=24, num_classes=5, seed=3)
    s = ds[7]
    assert s["image"].shape == (3, 24, 24) and s["image"].dtype == torch.uint8
    assert s["label"].shape == () and s["label"].dtype == torch.int64
    assert s["mask"].shape == (24, 24) and s["mask"].dtype == torch.int64
    assert len(ds) == 20 and ds.num_classes == 5 and ds.num_mask_classes == 6 and ds.resolution == 24
    assert ds.class_names == ["square", "circle", "triangle", "cross", "diamond"]
    with pytest.raises(IndexError):
        ds[20]


def test_shapes_deterministic_per_index():
    a, b = ShapesDataset(50, seed=1), ShapesDataset(500, seed=1)  # length must not matter
    for i in (0, 13, 49):
        assert torch.equal(a[i]["image"], b[i]["image"]) and torch.equal(a[i]["mask"], b[i]["mask"])
    c = ShapesDataset(50, seed=2)
    assert not torch.equal(a[13]["image"], c[13]["image"])
    batch = a.render(range(50), chunk=16)  # chunked batch rendering == per-item rendering
    assert torch.equal(batch["image"][13], a[13]["image"]) and torch.equal(batch["mask"][49], a[49]["mask"])


def test_shapes_splits_disjoint_and_samples_distinct():
    seen = {}
    for split in ("train", "val", "test"):
        imgs = ShapesDataset(150, seed=0, split=split).render(range(150))["image"]
        seen[split] = {_digest(x) for x in imgs}
        assert len(seen[split]) == 150
    assert not seen["train"] & seen["val"] and not seen["train"] & seen["test"] and not seen["val"] & seen["test"]


def test_shapes_mask_matches_class():
    ds = ShapesDataset(64, resolution=32, num_classes=8)
    b = ds.render(range(64))
    assert torch.equal(torch.bincount(b["label"], minlength=8), torch.full((8,), 8))
    for mask, label in zip(b["mask"], b["label"]):
        vals = set(mask.unique().tolist())
        assert vals == {0, int(label) + 1}  # background and this sample's shape, nothing else
        area = (mask > 0).float().mean()
        assert 0.02 < area < 0.6
    # geometry: a circle fills ~pi/4 of its bounding box, a (near-axis-aligned) square much more
    def fill(i):
        ys, xs = torch.nonzero(b["mask"][i] > 0, as_tuple=True)
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        return (b["mask"][i] > 0).sum().item() / box.item()
    circles = [fill(i) for i in range(64) if b["label"][i] == 1]
    rings = [fill(i) for i in range(64) if b["label"][i] == 5]
    assert 0.65 < np.mean(circles) < 0.9 and np.mean(rings) < np.mean(circles) - 0.1


def test_shapes_shape_pixels_differ_from_background():
    b = ShapesDataset(32, resolution=32).render(range(32))
    img = b["image"].float()
    inside = (b["mask"] > 0)[:, None].expand_as(img)
    fg = (img * inside).sum((2, 3)) / inside.sum((2, 3))
    bg = (img * ~inside).sum((2, 3)) / (~inside).sum((2, 3))
    assert ((fg - bg).norm(dim=1) > 20).float().mean() > 0.9  # shapes stand out from the mean background


def test_shapes_bad_args():
    with pytest.raises(DatasetError):
        ShapesDataset(10, num_classes=9)
    with pytest.raises(DatasetError, match="split"):
        ShapesDataset(10, split="dev")


# ----------------------------------------------------------------------------- digits
def test_digits_split_and_contract():
    tr, te = DigitsDataset("train", resolution=16), DigitsDataset("test", resolution=16)
    assert len(tr) + len(te) == 1797 and abs(len(te) - 0.2 * 1797) <= 1
    assert not set(tr.indices.tolist()) & set(te.indices.tolist())
    assert set(tr.labels.tolist()) == set(range(10)) == set(te.labels.tolist())
    frac_tr = torch.bincount(tr.labels) / len(tr)
    frac_te = torch.bincount(te.labels) / len(te)
    assert (frac_tr - frac_te).abs().max() < 0.02  # stratified
    s = tr[5]
    assert s["image"].shape == (3, 16, 16) and s["image"].dtype == torch.uint8 and s["label"].dtype == torch.int64
    assert torch.equal(s["image"][0], s["image"][2])
    assert np.array_equal(DigitsDataset("train", seed=0).indices, tr.indices)
    assert not np.array_equal(DigitsDataset("train", seed=1).indices, tr.indices)


def test_digits_native_resolution_is_exact():
    from sklearn.datasets import load_digits
    ds = DigitsDataset("test", resolution=8)
    i = 11
    raw = load_digits().images[ds.indices[i]]
    expected = torch.from_numpy(np.rint(raw * 255.0 / 16.0).astype(np.uint8))
    assert torch.equal(ds[i]["image"][1], expected)
    assert int(ds[i]["label"]) == int(load_digits().target[ds.indices[i]])


# ----------------------------------------------------------------------------- centre crop
def _rand_img(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_center_crop_no_resize_case_is_plain_crop():
    img = _rand_img(6, 3)
    out = center_crop_arr(img, 3)  # short side == 3: no resize; crop x offset (6-3)//2 = 1 (floor)
    assert np.array_equal(out, np.asarray(img)[:, 1:4])
    tall = _rand_img(4, 9)
    assert np.array_equal(center_crop_arr(tall, 4), np.asarray(tall)[2:6])  # y offset (9-4)//2 = 2


def test_center_crop_box_halving_case():
    arr = np.random.default_rng(1).integers(0, 256, (4, 6, 3)).astype(np.uint8)  # H=4, W=6
    out = center_crop_arr(Image.fromarray(arr), 2)
    # short side 4 >= 2*2 -> BOX halve to 3x2 (W x H), already the right size, crop x offset (3-2)//2 = 0
    blocks = arr.astype(np.float64).reshape(2, 2, 3, 2, 3).mean(axis=(1, 3))  # (2, 3, 3) block means
    assert out.shape == (2, 2, 3)
    assert np.abs(out.astype(np.float64) - blocks[:, :2]).max() <= 1.0


@pytest.mark.parametrize("w,h,s", [(300, 200, 64), (64, 1000, 64), (97, 131, 32), (20, 10, 32)])
def test_center_crop_output_size(w, h, s):
    assert center_crop_arr(_rand_img(w, h), s).shape == (s, s, 3)


# ----------------------------------------------------------------------------- image folder
@pytest.fixture
def image_root(tmp_path):
    root = tmp_path / "imgs"
    sizes = {"b_cat": [(40, 30), (33, 50)], "a_dog": [(64, 48), (20, 20), (50, 40)]}
    for k, (cls, szs) in enumerate(sorted(sizes.items())):
        (root / cls / "sub").mkdir(parents=True)
        for j, (w, h) in enumerate(szs):
            ext = "JPEG" if j % 2 else "png"
            _rand_img(w, h, seed=10 * k + j).save(root / cls / f"im{j}.{ext}")
    (root / "a_dog" / "sub" / "x.png").write_bytes(b"")  # nested file: an empty (corrupt) PNG
    (root / "a_dog" / "notes.txt").write_text("not an image")
    return root


def test_imagefolder_reads_and_crops(image_root):
    ds = ImageFolderDataset(str(image_root), resolution=16)
    assert ds.class_names == ["a_dog", "b_cat"] and ds.num_classes == 2 and ds.resolution == 16
    assert len(ds) == 6  # 3 + 1 nested (corrupt) + 2; the .txt is ignored
    assert ds.labels.tolist() == [0, 0, 0, 0, 1, 1]
    s = ds[4]
    assert s["image"].shape == (3, 16, 16) and s["image"].dtype == torch.uint8 and int(s["label"]) == 1
    with Image.open(ds.samples[4][0]) as im:
        ref = center_crop_arr(im.convert("RGB"), 16)
    assert torch.equal(s["image"], torch.from_numpy(ref).permute(2, 0, 1))
    assert ds.skipped == 0


def test_imagefolder_corrupt_file_skipped_and_counted(image_root, caplog):
    ds = ImageFolderDataset(str(image_root), resolution=16)
    bad = [i for i, (p, _) in enumerate(ds.samples) if p.endswith("x.png")][0]
    with caplog.at_level(logging.WARNING, logger="repa_probe.data.imagefolder"):
        s = ds[bad]
        s2 = ds[bad]
    assert torch.equal(s["image"], ds[bad + 1]["image"]) and torch.equal(s2["image"], s["image"])
    assert ds.skipped == 1
    assert sum("x.png" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(DatasetError, match="x.png"):
        ImageFolderDataset(str(image_root), resolution=16, strict=True)[bad]


def test_imagefolder_skip_counted_from_worker(image_root):
    ds = ImageFolderDataset(str(image_root), resolution=8)
    bad = [i for i, (p, _) in enumerate(ds.samples) if p.endswith("x.png")][0]
    loader = DataLoader(ds, batch_size=1, sampler=[bad], num_workers=1, collate_fn=collate)
    assert len(list(loader)) == 1
    assert ds.skipped == 1  # the worker's flag is visible in the main process


def test_imagefolder_empty_errors(tmp_path):
    with pytest.raises(DatasetError, match="no class"):
        ImageFolderDataset(str(tmp_path))
    (tmp_path / "c0").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        ImageFolderDataset(str(tmp_path))
    with pytest.raises(DatasetError, match="not a directory"):
        ImageFolderDataset(str(tmp_path / "missing"))


# ----------------------------------------------------------------------------- REPA layout
def _make_repa(root, n=3, res=16, moments=(8, 4, 4)):
    rng = np.random.default_rng(0)
    labels_img, labels_feat, imgs, moms = [], [], [], []
    for idx in range(n):
        s = f"{idx:08d}"
        img = rng.integers(0, 256, (res, res, 3), dtype=np.uint8)
        mom = rng.standard_normal(moments).astype(np.float32)
        (root / "images" / s[:5]).mkdir(parents=True, exist_ok=True)
        (root / "vae-sd" / s[:5]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / "images" / s[:5] / f"img{s}.png", compress_level=0)
        np.save(root / "vae-sd" / s[:5] / f"img-mean-std-{s}.npy", mom)
        labels_img.append([f"{s[:5]}/img{s}.png", (idx * 7) % 5])
        labels_feat.append([f"{s[:5]}/img-mean-std-{s}.npy", (idx * 7) % 5])
        imgs.append(img)
        moms.append(mom)
    (root / "images" / "dataset.json").write_text(json.dumps({"labels": labels_img}))
    (root / "vae-sd" / "dataset.json").write_text(json.dumps({"labels": labels_feat}))
    return imgs, moms, [lab for _, lab in labels_feat]


def test_repa_layout_read_as_is(tmp_path):
    imgs, moms, labels = _make_repa(tmp_path, n=4)
    ds = REPAFeatureDataset(str(tmp_path))
    assert len(ds) == 4 and ds.resolution == 16 and ds.num_classes == max(labels) + 1
    for i in range(4):
        s = ds[i]
        assert s["image"].dtype == torch.uint8 and s["moments"].dtype == torch.float32
        assert torch.equal(s["image"], torch.from_numpy(imgs[i]).permute(2, 0, 1))
        assert torch.equal(s["moments"], torch.from_numpy(moms[i]))
        assert s["label"].dtype == torch.int64 and int(s["label"]) == labels[i]
    assert REPAFeatureDataset(str(tmp_path), num_classes=1000).num_classes == 1000


def test_repa_layout_errors(tmp_path):
    _make_repa(tmp_path, n=3)
    with pytest.raises(DatasetError, match="expected \\(3, 32, 32\\)"):
        REPAFeatureDataset(str(tmp_path), resolution=32)
    os.remove(tmp_path / "vae-sd" / "00000" / "img-mean-std-00000002.npy")
    with pytest.raises(DatasetError, match="counts must match"):
        REPAFeatureDataset(str(tmp_path))
    with pytest.raises(DatasetError, match="missing folder"):
        REPAFeatureDataset(str(tmp_path / "nowhere"))


def test_repa_layout_unpaired_and_unlabelled(tmp_path):
    _make_repa(tmp_path, n=2)
    os.rename(tmp_path / "images" / "00000" / "img00000001.png", tmp_path / "images" / "00000" / "img00000005.png")
    with pytest.raises(DatasetError, match="do not pair"):
        REPAFeatureDataset(str(tmp_path))
    os.rename(tmp_path / "images" / "00000" / "img00000005.png", tmp_path / "images" / "00000" / "img00000001.png")
    (tmp_path / "vae-sd" / "dataset.json").write_text(json.dumps({"labels": None}))
    with pytest.raises(DatasetError, match="null"):
        REPAFeatureDataset(str(tmp_path))


# ----------------------------------------------------------------------------- build_dataset
def test_build_dataset_names_and_errors(tmp_path, image_root):
    with pytest.raises(DatasetError) as e:
        build_dataset("cifar")
    assert all(n in str(e.value) for n in DATASET_NAMES)
    ds = build_dataset("shapes", split="val", resolution=16, num_samples=12, seed=4, num_classes=3)
    assert isinstance(ds, ShapesDataset) and len(ds) == 12 and ds.num_classes == 3 and ds.split == "val"
    with pytest.raises(DatasetError, match="does not take"):
        build_dataset("imagefolder", root=str(image_root), random_flip=True)  # flips belong to the loader
    capped = build_dataset({"name": "digits", "num_samples": 100, "batch_size": 8}, split="test")
    assert len(capped) == 100 and capped.num_classes == 10 and len(set(capped.labels[capped.indices].tolist())) == 10
    img = build_dataset("imagefolder", root=str(image_root), resolution=8)
    assert len(img) == 6 and img[0]["image"].shape == (3, 8, 8)
    with pytest.raises(DatasetError, match="'val'"):
        build_dataset("imagefolder", root=str(image_root), split="val")
    _make_repa(tmp_path / "data" / "train", n=2)
    repa = build_dataset("repa", root=str(tmp_path / "data"), resolution=16)
    assert len(repa) == 2 and "moments" in repa[0]
    with pytest.raises(DatasetError, match="needs root"):
        build_dataset("repa")


def test_shapes_batched_fetch_equals_items():
    from torch.utils.data import DataLoader

    from repa_probe.data import collate

    ds = ShapesDataset(40, seed=3, num_classes=6)
    items = [ds[i] for i in (5, 0, 39, -1)]
    batch = ds.__getitems__([5, 0, 39, -1])  # what a DataLoader calls for a whole batch
    for a, b in zip(items, batch):
        assert all(torch.equal(a[k], b[k]) for k in ("image", "label", "mask"))
    loaded = next(iter(DataLoader(ds, batch_size=40, collate_fn=collate)))
    assert torch.equal(loaded["image"][17], ds[17]["image"]) and torch.equal(loaded["label"], torch.arange(40) % 6)
    with pytest.raises(IndexError):
        ds.__getitems__([3, 40])
