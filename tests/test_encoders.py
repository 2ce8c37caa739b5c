"""Target encoders: shapes, REPA preprocessing, official DINOv2 checkpoint loading, offline errors."""
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from repa_probe.encoders import target as enc
from repa_probe.encoders.target import (EncoderInputError, EncoderWeightsError, default_input_size, load_encoder,
                                 preprocess, resolve_encoder_name)

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def _images(b, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=g)


def _perturb_(model, seed=0):
    """Random init leaves LayerScale at 1e-5 (blocks ~ identity); make every parameter matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _random_timm(name, img_size, seed=0):
    """timm model with N(0, 0.05^2) weights, built without timm's slow init (meta device + assign)."""
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, img_size=img_size, num_classes=0)
    g = torch.Generator().manual_seed(seed)
    model.load_state_dict({k: torch.randn(v.shape, generator=g) * 0.05 for k, v in model.state_dict().items()},
                          assign=True)
    return model.eval()


def _hand_tokens(model, images, size):
    """Reference: REPA preprocessing written out with numpy constants, then timm forward_features."""
    x = images.float() / 255.0
    x = (x - torch.tensor(MEAN, dtype=torch.float32).view(1, 3, 1, 1)) / torch.tensor(
        STD, dtype=torch.float32).view(1, 3, 1, 1)
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    with torch.no_grad():
        return model.forward_features(x)


@pytest.fixture(scope="module")
def vits_reg_official(tmp_path_factory):
    """A random timm ViT-S/14-reg4 (112 px input = 128 px images, 8x8 tokens) and the same weights saved in the OFFICIAL hub key layout."""
    ref = _random_timm("vit_small_patch14_reg4_dinov2", 112)
    sd = ref.state_dict()
    g = torch.Generator().manual_seed(1)
    cls_pos = torch.randn(1, 1, sd["cls_token"].shape[-1], generator=g)
    official = {k: v.clone() for k, v in sd.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    official["register_tokens"] = sd["reg_token"].clone()
    official["cls_token"] = sd["cls_token"] - cls_pos  # official adds the CLS position after concat
    official["pos_embed"] = torch.cat([cls_pos, sd["pos_embed"]], dim=1)  # (1, 1 + 64, D)
    official["mask_token"] = torch.zeros(1, sd["cls_token"].shape[-1])
    path = tmp_path_factory.mktemp("w") / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(official, path)
    return ref, path


def test_registry_names_and_aliases():
    assert resolve_encoder_name("dinov2-vit-b").name == "dinov2_vitb14"
    assert resolve_encoder_name("dinov2-vit-l-reg").name == "dinov2_vitl14_reg"
    for name in enc.list_encoders():
        spec = resolve_encoder_name(name)
        assert spec.timm_name is None or timm.is_model(spec.timm_name), spec.timm_name
    with pytest.raises(EncoderInputError, match="unknown encoder"):
        resolve_encoder_name("pe_core_vitg14")  # iREPA has it, timm does not
    spec = resolve_encoder_name("dinov2_vitb14")
    assert default_input_size(spec, 256) == 224 and default_input_size(spec, 512) == 448
    with pytest.raises(EncoderInputError, match="multiple of patch size"):
        default_input_size(spec, 100)


def test_tiny_vit_shapes_and_feature_kinds():
    e = load_encoder("tiny_vit", pretrained=False, resolution=32)
    assert (e.input_size, e.grid_size, e.num_tokens, e.embed_dim, e.patch_size) == (32, 8, 64, 64, 4)
    x = _images(3, 32)
    tok = e(x)
    assert tok.shape == (3, 64, 64) and tok.dtype == torch.float32
    allt = _hand_tokens(e.backbone, x, 32)
    torch.testing.assert_close(tok, allt[:, 1:])
    torch.testing.assert_close(e.cls(x), allt[:, 0])
    torch.testing.assert_close(e.features(x, "mean_patch"), allt[:, 1:].mean(1))
    with pytest.raises(EncoderInputError):
        e.features(x, "pooled")
    with pytest.raises(EncoderWeightsError, match="encoder.pretrained=false"):
        load_encoder("tiny_vit", resolution=32)  # no pretrained tiny weights exist
    with pytest.raises(EncoderInputError, match="unexpected keyword"):
        load_encoder("tiny_vit", pretrained=False, resolution=32, img_size=64)


def test_dinov2_vitb14_random_256px():
    e = load_encoder("dinov2_vitb14", pretrained=False, resolution=256)
    assert (e.input_size, e.grid_size, e.embed_dim) == (224, 16, 768)
    out = e(_images(1, 256))
    assert out.shape == (1, 256, 768)
    assert torch.isfinite(out).all()


def test_official_layout_file_gives_identical_tokens(vits_reg_official):
    ref, path = vits_reg_official
    e = load_encoder("dinov2_vits14_reg", weights=path, resolution=128)
    assert e.source.startswith("file:") and e.backbone.num_prefix_tokens == 5  # CLS + 4 registers
    assert (e.input_size, e.num_tokens) == (112, 64)
    x = _images(2, 128, seed=3)
    expected = _hand_tokens(ref, x, 112)
    # cls_token - p + p is not bit-exact in fp32, hence the tiny tolerance
    torch.testing.assert_close(e(x), expected[:, 5:], rtol=0, atol=1e-5)
    torch.testing.assert_close(e.cls(x), expected[:, 0], rtol=0, atol=1e-5)


def test_pos_embed_resampled_from_official_37x37_grid(tmp_path):
    sd = dict(_random_timm("vit_small_patch14_dinov2", 112).state_dict())
    d = sd["pos_embed"].shape[-1]
    big = torch.randn(1, 1 + 37 * 37, d, generator=torch.Generator().manual_seed(5))  # 518 / 14 = 37
    sd["pos_embed"], sd["mask_token"] = big, torch.zeros(1, d)
    path = tmp_path / "official_518.pth"
    torch.save(sd, path)
    e = load_encoder("dinov2_vits14", weights=path, resolution=128)
    grid = big[:, 1:].reshape(1, 37, 37, d).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False, antialias=True)
    want = torch.cat([big[:, :1], want.permute(0, 2, 3, 1).reshape(1, 64, d)], dim=1)
    torch.testing.assert_close(e.backbone.pos_embed, want)


def test_timm_layout_safetensors_and_strict_mismatch(tmp_path):
    src = _perturb_(load_encoder("tiny_vit", pretrained=False, resolution=32).backbone)
    good = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(good))
    e = load_encoder("tiny_vit", weights=good, resolution=32)
    x = _images(2, 32)
    torch.testing.assert_close(e(x), _hand_tokens(src, x, 32)[:, 1:], rtol=0, atol=0)

    bad = dict(src.state_dict())
    bad.pop("norm.weight")
    bad["blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(EncoderWeightsError) as info:
        load_encoder("tiny_vit", weights=tmp_path / "bad.pth", resolution=32)
    msg = str(info.value)
    assert "\n" not in msg and "missing: norm.weight" in msg and "blocks.0.attn.qkv.weight" in msg
    with pytest.raises(EncoderWeightsError, match="does not exist"):
        load_encoder("tiny_vit", weights=tmp_path / "nope.pth", resolution=32)


def test_missing_weights_offline_names_config_key(tmp_path, monkeypatch):
    import huggingface_hub.constants as hfc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(EncoderWeightsError) as info:
        load_encoder("dinov2-vit-b")
    msg = str(info.value)
    assert "\n" not in msg
    assert "encoder.weights=/path/to/dinov2_vitb14_pretrain.pth" in msg and "encoder.pretrained=false" in msg


def test_weights_found_in_torch_hub_and_hf_caches(tmp_path, monkeypatch, vits_reg_official):
    import huggingface_hub.constants as hfc

    ref, official = vits_reg_official
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(tmp_path / "hf"))
    x = _images(1, 128, seed=7)
    want = _hand_tokens(ref, x, 112)[:, 5:]
    # (c) HF cache in the layout huggingface_hub writes: refs/main -> snapshots/<commit>/model.safetensors
    repo = tmp_path / "hf" / "models--timm--vit_small_patch14_reg4_dinov2.lvd142m"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    save_file(ref.state_dict(), str(repo / "snapshots" / "abc123" / "model.safetensors"))
    e = load_encoder("dinov2_vits14_reg", resolution=128)
    assert e.source.startswith("hf:")
    torch.testing.assert_close(e(x), want, rtol=0, atol=0)
    # (b) torch hub cache has priority under source="auto"; source="timm" skips it
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / "dinov2_vits14_reg4_pretrain.pth").symlink_to(official)
    e = load_encoder("dinov2_vits14_reg", resolution=128)
    assert e.source.startswith("hub:")
    torch.testing.assert_close(e(x), want, rtol=0, atol=1e-5)
    assert load_encoder("dinov2_vits14_reg", resolution=128, source="timm").source.startswith("hf:")


def _bicubic_matrix(n_in, n_out, a=-0.75):
    """(n_out, n_in) weights of PyTorch-style bicubic resampling (align_corners=False, no antialias)."""
    def w(t):
        t = abs(t)
        if t <= 1:
            return (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1
        return a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a if t < 2 else 0.0
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) * n_in / n_out - 0.5
        f = math.floor(src)
        for k in range(f - 1, f + 3):
            m[i, min(max(k, 0), n_in - 1)] += w(src - k)
    return m


def test_preprocessing_matches_hand_computation():
    x = _images(2, 10, seed=11)
    mean = torch.tensor(MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float32).view(1, 3, 1, 1)
    out = preprocess(x, 7, mean, std)
    norm = (x.numpy() / 255.0 - MEAN.reshape(1, 3, 1, 1)) / STD.reshape(1, 3, 1, 1)
    m = _bicubic_matrix(10, 7)
    want = np.einsum("ih,bchw,jw->bcij", m, norm, m)
    np.testing.assert_allclose(out.numpy(), want, atol=1e-5)
    # float input in [0, 255] is the same as uint8; out-of-range floats are refused
    torch.testing.assert_close(preprocess(x.float(), 7, mean, std), out)
    with pytest.raises(EncoderInputError, match=r"\[0, 255\]"):
        preprocess(x.float() / 127.5 - 1, 7, mean, std)
    # no resize when the size already matches
    np.testing.assert_allclose(preprocess(x, 10, mean, std).numpy(), norm, atol=1e-5)


def test_frozen_eval_no_grad_and_usable_as_target():
    e = load_encoder("tiny_vit", pretrained=False, resolution=32)
    assert all(not p.requires_grad for p in e.parameters())
    e.train()
    assert not e.training and not e.backbone.training
    w = torch.nn.Parameter(torch.ones(64))
    with torch.enable_grad():
        tok = e(_images(2, 32))
        assert not tok.requires_grad and tok.grad_fn is None
        (tok * w).sum().backward()  # targets computed by the encoder work inside a training step
    assert w.grad is not None and all(p.grad is None for p in e.parameters())


def test_cache_key_tracks_weights(tmp_path):
    a = load_encoder("tiny_vit", pretrained=False, resolution=32)
    b = load_encoder("tiny_vit", pretrained=False, resolution=32)
    assert a.cache_key != b.cache_key  # different random weights must never share a feature cache
    torch.save(a.backbone.state_dict(), tmp_path / "a.pth")
    k1 = load_encoder("tiny_vit", weights=tmp_path / "a.pth", resolution=32).cache_key
    k2 = load_encoder("tiny_vit", weights=tmp_path / "a.pth", resolution=32).cache_key
    k3 = load_encoder("tiny_vit", weights=tmp_path / "a.pth", resolution=32, input_size=64).cache_key
    assert k1 == k2 and k1 != k3
    assert k1.startswith("tiny_vit|sha256:") and "res32" in k1 and enc.PREPROCESS_VERSION in k1
