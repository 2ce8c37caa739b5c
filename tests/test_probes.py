"""Probe math: linear probe (both backends), segmentation probe, mIoU, input errors, VOC / ADE20K folders."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from repa_probe.analysis.errors import MetricInputError
from repa_probe.analysis.probes import (confusion_matrix, fit_linear_probe, fit_segmentation_probe,
                                        iou_from_confusion, miou, stratified_holdout)
from repa_probe.analysis.probes.common import channel_stats
from repa_probe.analysis.probes.segmentation import upsample_logits
from repa_probe.data import DatasetError, ShapesDataset
from repa_probe.data.segmentation import ADE20KSegmentation, VOCSegmentation

K = 4


pytestmark = pytest.mark.usefixtures("one_thread")


def _blobs(n, d=16, k=K, sep=3.0, seed=0):
    """Features that encode the label linearly: class centre + unit noise. Balanced labels."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=torch.Generator().manual_seed(123)) * sep
    y = torch.arange(n) % k
    return centres[y] + torch.randn(n, d, generator=g), y


@pytest.mark.parametrize("backend", ["sklearn", "torch"])
def test_linear_probe_separable_and_random(backend):
    tx, ty = _blobs(240, seed=0)
    vx, vy = _blobs(240, seed=1)
    res = fit_linear_probe(tx, ty, vx, vy, backend=backend)
    assert res.top1 >= 0.97
    # 4 classes: top-5 would be 1 by construction, so it is not reported
    assert res.top5 is None and res.topk is None and list(res.metrics()) == ["top1"]
    assert "top5" not in res.to_dict()
    assert res.hparams["selection"] == "held-out" and res.val_top1 is not None and res.sweep
    g = torch.Generator().manual_seed(5)
    rnd = fit_linear_probe(torch.randn(240, 16, generator=g), ty, torch.randn(240, 16, generator=g), vy,
                           backend=backend)
    assert abs(rnd.top1 - 1 / K) < 0.12, rnd.top1  # chance = 0.25; binomial sd over 240 samples ≈ 0.028


@pytest.mark.parametrize("backend", ["sklearn", "torch"])
def test_top5_with_many_classes(backend):
    tx, ty = _blobs(300, d=12, k=10, sep=0.6, seed=0)
    vx, vy = _blobs(300, d=12, k=10, sep=0.6, seed=1)
    res = fit_linear_probe(tx, ty, vx, vy, backend=backend, num_classes=10)
    assert 0.1 < res.top1 < res.top5 < 1.0  # overlapping classes: top-5 strictly easier, not trivial
    assert res.topk == 5 and list(res.metrics()) == ["top1", "top5"] and res.to_dict()["top5"] == res.top5


def test_torch_backend_streams_from_memmap(tmp_path):
    tx, ty = _blobs(200, seed=0)
    vx, vy = _blobs(100, seed=1)
    mm = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float16, shape=tuple(tx.shape))
    mm[:] = tx.numpy()
    mm.flush()
    ro = np.load(tmp_path / "x.npy", mmap_mode="r")
    a = fit_linear_probe(ro, ty.numpy(), vx.numpy(), vy.numpy(), backend="torch", epochs=5)
    b = fit_linear_probe(tx.half().float(), ty, vx, vy, backend="torch", epochs=5)
    assert a.top1 == b.top1 and a.hparams == b.hparams


def test_standardisation_uses_train_split_and_survives_constant_columns():
    tx, ty = _blobs(200, seed=0)
    vx, vy = _blobs(200, seed=1)
    const = torch.full((200, 1), 7.0)
    big = 1e6  # a rescaled column: standardisation must undo it
    res = fit_linear_probe(torch.cat([tx * big, const], 1), ty, torch.cat([vx * big, const], 1), vy,
                           backend="sklearn")
    assert res.top1 >= 0.97
    x = torch.randn(6, 5, 3, dtype=torch.float64) * 4 + 100
    mean, std = channel_stats(x, "x", 2, torch.device("cpu"))
    flat = x.reshape(-1, 3)
    torch.testing.assert_close(mean, flat.mean(0).float())
    torch.testing.assert_close(std, flat.std(0, unbiased=False).float())
    m2, s2 = channel_stats(torch.ones(4, 3), "x", 1, torch.device("cpu"))
    assert torch.equal(s2, torch.ones(3)) and torch.equal(m2, torch.ones(3))


def test_stratified_holdout():
    y = torch.tensor([0] * 10 + [1] * 20 + [2] * 5)
    fit, val = stratified_holdout(y, 0.2, seed=3)
    assert torch.equal(torch.sort(torch.cat([fit, val])).values, torch.arange(35))
    assert torch.bincount(y[val], minlength=3).tolist() == [2, 4, 1]
    fit2, _ = stratified_holdout(y, 0.2, seed=4)
    assert not torch.equal(fit, fit2)


def test_small_training_split_skips_the_sweep():
    tx, ty = _blobs(8, seed=0)  # 2 per class: floor(0.2 * 2) = 0 held out
    vx, vy = _blobs(8, seed=1)
    res = fit_linear_probe(tx, ty, vx, vy, backend="sklearn")
    assert res.hparams["selection"] == "default" and res.val_top1 is None and res.sweep == []
    fixed = fit_linear_probe(tx, ty, vx, vy, backend="sklearn", Cs=(1.0,))
    assert fixed.hparams["selection"] == "fixed" and fixed.hparams["C"] == 1.0


def _bad_inputs():
    x, y = torch.randn(20, 4), torch.arange(20) % 2
    nan = x.clone()
    nan[3, 1] = float("nan")
    inf = x.clone()
    inf[7, 0] = float("inf")
    return [
        ((nan, y, x, y), {}, "NaN or inf.*row 3"),
        ((x, y, inf, y), {}, "test_x has NaN or inf.*row 7"),
        ((x, torch.zeros(20, dtype=torch.long), x, y), {}, "single class"),
        ((x[:0], y[:0], x, y), {}, "empty"),
        ((x, y, x[:0], y[:0]), {}, "empty"),
        ((x, y, x, y + 1), {"num_classes": 2}, "class 2, outside the declared classes 0..1"),
        ((x, y - 1, x, y), {}, ">= 0"),
        ((x, y[:19], x, y), {}, "19 entries but its features have 20 rows"),
        ((x, y, x[:, :3], y), {}, "4 features per row but test_x has 3"),
        ((x, y.float(), x, y), {}, "integers"),
        ((x.long(), y, x, y), {}, "floating dtype"),
        ((x, y, x, y), {"backend": "svm"}, "backend"),
        ((x, y, x, y), {"Cs": ()}, "non-empty"),
    ]


@pytest.mark.parametrize("args,kwargs,match", _bad_inputs())
def test_linear_probe_bad_input(args, kwargs, match):
    with pytest.raises(MetricInputError, match=match) as info:
        fit_linear_probe(*args, **kwargs)
    assert "\n" not in str(info.value)


def test_miou_hand_worked_example():
    # valid pixels (target != 255), as (target, pred): (0,0) (1,0) (1,1) (1,1) (0,2); one ignored pixel.
    # class 0: TP 1, FP 1 (t1 p0), FN 1 (t0 p2)  -> IoU 1/3
    # class 1: TP 2, FP 0, FN 1                 -> IoU 2/3
    # class 2: TP 0, FP 1 (t0 p2), no GT pixel  -> IoU 0, counted (predicted but absent)
    # class 3: absent from target and pred      -> undefined, excluded
    # mIoU = (1/3 + 2/3 + 0) / 3 = 1/3; pixel accuracy = 3 correct / 5 valid = 0.6
    pred = torch.tensor([[0, 0, 1], [1, 2, 2]])
    target = torch.tensor([[0, 1, 1], [1, 255, 0]])
    assert miou(pred, target, 4) == pytest.approx(1 / 3)
    score, acc, per_class = iou_from_confusion(confusion_matrix(pred, target, 4))
    assert acc == pytest.approx(0.6)
    assert per_class[:3] == pytest.approx([1 / 3, 2 / 3, 0.0]) and per_class[3] is None
    assert miou(target.clamp(max=3), target.clamp(max=3), 4, ignore_index=None) == 1.0
    with pytest.raises(MetricInputError, match="outside 0..3"):
        miou(pred, torch.tensor([[0, 4, 1], [1, 255, 0]]), 4)
    with pytest.raises(MetricInputError, match="no valid pixels"):
        miou(pred, torch.full_like(target, 255), 4)
    with pytest.raises(MetricInputError, match="shape"):
        miou(pred[:1], target, 4)


def _shape_tokens(split, n, noise=0.3, seed=1):
    """Tokens (N, 64, 16) = one-hot of the 8x8 (nearest) downsampled shapes mask + noise; masks (N, 32, 32)."""
    masks = ShapesDataset(n, resolution=32, num_classes=K, split=split).render(list(range(n)))["mask"]
    onehot = F.one_hot(masks[:, 2::4, 2::4], K + 1).float()
    tokens = torch.cat([onehot, torch.zeros(n, 8, 8, 16 - K - 1)], -1).reshape(n, 64, 16)
    return tokens + noise * torch.randn(tokens.shape, generator=torch.Generator().manual_seed(seed)), masks


def test_segmentation_probe_on_shapes():
    tr_tok, tr_mask = _shape_tokens("train", 48)
    te_tok, te_mask = _shape_tokens("val", 48, seed=2)
    kw = dict(epochs=20, batch_size=8, lr=3e-2)
    res = fit_segmentation_probe(tr_tok, tr_mask, te_tok, te_mask, K + 1, **kw)
    # 8x8 patches upsampled to 32x32 blur the shape outlines: ~0.72 is the ceiling, noise gives ~0.17
    assert res.miou > 0.6 and res.pixel_acc > 0.9, res
    assert res.token_grid == (8, 8) and res.mask_size == (32, 32) and len(res.per_class_iou) == K + 1
    maps = te_tok.transpose(1, 2).reshape(48, 16, 8, 8)  # (N, D, h, w) layout gives the same probe
    res_maps = fit_segmentation_probe(tr_tok.transpose(1, 2).reshape(48, 16, 8, 8), tr_mask, maps, te_mask, K + 1,
                                      **kw)
    assert res_maps.miou == pytest.approx(res.miou, abs=1e-6)
    g = torch.Generator().manual_seed(3)
    noise = fit_segmentation_probe(torch.randn(48, 64, 16, generator=g), tr_mask, torch.randn(48, 64, 16, generator=g),
                                   te_mask, K + 1, **kw)
    assert noise.miou < 0.3, noise


@pytest.mark.parametrize("shape,size", [((2, 3, 8, 8), (32, 32)), ((2, 3, 5, 7), (20, 33)), ((1, 2, 1, 1), (4, 4)),
                                        ((1, 2, 6, 6), (6, 6))])
def test_upsample_logits_matches_bilinear_interpolation(shape, size):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0), requires_grad=True)
    ours = upsample_logits(x, size)
    ref = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    w = torch.randn(ref.shape)
    g_ours, = torch.autograd.grad((ours * w).sum(), x)
    g_ref, = torch.autograd.grad((ref * w).sum(), x)
    torch.testing.assert_close(g_ours, g_ref, atol=1e-5, rtol=1e-5)


def test_segmentation_early_stopping():
    tr_tok, tr_mask = _shape_tokens("train", 40)
    te_tok, te_mask = _shape_tokens("val", 20, seed=2)
    full = fit_segmentation_probe(tr_tok, tr_mask, te_tok, te_mask, K + 1, epochs=4, batch_size=8, val_fraction=0)
    assert full.hparams["epochs_run"] == 4 and full.hparams["val_miou"] is None and full.hparams["num_fit"] == 40
    # features without any signal: the held-out mIoU stops improving, so training stops long before 30 epochs
    g = torch.Generator().manual_seed(3)
    noise = fit_segmentation_probe(torch.randn(40, 64, 16, generator=g), tr_mask, torch.randn(20, 64, 16, generator=g),
                                   te_mask, K + 1, epochs=30, batch_size=8, patience=2)
    hp = noise.hparams
    assert hp["num_fit"] == 36 and hp["epochs_run"] < 30 and hp["epochs_run"] - hp["best_epoch"] == 2, hp
    assert 0.0 <= hp["val_miou"] <= 1.0
    with pytest.raises(MetricInputError, match="patience"):
        fit_segmentation_probe(tr_tok, tr_mask, te_tok, te_mask, K + 1, patience=0)


def test_segmentation_ignore_index_is_not_learned():
    tr_tok, tr_mask = _shape_tokens("train", 16)
    te_tok, te_mask = _shape_tokens("val", 16, seed=2)
    tr_mask = tr_mask.clone()
    tr_mask[:, :, :16] = 255  # left halves unlabelled
    res = fit_segmentation_probe(tr_tok, tr_mask, te_tok, te_mask, K + 1, epochs=5)
    assert math.isfinite(res.miou)


def _seg_bad_inputs():
    tok, masks = torch.randn(4, 16, 8), torch.zeros(4, 16, 16, dtype=torch.long)
    nan = tok.clone()
    nan[2, 0, 0] = float("nan")
    out_of_range = masks.clone()
    out_of_range[1, 3, 3] = 7
    return [
        ((nan, masks, tok, masks, 3), "train_tokens has NaN or inf.*row 2"),
        ((tok, out_of_range, tok, masks, 3), "class 7, outside the declared classes 0..2"),
        ((tok, masks.float(), tok, masks, 3), "integer"),
        ((tok, masks[:3], tok, masks, 3), "3 masks but its tokens have 4"),
        ((tok[:, :15], masks, tok, masks, 3), "not a square grid"),
        ((tok, masks, tok[..., :4], masks, 3), "8 channels but test_tokens have 4"),
        ((tok[:0], masks[:0], tok, masks, 3), "empty"),
        ((tok, masks, tok, masks, 1), "num_classes"),
        ((tok, masks[:, 0], tok, masks, 3), r"\(N, H, W\)"),
    ]


@pytest.mark.parametrize("args,match", _seg_bad_inputs())
def test_segmentation_bad_input(args, match):
    with pytest.raises(MetricInputError, match=match) as info:
        fit_segmentation_probe(*args, epochs=1)
    assert "\n" not in str(info.value)


def _palette_png(path, arr):
    im = Image.fromarray(arr.astype(np.uint8), mode="P")
    im.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    im.save(path)


def test_voc_folder(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(40, 30), (30, 50)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"im{i}.jpg")
        mask = np.zeros((h, w), np.uint8)
        mask[: h // 2] = 15
        mask[h // 2] = 255
        _palette_png(root / "SegmentationClass" / f"im{i}.png", mask)
    (root / "ImageSets/Segmentation/train.txt").write_text("im0\nim1\n")
    ds = VOCSegmentation(str(tmp_path / "VOCdevkit"), "train", resolution=20)
    assert len(ds) == 2 and ds.num_classes == 21
    s = ds[1]
    assert s["image"].shape == (3, 20, 20) and s["image"].dtype == torch.uint8
    assert s["mask"].shape == (20, 20) and s["mask"].dtype == torch.int64
    assert set(s["mask"].unique().tolist()) <= {0, 15, 255} and 15 in s["mask"].tolist()[0]
    # the mask of a different size than its image is an error
    _palette_png(root / "SegmentationClass" / "im0.png", np.zeros((31, 40), np.uint8))
    with pytest.raises(DatasetError, match="40x30 but its mask is 40x31"):
        ds[0]
    (root / "ImageSets/Segmentation/val.txt").write_text("im0\nmissing\n")
    with pytest.raises(DatasetError, match="missing"):
        VOCSegmentation(str(root), "val")


def test_ade20k_folder(tmp_path):
    for d in ("images/validation", "annotations/validation"):
        (tmp_path / d).mkdir(parents=True)
    Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(tmp_path / "images/validation/a.jpg")
    ann = np.zeros((24, 24), np.uint8)
    ann[:, 12:] = 150
    ann[:8, :12] = 1
    Image.fromarray(ann, mode="L").save(tmp_path / "annotations/validation/a.png")
    ds = ADE20KSegmentation(str(tmp_path), "val", resolution=12)
    m = ds[0]["mask"]
    assert m.shape == (12, 12)
    assert m[0, 0] == 0 and m[-1, 0] == 255 and m[0, -1] == 149  # 1 -> 0, 0 -> ignore, 150 -> 149
    with pytest.raises(DatasetError, match="not an ADE20K folder"):
        ADE20KSegmentation(str(tmp_path), "train")
