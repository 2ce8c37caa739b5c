"""The non-DINOv2 target encoders: documented shapes and constants, official key layouts, missing weights.

Real sizes are built on the meta device (shapes only); numbers are checked on small random variants of the same
timm architecture (same spec: normalisation, resize rule, final norm, CLS), saved in each official layout.
"""
import dataclasses

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from repa_probe.encoders.registry import CLIP_MEAN, CLIP_STD, ENCODERS, HALF, IMAGENET_MEAN, IMAGENET_STD
from repa_probe.encoders.target import EncoderInputError, EncoderWeightsError, load_encoder, resolve_encoder_name

# REPA / iREPA --enc-type spelling -> (input px at 256, tokens, D, CLS, final norm, mean, std); official-repa-facts §3
DOCUMENTED = {
    "clip-vit-L": (224, 256, 1024, True, False, CLIP_MEAN, CLIP_STD),
    "mae-vit-l": (256, 256, 1024, True, False, IMAGENET_MEAN, IMAGENET_STD),
    "jepa-vit-h": (224, 256, 1280, False, True, IMAGENET_MEAN, IMAGENET_STD),
    "dinov1-vit-b": (256, 256, 768, True, True, IMAGENET_MEAN, IMAGENET_STD),
    "mocov3-vit-b": (256, 256, 768, True, True, IMAGENET_MEAN, IMAGENET_STD),
    "mocov3-vit-l": (256, 256, 1024, True, True, IMAGENET_MEAN, IMAGENET_STD),
    "siglip-vit-b": (256, 256, 768, False, True, HALF, HALF),
    "siglip2-vit-l": (256, 256, 1024, False, True, HALF, HALF),
    "dinov3-vit-b": (256, 256, 768, True, True, IMAGENET_MEAN, IMAGENET_STD),
}


def _images(b, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=g)


def _small(monkeypatch, name, depth=2, dim=32, **kw):
    """Register a small random variant of ``name``'s spec (same architecture family and preprocessing)."""
    spec = resolve_encoder_name(name)
    small = dataclasses.replace(spec, name=spec.name + "_small", embed_dim=dim, timm_kwargs=tuple(
        dict(spec.timm_kwargs, embed_dim=dim, depth=depth, num_heads=2, **kw).items()))
    monkeypatch.setitem(ENCODERS, small.name, small)
    return small


def _random_source(spec, img_size, **overrides):
    """The timm model a checkpoint would come from (with its heads), N(0, 0.05^2) weights."""
    kwargs = dict(dict(spec.timm_kwargs), **overrides)
    model = timm.create_model(spec.timm_name, pretrained=False, img_size=img_size, **kwargs)
    g = torch.Generator().manual_seed(0)
    model.load_state_dict({k: torch.randn(v.shape, generator=g) * 0.05 for k, v in model.state_dict().items()})
    return model.eval()


def _pixels(images, size, mean, std):
    """REPA's preprocessing written out: /255, normalise with (mean, std), bicubic resize."""
    x = images.float() / 255.0
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    return x if x.shape[-1] == size else F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)


@pytest.mark.parametrize("alias", sorted(DOCUMENTED))
def test_documented_shapes_constants_on_meta(alias):
    size, tokens, dim, has_cls, final_norm, mean, std = DOCUMENTED[alias]
    with torch.device("meta"):
        e = load_encoder(alias, pretrained=False, resolution=256)
        x = torch.zeros(2, 3, 256, 256, dtype=torch.uint8)
        out = e(x)
        assert (e.input_size, e.num_tokens, e.embed_dim, e.has_cls) == (size, tokens, dim, has_cls)
        assert out.shape == (2, tokens, dim)
        assert (getattr(e.backbone, "cls_token", None) is not None) == has_cls
        if has_cls:
            assert e.cls(x).shape == (2, dim)
        else:
            with pytest.raises(EncoderInputError, match="no CLS token"):
                e.cls(x)
    assert isinstance(e.backbone.norm, nn.LayerNorm) == final_norm
    spec = resolve_encoder_name(alias)
    assert (spec.mean, spec.std) == (mean, std) and e.mean.shape == (1, 3, 1, 1)
    assert timm.is_model(spec.timm_name)


def test_input_size_at_512():
    with torch.device("meta"):
        assert load_encoder("clip-vit-L", pretrained=False, resolution=512).grid_size == 32
        assert load_encoder("mae-vit-l", pretrained=False, resolution=512).grid_size == 32


class _OpenAIBlock(nn.Module):
    """OpenAI CLIP's ResidualAttentionBlock, parameter names as in clip/model.py (QuickGELU MLP)."""

    def __init__(self, d, heads):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(d, 4 * d))
        self.mlp.add_module("c_proj", nn.Linear(4 * d, d))

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        h = self.mlp.c_fc(self.ln_2(x))
        return x + self.mlp.c_proj(h * torch.sigmoid(1.702 * h))


class _OpenAIVisual(nn.Module):
    """OpenAI CLIP's visual tower; ``forward`` returns what REPA aligns to: transformer output, no ln_post."""

    def __init__(self, d, patch, grid, layers, heads, out_dim=16):
        super().__init__()
        self.conv1 = nn.Conv2d(3, d, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(d) * 0.1)
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, d) * 0.1)
        self.ln_pre, self.ln_post = nn.LayerNorm(d), nn.LayerNorm(d)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.Sequential(*[_OpenAIBlock(d, heads) for _ in range(layers)])
        self.proj = nn.Parameter(torch.randn(d, out_dim))

    def forward(self, x):
        x = self.conv1(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + self.positional_embedding
        return self.transformer.resblocks(self.ln_pre(x))


def test_openai_clip_layout_matches_reference(tmp_path, monkeypatch):
    spec = _small(monkeypatch, "clip-vit-L")
    ref = _OpenAIVisual(32, 14, 8, layers=2, heads=2)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    sd = {f"visual.{k}": v for k, v in ref.state_dict().items()}
    sd.update({"token_embedding.weight": torch.zeros(10, 8), "ln_final.weight": torch.ones(8)})  # text tower
    torch.save(sd, tmp_path / "clip.pt")
    e = load_encoder(spec.name, weights=tmp_path / "clip.pt", resolution=128)  # 112 px, 8x8 tokens
    assert (e.input_size, e.num_tokens) == (112, 64)
    x = _images(2, 128)
    # REPA's CLIP order: resize first, then the CLIP normalisation
    pix = F.interpolate(x.float() / 255.0, size=(112, 112), mode="bicubic", align_corners=False)
    pix = (pix - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        want = ref(pix)
    torch.testing.assert_close(e(x), want[:, 1:], rtol=0, atol=2e-5)
    torch.testing.assert_close(e.cls(x), want[:, 0], rtol=0, atol=2e-5)


def test_mocov3_layout_with_typos_and_momentum_encoder(tmp_path, monkeypatch):
    spec = _small(monkeypatch, "mocov3-vit-l", depth=15)
    src = _random_source(spec, 64, num_classes=0, embed_dim=32, depth=15, num_heads=2)
    typos = {"blocks.13.norm1.": "blocks.13.norm13.", "blocks.13.mlp.fc1.": "blocks.13.mlp.fc13.",
             "blocks.14.norm2.": "blocks.14.norm14.", "blocks.14.mlp.fc2.": "blocks.14.mlp.fc14."}
    sd = {}
    for k, v in src.state_dict().items():
        for right, wrong in typos.items():
            k = k.replace(right, wrong)
        sd[f"module.base_encoder.{k}"] = v
        sd[f"module.momentum_encoder.{k}"] = torch.zeros_like(v)
    sd["module.base_encoder.head.0.weight"] = torch.zeros(8, 32)  # projection MLP: never used
    sd["module.predictor.0.weight"] = torch.zeros(8, 8)
    assert any("norm13" in k for k in sd)
    torch.save({"epoch": 300, "arch": "vit_large", "state_dict": sd}, tmp_path / "mocov3_vitl.pth")
    e = load_encoder(spec.name, weights=tmp_path / "mocov3_vitl.pth", resolution=64)  # no resize: 4x4 tokens
    x = _images(2, 64, seed=1)
    with torch.no_grad():
        want = src.forward_features(_pixels(x, 64, IMAGENET_MEAN, IMAGENET_STD))
    torch.testing.assert_close(e(x), want[:, 1:], rtol=0, atol=1e-5)


def test_mae_file_loads_without_final_norm(tmp_path, monkeypatch):
    spec = _small(monkeypatch, "mae-vit-l")
    src = _random_source(spec, 224, num_classes=0, embed_dim=32, depth=2, num_heads=2)  # 14x14 pos_embed in file
    torch.save({"model": src.state_dict()}, tmp_path / "mae_pretrain_vit_large.pth")
    e = load_encoder(spec.name, weights=tmp_path / "mae_pretrain_vit_large.pth", resolution=64)
    ref = _random_source(spec, 64, num_classes=0, embed_dim=32, depth=2, num_heads=2)
    ref.load_state_dict(dict(src.state_dict(), pos_embed=e.backbone.pos_embed.detach()))  # resampled 14x14 -> 4x4
    ref.norm = nn.Identity()  # REPA: last block's output, no final norm
    x = _images(2, 64, seed=2)
    with torch.no_grad():
        want = ref.forward_features(_pixels(x, 64, IMAGENET_MEAN, IMAGENET_STD))
    torch.testing.assert_close(e(x), want[:, 1:], rtol=0, atol=1e-5)
    assert not torch.allclose(e(x), src.norm(want)[:, 1:], atol=1e-3)  # the norm really is skipped


def test_ijepa_tar_file_uses_encoder_entry(tmp_path, monkeypatch):
    spec = _small(monkeypatch, "jepa-vit-h")
    src = _random_source(spec, 56, num_classes=0, embed_dim=32, depth=2, num_heads=2)
    ckpt = {"encoder": {f"module.{k}": v for k, v in src.state_dict().items()},
            "target_encoder": {f"module.{k}": torch.zeros_like(v) for k, v in src.state_dict().items()},
            "predictor": {"module.x": torch.zeros(2)}, "epoch": 300, "lr": 1e-3}
    torch.save(ckpt, tmp_path / "IN1K-vit.h.14-300e.pth.tar")
    e = load_encoder(spec.name, weights=tmp_path / "IN1K-vit.h.14-300e.pth.tar", resolution=64)  # 56 px, 4x4
    assert (e.input_size, e.num_tokens, e.has_cls) == (56, 16, False)
    x = _images(2, 64, seed=3)
    with torch.no_grad():
        want = src.forward_features(_pixels(x, 56, IMAGENET_MEAN, IMAGENET_STD))
    torch.testing.assert_close(e(x), want, rtol=0, atol=1e-5)  # every token: no CLS to drop
    torch.testing.assert_close(e.features(x, "mean_patch"), want.mean(1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["siglip-vit-b", "dinov1-vit-b", "dinov3-vit-b"])
def test_timm_hf_cache_files_with_heads(tmp_path, monkeypatch, name):
    import huggingface_hub.constants as hfc

    spec = _small(monkeypatch, name)
    overrides = dict(embed_dim=32, depth=2, num_heads=2)
    if name.startswith("siglip"):
        overrides["global_pool"] = "map"  # the HF file carries the attention-pool head
    src = _random_source(spec, 64, num_classes=5, **overrides)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(tmp_path / "hf"))
    repo = tmp_path / "hf" / f"models--{spec.hf_repo.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("c0ffee")
    (repo / "snapshots" / "c0ffee").mkdir(parents=True)
    torch.save(src.state_dict(), repo / "snapshots" / "c0ffee" / "pytorch_model.bin")
    e = load_encoder(spec.name, resolution=64)
    assert e.source.startswith("hf:")
    x = _images(2, 64, seed=4)
    with torch.no_grad():
        want = src.forward_features(_pixels(x, 64, spec.mean, spec.std))
    prefix = src.num_prefix_tokens  # CLS (+ 4 registers for DINOv3); SigLIP has none
    assert prefix == {"siglip-vit-b": 0, "dinov1-vit-b": 1, "dinov3-vit-b": 5}[name]
    torch.testing.assert_close(e(x), want[:, prefix:], rtol=0, atol=1e-5)
    if spec.has_cls:
        torch.testing.assert_close(e.cls(x), want[:, 0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("alias,file", [("clip-vit-L", "clip_vitl14.pth"), ("mae-vit-l", "mae_pretrain_vit_large.pth"),
                                        ("jepa-vit-h", "IN1K-vit.h.14-300e.pth.tar"), ("mocov3-vit-l", "mocov3_vitl.pth"),
                                        ("siglip-vit-b", "siglip_vitb16.pth"), ("dinov1-vit-b", "dino_vitbase16_pretrain.pth")])
def test_missing_weights_is_one_line_naming_the_key(tmp_path, monkeypatch, alias, file):
    import huggingface_hub.constants as hfc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(EncoderWeightsError) as info:
        load_encoder(alias)
    msg = str(info.value)
    assert "\n" not in msg and f"encoder.weights=/path/to/{file}" in msg and "encoder.pretrained=false" in msg


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_torchscript_archive_is_refused_in_one_line(tmp_path):
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), tmp_path / "ViT-L-14.pt")
    with pytest.raises(EncoderWeightsError, match="TorchScript") as info:
        load_encoder("clip-vit-L", weights=tmp_path / "ViT-L-14.pt")
    assert "\n" not in str(info.value) and "encoder.weights" in str(info.value)
