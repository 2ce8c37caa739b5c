"""Tests for repa_probe.models: shapes, conventions, init, hidden states, validation.

Agreement with the official DiT / SiT / REPA code (forward, hidden states, projectors, pos_embed, key layout)
is tested against their own outputs in tests/test_golden.py.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from repa_probe.models import (
    MODEL_SIZES,
    DiffusionTransformer,
    ModelInputError,
    create_model,
    list_models,
    model_kwargs,
    model_name,
    size_name,
    timestep_embedding,
)

TINY = dict(depth=2, hidden_size=32, num_heads=2, input_size=16)


def _randomize(model: nn.Module, seed: int = 0) -> None:
    """Give every parameter (also the zero-initialised ones) non-trivial values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _inputs(model: DiffusionTransformer, batch: int = 3, seed: int = 1, int_time: bool = False):
    g = torch.Generator().manual_seed(seed)
    s, c = model.input_size, model.in_channels
    x = torch.randn(batch, c, s, s, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g) if int_time else torch.rand(batch, generator=g)
    y = torch.randint(0, model.num_classes + 1, (batch,), generator=g)
    return x, t, y


# --------------------------------------------------------------------------------------------- registry

def test_list_models_names():
    names = list_models()
    assert len([n for n in names if n.startswith(("SiT-", "DiT-"))]) == 28  # SiT-*/1: REPA-E; no DiT-*/1
    assert len([n for n in names if n.startswith("LightningDiT-")]) == 16
    for prefix in ("SiT", "DiT", "LightningDiT"):
        for size in ("S", "B", "L", "XL"):
            for p in (2, 4, 8):
                assert f"{prefix}-{size}/{p}" in names
    assert "LightningDiT-XL/1" in names and "SiT-XL/1" in names and "DiT-XL/1" not in names


@pytest.mark.parametrize("name", list_models())
def test_every_registered_name_builds_and_runs(name):
    model = create_model(name, **TINY)
    x, t, y = _inputs(model, batch=2, int_time=name.startswith("DiT"))
    out, zs = model(x, t, y)
    channels = 8 if name.startswith("DiT") else 4
    assert out.shape == (2, channels, 16, 16)
    assert zs == []
    assert model.patch_size == int(name.split("/")[1])
    assert model.num_tokens == (16 // model.patch_size) ** 2 == model.grid_size ** 2
    prefix = name.split("-")[0]
    assert (model.family, model.time_convention) == (prefix, "ddpm" if prefix == "DiT" else "repa")
    # the real architecture (meta device: shapes only, no memory)
    with torch.device("meta"):
        full = create_model(name)
    size = name.split("-")[1].split("/")[0]
    assert (full.depth, full.hidden_size, full.num_heads) == tuple(
        MODEL_SIZES[size][k] for k in ("depth", "hidden_size", "num_heads"))
    assert size_name(full.config) == size and model_name(full.config) == name


def _expected_params(depth, d, c, p, tokens, out_c, rows, z_dims=(), proj=2048, mlp=4):
    """Parameter count written out from the official layer list."""
    per_block = (3 * d * d + 3 * d) + (d * d + d) + (mlp * d * d + mlp * d) + (mlp * d * d + d) + (6 * d * d + 6 * d)
    n = d * c * p * p + d + tokens * d + (256 * d + d) + (d * d + d) + rows * d + depth * per_block
    n += (d * p * p * out_c + p * p * out_c) + (2 * d * d + 2 * d)
    for z in z_dims:
        n += (d * proj + proj) + (proj * proj + proj) + (proj * z + z)
    return n


def test_xl_parameter_counts_on_meta():
    with torch.device("meta"):
        dit = create_model("DiT-XL/2")
        sit = create_model("SiT-XL/2", z_dims=(768,))
    n_dit = sum(p.numel() for p in dit.parameters())
    n_sit = sum(p.numel() for p in sit.parameters())
    assert n_dit == 675_129_632  # the count DiT reports for DiT-XL/2
    assert n_dit == _expected_params(28, 1152, 4, 2, 256, 8, 1001)
    projector = 1152 * 2048 + 2048 + 2048 * 2048 + 2048 + 2048 * 768 + 768
    assert abs(projector - 8.13e6) < 0.01e6
    sigma_half = 1152 * 2 * 2 * 4 + 2 * 2 * 4
    assert n_sit == n_dit - sigma_half + projector
    assert n_sit == _expected_params(28, 1152, 4, 2, 256, 4, 1001, z_dims=(768,))


def test_create_model_errors():
    with pytest.raises(ModelInputError, match="SiT-XL/2"):
        create_model("SiT-XXL/2")
    with pytest.raises(ModelInputError, match="hidden_size"):
        create_model("SiT-S/2", hiden_size=3)
    with pytest.raises(ValueError, match="divisible"):
        create_model("SiT-S/2", hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="encoder_depth"):
        create_model("SiT-S/2", depth=2, z_dims=(16,))  # default encoder_depth 8 > depth 2
    with pytest.raises(ValueError, match="learn_sigma"):
        create_model("SiT-S/2", learn_sigma=True)  # the repa convention predicts velocity only
    with pytest.raises(ValueError, match="time_convention"):
        create_model("SiT-S/2", time_convention="edm")
    assert model_kwargs("DiT-L/4") == dict(depth=24, hidden_size=1024, num_heads=16, patch_size=4,
                                           time_convention="ddpm", learn_sigma=True)


def test_config_rebuilds_identical_model():
    model = create_model("SiT-B/4", **TINY, z_dims=(12, 20), encoder_depth=1, projector_dim=24, qk_norm=True)
    _randomize(model)
    cfg = model.config
    assert cfg["z_dims"] == [12, 20] and cfg["time_convention"] == "repa" and cfg["qk_norm"] is True
    cfg["z_dims"].append(5)  # config is a copy
    assert model.config["z_dims"] == [12, 20]
    clone = DiffusionTransformer(**model.config)
    clone.load_state_dict(model.state_dict(), strict=True)
    x, t, y = _inputs(model)
    a, b = model(x, t, y), clone(x, t, y)
    assert torch.equal(a[0], b[0]) and all(torch.equal(u, v) for u, v in zip(a[1], b[1]))


# ------------------------------------------------------------------------------------ official semantics

def test_init_matches_dit_recipe():
    torch.manual_seed(0)
    model = create_model("SiT-S/2", depth=2, hidden_size=64, num_heads=4, input_size=8, z_dims=(16,), encoder_depth=1)
    assert not model.pos_embed.requires_grad
    for blk in model.blocks:
        assert blk.adaLN_modulation[1].weight.abs().sum() == 0 and blk.adaLN_modulation[1].bias.abs().sum() == 0
        assert blk.attn.qkv.bias.abs().sum() == 0
    for layer in (model.final_layer.linear, model.final_layer.adaLN_modulation[1]):
        assert layer.weight.abs().sum() == 0 and layer.bias.abs().sum() == 0
    table = model.y_embedder.embedding_table.weight
    assert table.shape == (1001, 64) and abs(table.std().item() - 0.02) < 0.002
    assert abs(model.t_embedder.mlp[0].weight.std().item() - 0.02) < 0.002
    w = model.blocks[0].mlp.fc1.weight  # xavier uniform: bound sqrt(6 / (fan_in + fan_out))
    bound = math.sqrt(6 / (64 + 256))
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    pw = model.x_embedder.proj.weight
    assert pw.abs().max() <= math.sqrt(6 / (64 + 4 * 2 * 2))
    x, t, y = _inputs(model)
    out, zs = model(x, t, y)
    assert out.abs().sum() == 0  # adaLN-Zero: the untrained model outputs zeros
    assert zs[0].shape == (3, 16, 16) and zs[0].abs().sum() > 0


def test_timestep_embedding_order_and_int_time():
    emb = timestep_embedding(torch.tensor([0.0, 3.0]))
    assert emb.shape == (2, 256) and emb.dtype == torch.float32
    assert torch.all(emb[0, :128] == 1) and torch.all(emb[0, 128:] == 0)  # [cos, sin]
    freqs = torch.exp(-math.log(10000) * torch.arange(128) / 128)
    torch.testing.assert_close(emb[1], torch.cat([torch.cos(3 * freqs), torch.sin(3 * freqs)]))
    torch.testing.assert_close(timestep_embedding(torch.tensor([7, 999])), timestep_embedding(torch.tensor([7.0, 999.0])))


def test_family_output_channels():
    dit = create_model("DiT-S/2", **TINY)
    _randomize(dit)
    sit = DiffusionTransformer(**{**dit.config, "time_convention": "sit"})
    sit.load_state_dict(dit.state_dict())
    x, t, y = _inputs(dit)
    full, _ = dit(x, t, y)
    cut, _ = sit(x, t, y)
    assert full.shape[1] == 8 and cut.shape[1] == 4
    torch.testing.assert_close(cut, full[:, :4])
    assert (sit.time_convention, dit.time_convention, create_model("SiT-S/2", **TINY).time_convention) == \
        ("sit", "ddpm", "repa")


def test_hidden_states_projectors_and_forward_features():
    model = create_model("SiT-S/2", depth=4, hidden_size=32, num_heads=2, input_size=8,
                         z_dims=(8, 24), encoder_depth=2, projector_dim=16)
    _randomize(model)
    x, t, y = _inputs(model)
    out, zs, hidden = model(x, t, y, return_hidden=True)
    assert len(hidden) == 4 and all(h.shape == (3, 16, 32) for h in hidden)
    assert [z.shape for z in zs] == [(3, 16, 8), (3, 16, 24)]
    out2, zs2 = model(x, t, y)
    assert torch.equal(out, out2) and torch.equal(zs[0], zs2[0])
    # projectors read block encoder_depth (1-based) = hidden[1]
    torch.testing.assert_close(zs[1], model.projectors[1](hidden[1]))
    torch.testing.assert_close(model.project(hidden[1])[0], zs[0])
    # the last hidden state determines the output
    c = model.t_embedder(t) + model.y_embedder(y)
    torch.testing.assert_close(model.unpatchify(model.final_layer(hidden[-1], c)), out)
    # forward_features stops after the deepest requested block
    calls = []
    hooks = [b.register_forward_hook(lambda m, i, o, k=k: calls.append(k)) for k, b in enumerate(model.blocks)]
    feats = model.forward_features(x, t, y, layers=[2, 0, np.int64(-4)])
    for h in hooks:
        h.remove()
    assert calls == [0, 1, 2]
    assert torch.equal(feats[0], hidden[2]) and torch.equal(feats[1], hidden[0]) and torch.equal(feats[2], hidden[0])
    assert len(model.forward_features(x, t, y)) == 4
    with pytest.raises(ModelInputError, match="layers"):
        model.forward_features(x, t, y, layers=[4])


def test_unpatchify_inverts_patch_layout():
    model = create_model("SiT-S/4", **TINY)
    img = torch.randn(2, 3, 16, 16)
    p, g = 4, 4
    tokens = img.reshape(2, 3, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(2, g * g, p * p * 3)
    assert torch.equal(model.unpatchify(tokens), img)
    with pytest.raises(ModelInputError):
        model.unpatchify(torch.randn(2, 15, 48))


def test_input_validation():
    model = create_model("SiT-S/2", **TINY, num_classes=10)
    x, t, y = _inputs(model, batch=2)
    bad = [
        (torch.randn(2, 3, 16, 16), t, y, "x must have shape"),
        (torch.randn(2, 4, 8, 8), t, y, "x must have shape"),
        (torch.randn(4, 16, 16), t, y, "x must have shape"),
        (x, torch.rand(3), y, "t must have shape"),
        (x, 0.5, y, "t must be a tensor"),
        (x, t, y.float(), "y must be an integer"),
        (x, t, torch.tensor([0, 11]), r"labels must be in \[0, 10\]"),
        (x, t, torch.tensor([-1, 0]), "labels must be"),
    ]
    for xb, tb, yb, msg in bad:
        with pytest.raises(ModelInputError, match=msg):
            model(xb, tb, yb)
    out, _ = model(x, torch.tensor(0.3), torch.tensor([10, 0]))  # 0-d t broadcasts; 10 = null class
    assert out.shape == (2, 4, 16, 16)
    no_null = create_model("SiT-S/2", **TINY, num_classes=10, class_dropout_prob=0.0)
    with pytest.raises(ModelInputError, match=r"\[0, 9\]"):
        no_null(x, t, torch.tensor([10, 0]))


def test_bf16_autocast_and_backward():
    model = create_model("SiT-S/2", **TINY, z_dims=(8,), encoder_depth=1, projector_dim=16)
    _randomize(model)
    x, t, y = _inputs(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, zs, hidden = model(x, t, y, return_hidden=True)
    assert out.shape == (3, 4, 16, 16) and torch.isfinite(out.float()).all()
    ref, _ = model(x, t, y)
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max() + 1e-3
    (out.float().square().mean() + zs[0].float().mean()).backward()
    assert model.pos_embed.grad is None
    assert model.blocks[0].attn.qkv.weight.grad is not None
    assert model.projectors[0][0].weight.grad is not None


def test_a_transformer_config_is_the_keywords_and_not_both():
    from repa_probe.models import TransformerConfig

    kw = dict(input_size=8, patch_size=4, in_channels=3, hidden_size=32, depth=2, num_heads=2, z_dims=(16,),
              encoder_depth=1, projector_dim=8)
    torch.manual_seed(0)
    a = DiffusionTransformer(TransformerConfig(**kw))
    torch.manual_seed(0)
    b = DiffusionTransformer(**kw)
    assert a.config == b.config and all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    assert DiffusionTransformer(**a.config).config == a.config  # model.config rebuilds it
    with pytest.raises(TypeError, match="not both"):
        DiffusionTransformer(TransformerConfig(**kw), depth=3)
    with pytest.raises(ModelInputError, match="encoder_depth=3 is larger than the model depth 2"):
        DiffusionTransformer(**{**kw, "encoder_depth": 3})
