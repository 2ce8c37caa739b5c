"""Tests for repa_probe.checkpoint: atomic save, safe load, shape inference, official layouts.

Official state dicts written by the DiT / SiT / REPA code itself are loaded in tests/test_golden.py.
"""

import argparse
import os

import pytest
import torch

from repa_probe.models.layout import LayoutError
from repa_probe.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    ModelInfo,
    atomic_save,
    infer_config,
    load_model,
    safe_load,
)
from repa_probe.models import create_model, list_models, transformer

TINY = dict(depth=3, hidden_size=64, num_heads=4, input_size=8)


def _inputs(model, batch=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    s = model.input_size
    x = torch.randn(batch, model.in_channels, s, s, generator=g)
    return x, torch.rand(batch, generator=g), torch.randint(0, model.num_classes, (batch,), generator=g)


# ------------------------------------------------------------------------------------- save / safe_load

def test_atomic_save_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "ck.pt"
    atomic_save({"a": torch.arange(3)}, path)
    atomic_save({"a": torch.arange(5)}, path)
    assert torch.equal(safe_load(path)["a"], torch.arange(5))
    with pytest.raises(Exception):
        atomic_save({"bad": lambda: 0}, path)  # cannot be pickled: the old file must survive
    assert torch.equal(safe_load(path)["a"], torch.arange(5))
    assert sorted(os.listdir(path.parent)) == ["ck.pt"]


def test_safe_load_namespace_is_weights_only(tmp_path):
    path = tmp_path / "args.pt"
    torch.save({"args": argparse.Namespace(model="SiT-XL/2", encoder_depth=8), "w": torch.ones(2)}, path)
    with pytest.raises(Exception):  # plain weights-only loading refuses the Namespace
        torch.load(path, weights_only=True)
    obj = safe_load(path)
    assert isinstance(obj["args"], argparse.Namespace) and obj["args"].encoder_depth == 8


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("kind", ["missing", "directory", "empty", "text", "truncated", "unsafe", "not-a-model"])
def test_bad_files_raise_one_line_checkpoint_error(tmp_path, kind):
    path = tmp_path / f"{kind}.pt"
    good = tmp_path / "good.pt"
    torch.save(create_model("SiT-S/2", **TINY).state_dict(), good)
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("definitely not a checkpoint\n")
    elif kind == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "unsafe":
        torch.save({"x": _Evil()}, path)
    elif kind == "not-a-model":
        torch.save({"weights": [1, 2, 3]}, path)
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    msg = str(err.value)
    assert msg.startswith(str(path)) and "\n" not in msg
    assert isinstance(err.value, RuntimeError)


# --------------------------------------------------------------------------------- official key layouts

def test_prefixes_and_time_convention_override(tmp_path):
    model = create_model("DiT-S/2", **TINY)
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save(sd, tmp_path / "ddp.pt")
    loaded, info = load_model(tmp_path / "ddp.pt", num_heads=4)
    assert info.family == "DiT" and info.time_convention == "ddpm"
    loaded, info = load_model(tmp_path / "ddp.pt", num_heads=4, time_convention="sit")
    assert info.family == "SiT" and info.time_convention == "sit"
    x, t, y = _inputs(loaded)
    assert loaded(x, t, y)[0].shape[1] == 4  # official SiT cuts the sigma half
    with pytest.raises(CheckpointError, match="learn_sigma"):
        load_model(tmp_path / "ddp.pt", time_convention="repa")
    with pytest.raises(CheckpointError, match="time convention"):
        load_model(tmp_path / "ddp.pt", time_convention="edm")


def test_training_checkpoint_prefers_ema_and_reads_args(tmp_path):
    model = create_model("SiT-S/2", **TINY, z_dims=(16,), encoder_depth=2, projector_dim=32)
    ema = create_model("SiT-S/2", **TINY, z_dims=(16,), encoder_depth=2, projector_dim=32)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(0.5)
    args = argparse.Namespace(model="SiT-S/2", enc_type="dinov2-vit-b", encoder_depth=2, proj_coeff=0.5,
                              path_type="linear")
    path = tmp_path / "0001234.pt"
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(),
                "opt": {"state": {}, "param_groups": [{"lr": 1e-4}]}, "args": args, "steps": 77}, path)
    loaded, info = load_model(path, num_heads=4)
    assert info.source_format == "official-training" and info.ema and info.step == 77
    assert info.time_convention == "repa" and info.config["encoder_depth"] == 2
    assert torch.equal(loaded.blocks[0].attn.qkv.weight, ema.blocks[0].attn.qkv.weight)
    loaded, info = load_model(path, num_heads=4, prefer_ema=False)
    assert not info.ema and torch.equal(loaded.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)


@pytest.mark.parametrize("args,convention", [
    (argparse.Namespace(model="DiT-XL/2", num_classes=1000), "ddpm"),
    (argparse.Namespace(model="SiT-XL/2", path_type="Linear", prediction="velocity"), "sit"),
])
def test_dit_and_sit_training_files_are_told_apart_by_args(tmp_path, args, convention):
    model = create_model("DiT-S/2", **TINY)
    path = tmp_path / "0050000.pt"
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "opt": {}, "args": args}, path)
    loaded, info = load_model(path, num_heads=4)
    assert info.time_convention == convention and info.step == 50000
    assert info.config["encoder_depth"] == 3  # 8 clamped
    x, _, y = _inputs(loaded)
    assert loaded(x, torch.tensor([1, 2]), y)[0].shape[1] == (8 if convention == "ddpm" else 4)


# ------------------------------------------------------------------------------- our format, round trip

def test_our_format_round_trip_is_bit_identical(tmp_path):
    torch.manual_seed(0)
    model = create_model("SiT-B/4", **TINY, z_dims=(16,), encoder_depth=2, projector_dim=32, qk_norm=True,
                         num_classes=7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.normal_(0, 0.1)
    ck = {"model": model.state_dict(), "ema": model.state_dict(), "opt": {}, "scaler": None,
          "rng": {"torch": torch.get_rng_state()}, "data": {"epoch": 0, "index": 5},
          "config": {"train": {"lr": 1e-4}}, "model_config": model.config, "step": 42,
          "format": CHECKPOINT_FORMAT}
    path = tmp_path / "ck.pt"
    atomic_save(ck, path)
    loaded, info = load_model(path)
    assert isinstance(info, ModelInfo)
    assert (info.family, info.size, info.source_format, info.step, info.ema, info.path) == \
        ("SiT", None, "repa-probe", 42, True, str(path))
    assert info.config == model.config == loaded.config
    assert not loaded.training and not loaded.pos_embed.requires_grad
    assert all(p.requires_grad for n, p in loaded.named_parameters() if n != "pos_embed")
    x, t, y = _inputs(model)
    a, b = model(x, t, y), loaded(x, t, y)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1][0], b[1][0])


def test_shape_mismatch_and_unknown_layout(tmp_path):
    model = create_model("SiT-S/2", **TINY)
    cfg = model.config
    cfg["hidden_size"] = 128
    torch.save({"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "model_config": cfg, "step": 1},
               tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match="shape mismatch") as err:
        load_model(tmp_path / "mismatch.pt")
    assert "mismatch.pt" in str(err.value) and "\n" not in str(err.value)
    sd = model.state_dict()
    sd["blocks.0.extra.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match="unexpected keys: blocks.0.extra.weight"):
        load_model(tmp_path / "extra.pt", num_heads=4)
    torch.save({"encoder.weight": torch.zeros(3, 3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="unknown key layout"):
        load_model(tmp_path / "other.pt")


def test_bad_model_config_is_a_checkpoint_error_but_our_bugs_keep_their_type(tmp_path, monkeypatch):
    model = create_model("SiT-S/2", **TINY)
    cases = {"unknown": ({"widht": 3}, "unknown keys \\['widht'\\]"),
             "type": ({"depth": "2"}, "model_config\\['depth'\\] = '2' has the wrong type"),
             "value": ({"num_heads": 5}, "cannot build a model from config: .*hidden_size 64 is not divisible")}
    for name, (change, match) in cases.items():
        torch.save({"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "model_config": {**model.config, **change},
                    "step": 1}, tmp_path / f"{name}.pt")
        with pytest.raises(CheckpointError, match=match):
            load_model(tmp_path / f"{name}.pt")
    torch.save({"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "model_config": model.config, "step": 1},
               tmp_path / "good.pt")

    def broken_check(*args):  # a bug in our constructor, not in the file
        raise TypeError("bug")

    monkeypatch.setattr(transformer, "_check_config", broken_check)
    with pytest.raises(TypeError, match="bug"):
        load_model(tmp_path / "good.pt")


def test_half_precision_file_loads_as_float32(tmp_path):
    model = create_model("DiT-S/2", **TINY)
    torch.save({k: v.half() for k, v in model.state_dict().items()}, tmp_path / "half.pt")
    loaded, _ = load_model(tmp_path / "half.pt", num_heads=4)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())


# ------------------------------------------------------------------------------------ shape inference

@pytest.mark.parametrize("name", list_models())
def test_infer_config_recovers_registered_sizes(name):
    z = (768,) if name.startswith("SiT") else ()
    with torch.device("meta"):
        model = create_model(name, z_dims=z)
    cfg = infer_config(model.state_dict())
    expected = model.config
    expected.pop("time_convention")
    assert cfg == expected


def test_infer_config_rules():
    with torch.device("meta"):
        model = create_model("SiT-S/2", depth=4, hidden_size=128, num_heads=2, input_size=16, num_classes=10,
                             class_dropout_prob=0.0, mlp_ratio=2.0)
    sd = model.state_dict()
    cfg = infer_config(sd)
    assert cfg["num_heads"] == 2 and cfg["input_size"] == 16 and cfg["mlp_ratio"] == 2.0
    assert (cfg["num_classes"], cfg["class_dropout_prob"]) == (9, 0.1)  # null row assumed without args
    cfg = infer_config(sd, args=argparse.Namespace(num_classes=10, encoder_depth=3))
    assert (cfg["num_classes"], cfg["class_dropout_prob"], cfg["encoder_depth"]) == (10, 0.0, 3)
    assert infer_config(sd, num_heads=8)["num_heads"] == 8
    with torch.device("meta"):
        odd = create_model("SiT-S/2", depth=1, hidden_size=36, num_heads=3)
    with pytest.raises(LayoutError, match="num_heads"):
        infer_config(odd.state_dict())
    with torch.device("meta"):
        qk = create_model("SiT-S/2", depth=1, hidden_size=36, num_heads=3, qk_norm=True)
    assert infer_config(qk.state_dict())["num_heads"] == 3
