"""Sampling to a folder: per-sample seeding, sharding, resume, the ADM npz, bad input."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from repa_probe.analysis.generation import generate as gen
from repa_probe.analysis.errors import AnalysisInputError
from repa_probe.analysis.generation.generate import Running, SamplerSettings, generate, sample_labels
from repa_probe.models import DiffusionTransformer
from repa_probe.sampling import SamplingError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = DiffusionTransformer(input_size=8, patch_size=4, in_channels=3, hidden_size=32, depth=1, num_heads=2,
                             num_classes=4, class_dropout_prob=0.1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.eval()


SETTINGS = SamplerSettings(num_samples=7, method="sde", steps=3, cfg_scale=1.5, labels="random", seed=3)


def _pngs(folder, n):
    return np.stack([np.asarray(Image.open(folder / f"{i:06d}.png")) for i in range(n)])


def _same(a, b):
    """Equal up to one uint8 level (float32 matmuls may round differently for other batch sizes)."""
    return a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_samples_do_not_depend_on_batch_size_or_process_count(model, tmp_path):
    a = generate(model, tmp_path / "a", SETTINGS, running=Running(batch_size=7, progress=False))
    generate(model, tmp_path / "b", SETTINGS, running=Running(batch_size=2, progress=False))
    for rank in (1, 0):  # two "processes" sharing the indices i = rank mod 2, rank 0 finalises
        generate(model, tmp_path / "c", SETTINGS, running=Running(batch_size=3, rank=rank, world=2, progress=False,
                                                                  finalize=rank == 0))
    ref = _pngs(tmp_path / "a", 7)
    assert ref.std() > 0 and len({ref[i].tobytes() for i in range(7)}) == 7
    for other in ("b", "c"):
        assert _same(_pngs(tmp_path / other, 7), ref)
    with np.load(a) as z:
        assert z.files == ["arr_0"] and z["arr_0"].dtype == np.uint8 and z["arr_0"].shape == (7, 8, 8, 3)
        assert np.array_equal(z["arr_0"], ref)
    assert (tmp_path / "a" / "grid.png").exists()
    assert json.loads((tmp_path / "a" / "sampling.json").read_text())["method"] == "sde"


def test_resume_samples_only_what_is_missing(model, tmp_path, monkeypatch):
    folder = tmp_path / "s"
    generate(model, folder, SETTINGS, running=Running(batch_size=4, progress=False))
    ref = _pngs(folder, 7)
    for i in (2, 5):
        (folder / f"{i:06d}.png").unlink()
    (folder / "samples.npz").unlink()
    seen = []
    real = gen.sample

    def counting(m, noise, labels, *args, **kw):
        seen.append(noise.shape[0])
        return real(m, noise, labels, *args, **kw)

    monkeypatch.setattr(gen, "sample", counting)
    generate(model, folder, SETTINGS, running=Running(batch_size=4, progress=False))
    assert seen == [2] and _same(_pngs(folder, 7), ref) and (folder / "samples.npz").exists()
    with pytest.raises(AnalysisInputError, match="other settings"):
        generate(model, folder, SamplerSettings(7, "sde", 4), running=Running(progress=False))


def test_labels():
    idx = torch.arange(1000)
    assert torch.equal(sample_labels(idx, 10, "balanced", 0), idx % 10)
    r = sample_labels(idx, 10, "random", 0)
    assert r.min() >= 0 and r.max() <= 9 and len(r.unique()) == 10
    assert torch.equal(sample_labels(idx[500:], 10, "random", 0), r[500:])       # per index, not per batch
    assert not torch.equal(sample_labels(idx, 10, "random", 1), r)


def test_bad_input_fails_before_writing(model, tmp_path):
    with pytest.raises(AnalysisInputError, match="--method"):
        generate(model, tmp_path / "x", SamplerSettings(4, "ddpm", 4), running=Running(progress=False))
    no_null = DiffusionTransformer(input_size=8, patch_size=4, in_channels=3, hidden_size=32, depth=1,
                                   num_heads=2, num_classes=4, class_dropout_prob=0.0)
    with pytest.raises(SamplingError, match="null class"):
        generate(no_null, tmp_path / "y", SamplerSettings(4, "euler", 2, cfg_scale=2.0),
                 running=Running(progress=False))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_missing_png_makes_no_npz(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "000000.png")
    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(folder / "000001.png")
    with pytest.raises(AnalysisInputError, match="missing"):
        gen.build_npz(folder, 3)
    with pytest.raises(AnalysisInputError, match="one size"):
        gen.build_npz(folder, 2)
    assert not (folder / "samples.npz").exists()


def test_latent_dit_model_through_a_vae(tmp_path):
    """A DiT (ddpm, per-sample per-step noise) on 4-channel latents decoded by a VAE: 8x larger RGB images,
    independent of the batch size."""
    from repa_probe.encoders.vae import load_vae

    torch.manual_seed(1)
    dit = DiffusionTransformer(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                               num_classes=3, class_dropout_prob=0.1, learn_sigma=True, time_convention="ddpm").eval()
    vae = load_vae("random:tiny")
    s = SamplerSettings(num_samples=3, method="ddpm", steps=4, cfg_scale=2.0, seed=1)
    generate(dit, tmp_path / "a", s, vae=vae, running=Running(batch_size=3, progress=False))
    generate(dit, tmp_path / "b", s, vae=vae, running=Running(batch_size=2, progress=False))
    a = _pngs(tmp_path / "a", 3)
    assert a.shape == (3, 32, 32, 3) and _same(a, _pngs(tmp_path / "b", 3))
