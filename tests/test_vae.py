"""LatentVAE (random:tiny), REPA latent sampling, extract_latents layout, offline errors."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from repa_probe.encoders.vae import (SD_VAE_SCALE, LatentVAE, VAEInputError, VAEWeightsError, extract_latents,
                            load_vae, sample_posterior)


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return load_vae("random:tiny")


def _images(b, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=g)


class _Images:
    """Map-style dataset in the data module's format."""

    def __init__(self, n, size=32):
        self.x = _images(n, size, seed=42)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i], "label": torch.tensor(i % 3, dtype=torch.int64)}


def test_none_and_bad_names():
    assert load_vae(None) is None and load_vae("none") is None
    with pytest.raises(VAEWeightsError, match="random:tiny"):
        load_vae("random:huge")


def test_missing_vae_offline_names_config_key(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(VAEWeightsError) as info:
        load_vae("repa-probe-tests/no-such-vae")
    msg = str(info.value)
    assert "\n" not in msg and "vae.name=" in msg and "vae.name=none" in msg


def test_encode_sample_decode_shapes_and_scale(vae):
    assert isinstance(vae, LatentVAE) and vae.scale == SD_VAE_SCALE == 0.18215 and vae.bias == 0.0
    assert (vae.latent_channels, vae.downsample_factor) == (4, 8)
    assert all(not p.requires_grad for p in vae.parameters()) and not vae.train().training
    x = _images(2)
    m = vae.encode_moments(x)
    assert m.shape == (2, 8, 4, 4) and m.dtype == torch.float32
    # pixels are mapped with x / 127.5 - 1 and the moments are the posterior mean || std
    dist = vae.vae.encode(x.float() / 127.5 - 1).latent_dist
    torch.testing.assert_close(m, torch.cat([dist.mean, dist.std], 1).detach())
    assert (m[:, 4:] > 0).all()

    z = vae.sample(m, generator=torch.Generator().manual_seed(3))
    eps = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(z, (m[:, :4] + m[:, 4:] * eps) * 0.18215)
    z2 = sample_posterior(m, scale=1.0, bias=0.5, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(z2, m[:, :4] + m[:, 4:] * eps + 0.5)

    img = vae.decode(z)
    assert img.shape == (2, 3, 32, 32) and img.dtype == torch.uint8
    raw = vae.vae.decode(z / 0.18215).sample  # decode undoes the scale
    torch.testing.assert_close(img, torch.clamp(255 * (raw + 1) / 2, 0, 255).to(torch.uint8))


def test_bad_inputs(vae):
    with pytest.raises(VAEInputError, match="uint8"):
        vae.encode_moments(_images(1).float())
    with pytest.raises(VAEInputError, match="divisible"):
        vae.encode_moments(_images(1, size=36))
    with pytest.raises(VAEInputError, match="channels"):
        vae.sample(torch.zeros(1, 6, 4, 4))
    with pytest.raises(VAEInputError):
        vae.decode(torch.zeros(1, 8, 4, 4))


def _read_repa_layout(root):
    """Pair files the way REPA's CustomDataset does: sorted walk of images/ and vae-sd/, labels from
    vae-sd/dataset.json."""
    def walk(d):
        return sorted(os.path.relpath(os.path.join(r, f), d) for r, _, fs in os.walk(d) for f in fs
                      if not f.endswith(".json"))
    imgs, feats = walk(root / "images"), walk(root / "vae-sd")
    labels = dict(json.loads((root / "vae-sd" / "dataset.json").read_text())["labels"])
    return imgs, feats, [labels[f] for f in feats]


def test_extract_latents_repa_layout(vae, tmp_path):
    ds = _Images(5)
    extract_latents(ds, vae, tmp_path, batch_size=2, progress=False)
    imgs, feats, labels = _read_repa_layout(tmp_path)
    assert imgs == [f"00000/img{i:08d}.png" for i in range(5)]
    assert feats == [f"00000/img-mean-std-{i:08d}.npy" for i in range(5)]
    assert labels == [i % 3 for i in range(5)]
    want = vae.encode_moments(ds.x)
    for i in range(5):
        arr = np.load(tmp_path / "vae-sd" / feats[i])
        assert arr.dtype == np.float32 and arr.shape == (8, 4, 4)
        np.testing.assert_allclose(arr, want[i].numpy(), rtol=1e-5, atol=1e-6)
        png = np.array(Image.open(tmp_path / "images" / imgs[i]))
        np.testing.assert_array_equal(png, ds.x[i].permute(1, 2, 0).numpy())
    img_labels = json.loads((tmp_path / "images" / "dataset.json").read_text())["labels"]
    assert img_labels == [[f"00000/img{i:08d}.png", i % 3] for i in range(5)]
    with pytest.raises(VAEInputError, match="--overwrite"):
        extract_latents(ds, vae, tmp_path, batch_size=2, progress=False)


def test_extract_latents_flip_and_index_folders(vae, tmp_path, monkeypatch):
    import repa_probe.encoders.vae as vae_mod

    ds = _Images(3)
    extract_latents(ds, vae, tmp_path, batch_size=2, flip=True, save_images=False, progress=False)
    meta = json.loads((tmp_path / "vae-sd" / "dataset.json").read_text())
    assert meta["flip"] == {"num_original": 3} and not (tmp_path / "images").exists()
    flipped = vae.encode_moments(ds.x.flip(-1))
    for i in range(3):
        assert meta["labels"][3 + i] == [f"00000/img-mean-std-{3 + i:08d}.npy", i % 3]
        np.testing.assert_allclose(np.load(tmp_path / "vae-sd" / f"00000/img-mean-std-{3 + i:08d}.npy"),
                                   flipped[i].numpy(), rtol=1e-5, atol=1e-6)
    # idx[:5] is the first five digits of the 8-digit index: item 123456 lives in folder 00123
    assert vae_mod._npy_name(123456) == "00123/img-mean-std-00123456.npy"
    assert vae_mod._png_name(123456) == "00123/img00123456.png"
