"""This project against golden files written by the official DiT / SiT / REPA / platonic-rep code.

The files come from ``python -m tools.golden`` (tests/data/golden/README.md: repositories, commits, command):
small random models built with their code, saved as plain state dicts, with their inputs, outputs, hidden
states and projected tokens; DiT's ``training_losses`` terms, REPA's ``SILoss`` and SiT's transport loss on
fixed inputs; platonic-rep's metric values on fixed features. Everything must agree to 1e-5.
"""

import argparse
import json
import logging
from pathlib import Path

import pytest
import torch

from repa_probe.analysis import metrics as M
from repa_probe.checkpoint import CHECKPOINT_FORMAT, CheckpointError, load_model, safe_load
from repa_probe.models import DiffusionTransformer
from repa_probe.objectives import FlowMatching, GaussianDiffusion, repa_loss

GOLDEN = Path(__file__).parent / "data" / "golden"
TOL = dict(rtol=1e-5, atol=1e-5)
#: golden model -> load_model keywords (num_heads where the width does not tell it; SiT looks like DiT)
MODELS = {
    "dit": dict(num_heads=4),
    "sit": dict(num_heads=2, time_convention="sit"),
    "repa": dict(num_heads=4, encoder_depth=4),
    "repa_qknorm": dict(encoder_depth=1),  # heads read from the q_norm width
}
CONVENTION = {"dit": "ddpm", "sit": "sit", "repa": "repa", "repa_qknorm": "repa"}


def _golden(name: str):
    path = GOLDEN / name
    if not path.exists():
        pytest.fail(f"{path} missing: regenerate with the command in {GOLDEN / 'README.md'}")
    return torch.load(path, weights_only=True)


def _load(name: str, how: str = "file", **overrides):
    path = GOLDEN / f"{name}_state_dict.pt"
    kwargs = {**MODELS[name], **overrides}
    if how == "memory":
        kwargs["loaded"] = safe_load(path)
    return load_model(path, **kwargs)


def _close(actual, expected, what):
    torch.testing.assert_close(actual, expected, **TOL, msg=lambda m: f"{what}: {m}")


# ------------------------------------------------------------------------------------------------ models
@pytest.mark.parametrize("how", ["file", "memory"])
@pytest.mark.parametrize("name", list(MODELS))
def test_forward_hidden_states_and_projections_match_official(name, how):
    io = _golden(f"{name}_io.pt")
    model, info = _load(name, how)
    assert info.time_convention == CONVENTION[name] and info.source_format == "official-state-dict"
    assert info.ema is False and info.step is None and not model.training
    with torch.no_grad():
        out, zs, hidden = model(io["x"], io["t"], io["y"], return_hidden=True)
    _close(out, io["out"], f"{name} output")
    _close(torch.stack(hidden), io["hidden"], f"{name} hidden states")
    assert len(zs) == len(io.get("zs", []))
    for k, (z, ref) in enumerate(zip(zs, io.get("zs", []))):
        _close(z, ref, f"{name} projector {k}")
    if "zs" in io:  # forward_features is the analysis path: same block outputs
        feats = model.forward_features(io["x"], io["t"], io["y"], layers=[0, model.depth - 1])
        _close(torch.stack(feats), io["hidden"][[0, -1]], f"{name} forward_features")


@pytest.mark.parametrize("name", list(MODELS))
def test_official_layout_and_pos_embed(name):
    """Our freshly built model has exactly their keys and shapes, and the same fixed sin-cos pos_embed."""
    official = _golden(f"{name}_state_dict.pt")
    _, info = _load(name)
    ours = DiffusionTransformer(**info.config).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in official.items()}
    torch.testing.assert_close(ours["pos_embed"], official["pos_embed"], rtol=0, atol=1e-6)


def test_repa_encoder_depth_is_not_guessed_silently(caplog, tmp_path):
    """Their REPA model aligns block 4 of 6; a plain state dict cannot say so."""
    io = _golden("repa_io.pt")
    with caplog.at_level(logging.WARNING, logger="repa_probe.checkpoint"):
        guessed, info = _load("repa", encoder_depth=None)
    assert "encoder_depth" in caplog.text and "--encoder-depth" in caplog.text
    assert info.config["encoder_depth"] == 6  # REPA's default 8, clamped to the depth
    with torch.no_grad():
        wrong = guessed(io["x"], io["t"], io["y"])[1]
    assert not torch.allclose(wrong[0], io["zs"][0], **TOL)
    # a training file carries it in args: no warning, right tokens; a contradicting value is an error
    path = tmp_path / "0000100.pt"
    sd = _golden("repa_state_dict.pt")
    args = argparse.Namespace(model="SiT-B/2", enc_type="dinov2-vit-b", encoder_depth=4, proj_coeff=0.5)
    torch.save({"model": sd, "ema": sd, "opt": {}, "args": args, "steps": 100}, path)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="repa_probe.checkpoint"):
        model, info = load_model(path, num_heads=4)
    assert caplog.text == "" and info.config["encoder_depth"] == 4
    with torch.no_grad():
        _close(model(io["x"], io["t"], io["y"])[1][1], io["zs"][1], "projector 1 (depth from args)")
    with pytest.raises(CheckpointError, match="contradicts"):
        load_model(path, num_heads=4, encoder_depth=5)
    ours = {"format": CHECKPOINT_FORMAT, "model": sd, "model_config": info.config, "step": 1}
    assert load_model(path, loaded=ours, encoder_depth=4)[1].config["encoder_depth"] == 4
    with pytest.raises(CheckpointError, match="contradicts"):
        load_model(path, loaded=ours, encoder_depth=8)


# ------------------------------------------------------------------------------------------------ losses
def test_ddpm_loss_terms_match_dit_training_losses():
    g = _golden("dit_losses.pt")
    diffusion = GaussianDiffusion()
    x_t = diffusion.q_sample(g["x0"], g["t"], g["noise"])
    _close(x_t, g["x_t"], "q_sample")
    terms = diffusion.loss(g["model_out"], g["x0"], g["x_t"], g["noise"], g["t"])  # their output: objective only
    for key in ("loss", "mse", "vb"):
        _close(terms[key], g[key], f"DDPM {key} (their model output)")
    model, _ = _load("dit")
    with torch.no_grad():
        out = model(x_t, g["t"], g["y"])[0]
    _close(out, g["model_out"], "DiT output inside training_losses")
    terms = diffusion.loss(out, g["x0"], x_t, g["noise"], g["t"])
    for key in ("loss", "mse", "vb"):
        _close(terms[key], g[key], f"DDPM {key} (our model)")


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_flow_and_repa_loss_match_siloss(path):
    g = _golden(f"repa_siloss_{path}.pt")
    flow = FlowMatching(path=path)
    x_t = flow.add_noise(g["x0"], g["t"], g["noise"])
    _close(x_t, g["x_t"], "x_t")
    model, _ = _load("repa")
    with torch.no_grad():
        out, zs_tilde = model(x_t, flow.model_time(g["t"]), g["y"])
    _close(out, g["model_out"], "REPA output inside SILoss")
    for k, (z, ref) in enumerate(zip(zs_tilde, g["zs_tilde"])):
        _close(z, ref, f"projector {k} inside SILoss")
    for source, (o, zt) in {"their outputs": (g["model_out"], g["zs_tilde"]), "our model": (out, zs_tilde)}.items():
        _close(flow.loss(o, g["x0"], x_t, g["noise"], g["t"])["denoise"], g["denoising_loss"], f"denoise ({source})")
        _close(repa_loss(zt, g["zs"])[0], g["proj_loss"].float(), f"REPA loss ({source})")
    assert g["proj_loss"] < -0.2  # the encoder tokens agree with the projectors: a sign error would show


def test_flow_loss_matches_sit_transport_in_repa_time():
    """SiT runs time the other way (t=0 noise) and predicts u = x1 - x0 = -v: our loss at t = 1 - t_sit on -u."""
    g = _golden("sit_transport_loss.pt")
    flow = FlowMatching()
    t = 1.0 - g["t_sit"]
    _close(flow.add_noise(g["x1"], t, g["noise"]), g["x_t"], "x_t in REPA time")
    model, info = _load("sit")
    assert info.time_convention == "sit"
    with torch.no_grad():
        u = model(g["x_t"], g["t_sit"], g["y"])[0]
    _close(u, g["model_out"], "SiT output inside the transport loss")
    _close(flow.loss(-u, g["x1"], g["x_t"], g["noise"], t)["loss"], g["loss"], "flow loss vs SiT transport loss")


# ----------------------------------------------------------------------------------------------- metrics
def _metric_cases():
    table = json.loads((GOLDEN / "metrics.json").read_text())
    return sorted(table.items())


@pytest.mark.parametrize("key,expected", _metric_cases())
def test_metrics_match_platonic_rep(key, expected):
    feats = _golden("metrics_features.pt")
    case, prep = key.split("/")
    a, b = feats[f"{case}/{prep}/a"], feats[f"{case}/{prep}/b"]
    clip = None if prep == "l2" else 0.95
    for side, raw, ref in (("a", feats[f"{case}/a"], a), ("b", feats[f"{case}/b"], b)):
        ours = M.prepare_features(raw, clip_quantile=clip, exact=prep == "clipexact+l2")
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12, msg=lambda m: f"prepare {side}: {m}")
    ours = {"cka": M.cka(a, b), "unbiased_cka": M.unbiased_cka(a, b),
            "cknna_biased_k10": M.cknna(a, b, 10, unbiased=False)}
    for k in (5, 10):
        ours.update({f"cknna_k{k}": M.cknna(a, b, k), f"mutual_knn_k{k}": M.mutual_knn(a, b, k),
                     f"cycle_knn_k{k}": M.cycle_knn(a, b, k)})
    for name, value in ours.items():
        assert value == pytest.approx(expected[name], abs=1e-5), \
            f"{key} {name}: ours {value}, platonic-rep {expected[name]}"


# --------------------------------------------------------------------------------------------------- tool
def test_tool_discovers_parts_and_skips_missing_repos(tmp_path, monkeypatch, caplog):
    """The generator runs whatever parts exist and skips, with a notice, what lacks a checkout."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))  # tools/ is not installed
    from tools.golden import __main__ as cli

    parts = cli.discover(cli.PARTS)
    assert {"models", "losses", "metrics"} <= set(parts)
    assert all(callable(m.write) for m in parts.values())
    monkeypatch.setattr("sys.argv", ["tools.golden"])
    with caplog.at_level(logging.INFO, logger="tools.golden"):
        assert cli.main(["--out", str(tmp_path), "--commit", "repa=abc123"]) == 0
    assert "no checkout given for dit" in caplog.text and "no checkout given for platonic" in caplog.text
    readme = (tmp_path / "README.md").read_text()
    assert "github.com/sihyun-yu/REPA | `abc123`" in readme
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]
