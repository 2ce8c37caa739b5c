"""iREPA: the conv projector, spatial normalisation of the targets, official checkpoint keys, a tiny run."""
import argparse
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from repa_probe.checkpoint import load_model, safe_load
from repa_probe.models import ModelInputError, create_model
from repa_probe.models.layers import ConvProjector
from repa_probe.objectives import ObjectiveError, spatial_normalize
from repa_probe.objectives import repa as repa_mod
from repa_probe.training import rundir
from repa_probe.training.config import ConfigError, load_config
from repa_probe.training.trainer import train

ROOT = Path(__file__).resolve().parents[1]
FAST = ["data.num_samples=64", "train.batch_size=16", "train.tensorboard=false", "model.depth=3",
        "model.hidden_size=32", "model.num_heads=2", "repa.projector_dim=32"]


def _seeded_(module, seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return module


def _conv_by_hand(x, weight, bias):
    """x: (B, T, D) on a square grid; weight (Z, D, k, k): sum over kernel offsets of W[:, :, i, j] @ x[shifted]."""
    b, t, d = x.shape
    side, k = int(t ** 0.5), weight.shape[-1]
    r = k // 2
    grid = F.pad(x.reshape(b, side, side, d), (0, 0, r, r, r, r))  # zero padding on H and W
    out = bias.expand(b, side, side, -1).clone()
    for i in range(k):
        for j in range(k):
            out += grid[:, i:i + side, j:j + side] @ weight[:, :, i, j].T
    return out.reshape(b, t, -1)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_conv_projector_is_a_convolution_on_the_token_grid(k):
    proj = _seeded_(ConvProjector(6, 4, k))
    x = torch.randn(2, 25, 6, generator=torch.Generator().manual_seed(1))
    w, b = proj.projection_layer.weight, proj.projection_layer.bias
    assert w.shape == (4, 6, k, k)
    torch.testing.assert_close(proj(x), _conv_by_hand(x, w, b), rtol=1e-5, atol=1e-5)
    if k == 1:  # a 1x1 conv (iREPA's trainer default) is a per-token linear map
        torch.testing.assert_close(proj(x), x @ w[:, :, 0, 0].T + b, rtol=1e-5, atol=1e-5)
    else:  # a 3x3+ conv mixes neighbours: moving one token changes its neighbours' outputs
        y = x.clone()
        y[:, 12] += 1.0
        changed = (proj(y) - proj(x)).abs().sum(-1)[0] > 1e-6
        assert changed[[7, 11, 13, 17]].all() and changed.sum() == min(k, 5) ** 2
    with pytest.raises(ModelInputError, match="square token grid"):
        proj(torch.randn(1, 24, 6))


def test_model_builds_conv_projectors_with_irepa_key_names():
    model = create_model("SiT-S/2", depth=2, input_size=8, z_dims=(16, 8), encoder_depth=1,
                         projector_type="conv", projector_kernel=3)
    keys = sorted(k for k in model.state_dict() if k.startswith("projectors"))
    assert keys == [f"projectors.{i}.projection_layer.{p}" for i in (0, 1) for p in ("bias", "weight")]
    assert model.state_dict()["projectors.1.projection_layer.weight"].shape == (8, 384, 3, 3)
    assert model.config["projector_type"] == "conv" and model.config["projector_kernel"] == 3
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    _, zs = model(x, t, y)
    assert [z.shape for z in zs] == [(2, 16, 16), (2, 16, 8)]
    for bad in (dict(projector_type="transformer"), dict(projector_type="conv", projector_kernel=2)):
        with pytest.raises(ModelInputError):
            create_model("SiT-S/2", depth=2, input_size=8, z_dims=(16,), **bad)


def _two_halves_with_offset():
    """Facts file case 5: 16x16 grid, columns 0-7 = e1, 8-15 = e2, plus a third channel = 3 everywhere."""
    z = torch.zeros(1, 16, 16, 3)
    z[0, :, :8, 0] = 1.0
    z[0, :, 8:, 1] = 1.0
    z[..., 2] = 3.0
    return z.reshape(1, 256, 3)


def test_spatial_normalize_matches_formula_and_facts_case():
    z = torch.randn(3, 20, 7, generator=torch.Generator().manual_seed(0)) * 2 + 1
    for gamma in (1.0, 0.6):
        a = z.numpy().astype(np.float64)
        want = (a - gamma * a.mean(1, keepdims=True)) / (a.std(1, ddof=1, keepdims=True) + 1e-6)
        np.testing.assert_allclose(spatial_normalize(z, gamma).numpy(), want, rtol=1e-5, atol=1e-5)
    out = spatial_normalize(_two_halves_with_offset(), 1.0)[0]
    torch.testing.assert_close(out.mean(0), torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[:, :2].std(0), torch.ones(2), atol=1e-5, rtol=0)
    assert out[:, 2].abs().max() == 0  # the constant channel vanishes
    cos = F.normalize(out, dim=-1) @ F.normalize(out, dim=-1).T
    left = (torch.arange(256) % 16) < 8
    same = left[:, None] == left[None, :]
    torch.testing.assert_close(cos[same], torch.ones(int(same.sum())), atol=1e-5, rtol=0)
    torch.testing.assert_close(cos[~same], -torch.ones(int((~same).sum())), atol=1e-5, rtol=0)
    assert spatial_normalize(z.to(torch.bfloat16), 1.0).dtype == torch.float32


def test_spatial_normalize_warns_about_near_constant_channels(monkeypatch, caplog):
    monkeypatch.setattr(repa_mod, "_amplification_checked", False)
    with caplog.at_level(logging.WARNING, logger=repa_mod.__name__):
        out = spatial_normalize(_two_halves_with_offset(), 0.6)[0]
    assert out[:, 2].min() > 1e6  # (1 - 0.6) * 3 / 1e-6: every token points along the constant channel
    assert any("near-zero spatial std" in r.message for r in caplog.records)
    caplog.clear()
    spatial_normalize(_two_halves_with_offset(), 0.6)  # checked once per process: no second sync or warning
    assert not caplog.records
    for bad in (1.5, -0.1, True):
        with pytest.raises(ObjectiveError, match="spatial_norm_gamma"):
            spatial_normalize(torch.randn(1, 4, 2), bad)
    with pytest.raises(ObjectiveError, match="T >= 2"):
        spatial_normalize(torch.randn(1, 1, 2), 1.0)


def test_config_keys_and_shipped_irepa_config():
    cfg = load_config(str(ROOT / "configs/irepa_sit.yaml"))
    r = cfg.repa
    assert (r.projector, r.projector_kernel, r.spatial_norm_gamma, r.proj_coeff) == ("conv", 3, 0.6, 1.0)
    assert cfg.encoder.name == "dinov2_vitb14" and r.encoder_depth == 8 and cfg.model.name == "SiT-XL/2"
    assert load_config(None).repa.spatial_norm_gamma is None and load_config(None).repa.projector == "mlp"
    for bad, key in (("repa.projector=attention", "repa.projector"), ("repa.projector_kernel=2", "projector_kernel"),
                     ("repa.spatial_norm_gamma=1.5", "spatial_norm_gamma")):
        with pytest.raises(ConfigError, match=key):
            load_config(None, [bad])


@pytest.mark.parametrize("layout", ["conv3", "conv1", "mlp"])
def test_official_irepa_training_checkpoint_loads(tmp_path, layout):
    """Key names of End2End-Diffusion/iREPA ldm/models/sit.py: ProjectionLayer.projection_layer (conv or MLP)."""
    kind, k = ("conv", int(layout[-1])) if layout.startswith("conv") else ("mlp", 3)
    ref = _seeded_(create_model("SiT-S/2", depth=3, input_size=8, num_classes=10, z_dims=(16,), encoder_depth=2,
                                projector_dim=24, projector_type=kind, projector_kernel=k), scale=0.05).eval()
    sd = {f"projectors.0.projection_layer.{n[len('projectors.0.'):]}" if n.startswith("projectors.0.") and kind == "mlp"
          else n: v for n, v in ref.state_dict().items()}
    prefix = "projectors.0.projection_layer."
    assert {n[len(prefix):] for n in sd if n.startswith("projectors")} == (
        {"weight", "bias"} if kind == "conv" else {f"{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")})
    args = argparse.Namespace(model="SiT-S/2", enc_type="dinov2-vit-b", proj_coeff="1.0", encoder_depth=2,
                              projection_layer_type=kind, proj_kwargs_kernel_size=k, spnorm_method="zscore")
    torch.save({"model": sd, "ema": sd, "opt": {}, "args": args, "steps": 5}, tmp_path / "0000005.pt")
    model, info = load_model(tmp_path / "0000005.pt")
    assert info.time_convention == "repa" and info.source_format == "official-training" and info.step == 5
    assert info.config["projector_type"] == kind and info.config["encoder_depth"] == 2
    if kind == "conv":
        assert info.config["projector_kernel"] == k
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([0, 3, 9])
    with torch.no_grad():
        (out_a, zs_a), (out_b, zs_b) = ref(x, t, y), model(x, t, y)
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=0)
    torch.testing.assert_close(zs_b[0], zs_a[0], rtol=0, atol=0)


def test_training_targets_are_spatially_normalised(tmp_path):
    from repa_probe.training.builders import Batches, build_encoder, model_inputs
    from repa_probe.training.distributed import DistInfo

    cfg = load_config(None, [f"run.out_dir={tmp_path}", *FAST, "repa.spatial_norm_gamma=1.0"])
    dist = DistInfo(rank=0, world_size=1, local_rank=0)
    batches, enc = Batches(cfg, dist), build_encoder(cfg, torch.device("cpu"))
    batch = batches.next()
    gen = torch.Generator().manual_seed(0)
    _, z, _ = model_inputs(batch, None, enc, torch.device("cpu"), gen, dist, cfg, grid=8)
    raw = enc(batch["image"])  # tiny_vit at 32 px: 8x8 tokens, the model's grid
    torch.testing.assert_close(z, (raw - raw.mean(1, keepdim=True)) / (raw.std(1, keepdim=True) + 1e-6))


def test_tiny_irepa_run_trains_and_reloads(tmp_path):
    run = train(load_config(None, [f"run.out_dir={tmp_path}", "run.name=irepa", *FAST, "train.steps=40",
                                   "train.log_every=1", "train.ckpt_every=40", "repa.projector=conv",
                                   "repa.projector_kernel=3", "repa.spatial_norm_gamma=0.6", "repa.proj_coeff=1.0"]))
    rows = rundir.read_metrics(run)
    total, denoise, rep = (np.array([r[k] for r in rows]) for k in ("total", "denoise", "repa"))
    assert len(rows) == 40 and np.isfinite(total).all()
    torch.testing.assert_close(total, denoise + rep)  # proj_coeff = 1: both terms in the optimised loss
    assert total[-10:].mean() < 0.7 * total[:5].mean()  # measured: 1.07 -> 0.52
    assert denoise[-10:].mean() < denoise[:5].mean() and rep[-10:].mean() < rep[:5].mean() - 0.2
    ckpt = run / "checkpoints/0000040.pt"
    model, info = load_model(ckpt, prefer_ema=False)
    assert info.config["projector_type"] == "conv" and info.config["projector_kernel"] == 3
    sd = safe_load(ckpt)["model"]
    x, t, y = torch.randn(2, 3, 32, 32), torch.rand(2), torch.tensor([0, 1])
    with torch.no_grad():
        h = model.forward_features(x, t, y, layers=[model.encoder_depth - 1])[0]
        zs = model(x, t, y)[1]
    want = _conv_by_hand(h, sd["projectors.0.projection_layer.weight"], sd["projectors.0.projection_layer.bias"])
    torch.testing.assert_close(zs[0], want, rtol=1e-4, atol=1e-5)
