"""REG and HASTE against golden files written by their official code (``python -m tools.golden``, parts ``reg``
and ``haste``; tests/data/golden/README.md): checkpoint loading, forward outputs, loss terms, REG's sampler. 1e-5.
"""
from pathlib import Path

import pytest
import torch

from repa_probe.checkpoint import load_model, safe_load
from repa_probe.models import DiffusionTransformer, ModelInputError
from repa_probe.objectives import AttentionTap, FlowMatching, attention_loss, repa_loss
from repa_probe.sampling import SamplingError, sample

GOLDEN = Path(__file__).parent / "data" / "golden"
TOL = dict(rtol=1e-5, atol=1e-5)


def _golden(name):
    return torch.load(GOLDEN / name, weights_only=True)


def _close(actual, expected, what):
    torch.testing.assert_close(actual, expected, **TOL, msg=lambda m: f"{what}: {m}")


@pytest.fixture(scope="module")
def reg():
    return load_model(GOLDEN / "reg_checkpoint.pt", num_heads=4)


@pytest.fixture(scope="module")
def haste():
    return load_model(GOLDEN / "haste_checkpoint.pt", num_heads=12)


# --------------------------------------------------------------------------------------------------------- REG
def test_reg_checkpoint_loads_with_its_architecture_and_ema(reg):
    model, info = reg
    ckpt = safe_load(GOLDEN / "reg_checkpoint.pt")
    assert info.source_format == "official-training" and info.ema and info.step == 4000
    assert info.time_convention == "repa" and model.cls_token_dim == 24 and model.num_prefix_tokens == 1
    assert info.config["encoder_depth"] == ckpt["args"].encoder_depth == 2 and info.config["z_dims"] == [24]
    ours = model.state_dict()
    assert set(ours) == set(ckpt["ema"]) and {"cls_projectors2.weight", "wg_norm.bias",
                                               "final_layer.linear_cls.weight"} <= set(ours)
    for key, value in ckpt["ema"].items():
        assert torch.equal(ours[key], value), key
    fresh = DiffusionTransformer(**info.config).state_dict()  # a fresh model has their layout and pos_embed
    assert {k: v.shape for k, v in fresh.items()} == {k: v.shape for k, v in ckpt["ema"].items()}
    torch.testing.assert_close(fresh["pos_embed"], ckpt["ema"]["pos_embed"], rtol=0, atol=1e-6)
    assert not fresh["pos_embed"][0, 0].any()


def test_reg_forward_matches_official(reg):
    model, _ = reg
    io = _golden("reg_io.pt")
    with torch.no_grad():
        out, zs, cls_out, hidden = model(io["x"], io["t"], io["y"], cls_token=io["cls_token"], return_hidden=True)
        feats = model.forward_features(io["x"], io["t"], io["y"], layers=[0, 2], cls_token=io["cls_token"])
        with_cls = model.forward_features(io["x"], io["t"], io["y"], layers=[1], cls_token=io["cls_token"], prefix=True)
    _close(out, io["out"], "REG output")
    _close(zs[0], io["zs"][0], "REG projected tokens (class token first)")
    _close(cls_out, io["cls_out"], "REG class-token output")
    _close(torch.stack(hidden), io["hidden"], "REG block outputs")
    _close(torch.stack(feats), io["hidden"][[0, 2], :, 1:], "forward_features: patch tokens only")
    _close(with_cls[0], io["hidden"][1], "forward_features(prefix=True)")
    with pytest.raises(ModelInputError, match="cls_token"):
        model(io["x"], io["t"], io["y"])


def test_reg_loss_terms_match_official_siloss(reg):
    model, _ = reg
    g = _golden("reg_loss.pt")
    flow = FlowMatching()
    x_t = flow.add_noise(g["x0"], g["t"], g["noise"])
    cls_t = flow.add_noise(g["cls_token"], g["t"], g["noise_cls"])
    _close(x_t, g["x_t"], "x_t")
    _close(cls_t, g["cls_t"], "noisy class token")
    with torch.no_grad():
        out, zs, cls_out = model(x_t, flow.model_time(g["t"]), g["y"], cls_token=cls_t)
    _close(flow.loss(out, g["x0"], x_t, g["noise"], g["t"])["loss"], g["denoising_loss"], "denoising loss")
    _close(flow.loss(cls_out, g["cls_token"], cls_t, g["noise_cls"], g["t"])["loss"], g["denoising_loss_cls"],
           "class-token loss")
    _close(repa_loss(zs, g["zs"])[0], g["proj_loss"].float(), "REPA loss on class + patch tokens")


@pytest.mark.parametrize("case", ["sde", "sde_cfg_interval", "sde_cfg_cls_conditional", "sde_cfg_cls_scale"])
def test_reg_joint_sampler_matches_official(reg, case):
    model, _ = reg
    g = _golden("reg_sampling.pt")
    c = g["cases"][case]
    torch.manual_seed(c["seed"])  # their sampler draws the per-step noise from the global RNG
    out = sample(model, g["noise"], g["labels"], method="sde", steps=c["steps"], cfg_scale=c["cfg_scale"],
                 guidance_interval=(c["low"], c["high"]), cls_cfg_scale=c["cls_cfg_scale"], cls_noise=g["cls_noise"])
    _close(out.double(), c["out"], f"REG {case}")


def test_reg_sampler_needs_class_token_noise_with_per_sample_noise(reg):
    model, _ = reg
    g = _golden("reg_sampling.pt")
    with pytest.raises(SamplingError, match="cls_noise"):
        sample(model, g["noise"], g["labels"], method="sde", steps=2,
               generator=lambda step, like: torch.zeros_like(like))
    out = sample(model, g["noise"], g["labels"], method="euler", steps=2, cls_noise=g["cls_noise"])
    assert out.shape == g["noise"].shape and torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------------------- HASTE
def test_haste_checkpoint_is_a_repa_checkpoint(haste):
    model, info = haste
    ckpt = safe_load(GOLDEN / "haste_checkpoint.pt")
    assert info.ema and info.step == 250000 and info.config["encoder_depth"] == 8 and model.cls_token_dim == 0
    assert ckpt["args"].attn_coeff == 0.5 and ckpt["args"].early_stop_point == 250000
    io = _golden("haste_io.pt")
    tap = AttentionTap([b.attn for b in model.blocks[:8]])
    try:
        with torch.no_grad():
            out, zs = model(io["x"], io["t"], io["y"])
        rows = torch.stack([logits[:, :, [0, 128]] for logits in tap.logits()])
    finally:
        tap.remove()
    _close(out, io["out"], "HASTE output")
    _close(zs[0], io["zs"][0], "HASTE projected tokens")
    _close(rows, io["attn_rows"], "HASTE attention logits")


def test_haste_loss_terms_match_official(haste):
    model, _ = haste
    g = _golden("haste_loss.pt")
    flow = FlowMatching()
    x_t = flow.add_noise(g["x0"], g["t"], g["noise"])
    _close(x_t, g["x_t"], "x_t")
    tap = AttentionTap([model.blocks[i].attn for i in (4, 5, 6, 7)])
    try:
        with torch.no_grad():
            out, zs = model(x_t, g["t"], g["y"])
        student = tap.logits()
    finally:
        tap.remove()
    teacher = [q @ k.transpose(-2, -1) for q, k in zip(g["teacher_q"], g["teacher_k"])]
    _close(flow.loss(out, g["x0"], x_t, g["noise"], g["t"])["loss"], g["denoising_loss"], "denoising loss")
    _close(attention_loss(student, teacher), g["attn_loss"].float(), "attention loss")
    _close(repa_loss(zs, g["proj_s"])[0], g["proj_loss"].float(), "REPA loss")
    _close(g["denoise_only_loss"], g["denoising_loss"], "after the switch-off only the denoising loss remains")
