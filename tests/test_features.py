"""Tests for repa_probe.analysis.core.features: one-pass capture, seeded noise, model time per family, encoder cache."""
import types

import pytest
import torch
import torch.nn as nn

from repa_probe.data import ShapesDataset
from repa_probe.encoders.target import load_encoder
from repa_probe.analysis.errors import AnalysisInputError
from repa_probe.analysis.core.features import CaptureSettings, extract_features, module_device, prepare_inputs
from repa_probe.sampling.noise import seeded_noise
from repa_probe.models import DiffusionTransformer
from repa_probe.objectives import FlowMatching, GaussianDiffusion
from repa_probe.analysis.core.targets import encoder_cache_key, encoder_features
from repa_probe.timesteps import Step, TimeError

TINY = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=4, num_heads=2, num_classes=4,
            class_dropout_prob=0.1, encoder_depth=2, z_dims=(16,), projector_dim=24)


def _model(convention="repa", seed=0, **kw) -> DiffusionTransformer:
    """A tiny model whose blocks are not the identity (adaLN-Zero init is: randomise everything)."""
    cfg = dict(TINY, time_convention=convention, learn_sigma=convention == "ddpm", **kw)
    torch.manual_seed(seed)
    model = DiffusionTransformer(**cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


@pytest.fixture(scope="module")
def shapes():
    return ShapesDataset(12, resolution=8, num_classes=4, seed=3, split="val")


def _manual_hidden(model, x_t, t, y, layer):
    """Block ``layer`` (1-based) output by running the blocks by hand: (B, T, D)."""
    h = model.x_embedder(x_t) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y)
    for block in model.blocks[:layer]:
        h = block(h, c)
    return h


def test_one_pass_capture_equals_truncated_forwards(shapes):
    model, obj = _model(), FlowMatching()
    fs = extract_features(model, obj, shapes, [0.3, 0.8], layers="all",
                          settings=CaptureSettings(batch_size=5, seed=7, progress=False))
    tokens = extract_features(model, obj, shapes, [0.3], layers=[1, 3], pool="tokens",
                              settings=CaptureSettings(batch_size=12, seed=7, progress=False))
    proj = extract_features(model, obj, shapes, [0.3], pool="projector",
                            settings=CaptureSettings(batch_size=12, seed=7, progress=False))
    x0 = torch.stack([shapes[i]["image"] for i in range(len(shapes))]).float() / 127.5 - 1.0
    idx = torch.arange(len(shapes))
    y = torch.full((len(shapes),), 4)  # the null class
    assert fs.layers == [1, 2, 3, 4] and fs.timesteps == [0.3, 0.8]
    with torch.no_grad():
        for t in (0.3, 0.8):
            tt = torch.full((len(shapes),), t)
            x_t = obj.add_noise(x0, tt, seeded_noise(7, idx, x0.shape[1:]))
            full = model(x_t, tt, y, return_hidden=True)[2]
            for layer in range(1, 5):
                manual = _manual_hidden(model, x_t, tt, y, layer)
                torch.testing.assert_close(full[layer - 1], manual)
                torch.testing.assert_close(fs.get(layer, t), manual.mean(1), rtol=1e-4, atol=1e-5)
                if t == 0.3 and layer in (1, 3):
                    torch.testing.assert_close(tokens.get(layer, t), manual, rtol=1e-4, atol=1e-5)
            if t == 0.3:
                z = model.project(_manual_hidden(model, x_t, tt, y, 2))[0].mean(1)
                torch.testing.assert_close(proj.get(2, 0.3), z, rtol=1e-4, atol=1e-5)
    assert fs.get(1, 0.3).shape == (12, 32) and tokens.get(3, 0.3).shape == (12, 16, 32)
    assert not torch.allclose(fs.get(1, 0.3), fs.get(4, 0.3))  # the blocks really transform
    with pytest.raises(AnalysisInputError, match="no features for layer 2"):
        tokens.get(2, 0.3)


def test_deeper_blocks_are_not_run():
    model, calls = _model(), []
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda mod, inp, out, i=i: calls.append(i))
    extract_features(model, FlowMatching(), ShapesDataset(4, resolution=8, seed=0), [0.5], layers=[2],
                     settings=CaptureSettings(batch_size=4, progress=False))
    assert calls == [0, 1]


def test_same_noise_for_every_checkpoint_batch_and_call(shapes):
    seen = []

    class Recording(FlowMatching):
        def add_noise(self, x0, t, noise):
            seen.append(noise.clone())
            return super().add_noise(x0, t, noise)

    obj = Recording()
    for seed_model, bs in ((0, 12), (5, 12), (0, 5)):
        extract_features(_model(seed=seed_model), obj, shapes, [0.5],
                         settings=CaptureSettings(batch_size=bs, seed=1, progress=False))
    assert torch.equal(seen[0], seen[1])                            # two "checkpoints", identical noise
    torch.testing.assert_close(torch.cat(seen[2:]), seen[0], rtol=0, atol=0)  # batch composition irrelevant
    a = extract_features(_model(), FlowMatching(), shapes, [0.5],
                         settings=CaptureSettings(batch_size=12, seed=1, progress=False))
    b = extract_features(_model(), FlowMatching(), shapes, [0.5],
                         settings=CaptureSettings(batch_size=4, seed=1, progress=False))
    c = extract_features(_model(), FlowMatching(), shapes, [0.5],
                         settings=CaptureSettings(batch_size=12, seed=2, progress=False))
    torch.testing.assert_close(a.get(3, 0.5), b.get(3, 0.5), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(a.get(3, 0.5), c.get(3, 0.5), atol=1e-3)  # another seed, other noise


def test_seeded_noise_is_standard_normal_and_keyed_by_seed_and_index():
    z = seeded_noise(0, torch.arange(64), (3, 16, 16))
    assert z.shape == (64, 3, 16, 16) and z.dtype == torch.float32
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01
    off = torch.corrcoef(z.reshape(64, -1))[~torch.eye(64, dtype=torch.bool)]
    assert abs(off.pow(2).mean().sqrt().item() * 768 ** 0.5 - 1) < 0.15  # RMS corr of independent samples
    torch.testing.assert_close(seeded_noise(0, torch.tensor([40, 3]), (3, 16, 16)), z[[40, 3]], rtol=0, atol=0)
    other = seeded_noise(1, torch.arange(64), (3, 16, 16))
    assert torch.corrcoef(torch.stack([z.flatten(), other.flatten()]))[0, 1].abs() < 0.02


def test_model_time_per_convention_and_ddpm_steps(shapes):
    """Flow models get t, official SiT 1 - t, DiT the DDPM step (fractions of the schedule, or step:N)."""
    ddpm = GaussianDiffusion()
    got = {}
    for family, obj, ts in (("repa", FlowMatching(), [0.25]), ("sit", FlowMatching(), [0.25]),
                            ("ddpm", ddpm, [1.0, "step:250"])):
        model = _model(family)
        inner = model.forward_features

        def spy(x, t, y, layers=None, inner=inner, family=family):
            got.setdefault(family, []).append((x.clone(), t.clone()))
            return inner(x, t, y, layers=layers)

        model.forward_features = spy
        extract_features(model, obj, shapes, ts, layers=[1],
                         settings=CaptureSettings(batch_size=12, seed=0, progress=False))
    x0 = torch.stack([shapes[i]["image"] for i in range(len(shapes))]).float() / 127.5 - 1.0
    noise = seeded_noise(0, torch.arange(12), (3, 8, 8))
    assert torch.allclose(got["repa"][0][1], torch.tensor(0.25)) and torch.allclose(got["sit"][0][1], torch.tensor(0.75))
    torch.testing.assert_close(got["sit"][0][0], got["repa"][0][0])  # same x_t, only the time label flips
    torch.testing.assert_close(got["repa"][0][0], 0.75 * x0 + 0.25 * noise)
    (x999, t999), (x250, t250) = got["ddpm"]
    assert t999.dtype == torch.int64 and set(t999.tolist()) == {999} and set(t250.tolist()) == {250}
    abar = ddpm.tables["alphas_cumprod"][250].item()
    torch.testing.assert_close(x250, abar ** 0.5 * x0 + (1 - abar) ** 0.5 * noise, rtol=1e-5, atol=1e-5)
    with pytest.raises(TimeError, match="does not fit objective"):
        extract_features(_model("ddpm"), FlowMatching(), shapes, [0.5], settings=CaptureSettings(progress=False))
    with pytest.raises(TimeError, match=r"\[0, 1\]"):
        extract_features(_model(), FlowMatching(), shapes, [1.5], settings=CaptureSettings(progress=False))
    with pytest.raises(TimeError, match="ambiguous"):
        extract_features(_model("ddpm"), ddpm, shapes, [250], settings=CaptureSettings(progress=False))
    fs = extract_features(_model("ddpm"), ddpm, shapes, [Step(7)], layers=[1], settings=CaptureSettings(progress=False))
    assert fs.get(1, "step:7").shape == (12, 32) and fs.model_times == [7]


def test_bad_layers_pool_labels_and_device(shapes):
    model, obj = _model(), FlowMatching()
    with pytest.raises(AnalysisInputError, match=r"layers \[5\] are outside 1..4"):
        extract_features(model, obj, shapes, [0.5], layers=[1, 5], settings=CaptureSettings(progress=False))
    with pytest.raises(AnalysisInputError, match="outside"):
        extract_features(model, obj, shapes, [0.5], layers=[-1], settings=CaptureSettings(progress=False))
    with pytest.raises(AnalysisInputError, match="reads block 2 only"):
        extract_features(model, obj, shapes, [0.5], layers=[3], pool="projector",
                         settings=CaptureSettings(progress=False))
    with pytest.raises(AnalysisInputError, match="pool must be"):
        extract_features(model, obj, shapes, [0.5], pool="max", settings=CaptureSettings(progress=False))
    with pytest.raises(AnalysisInputError, match="no null class"):
        extract_features(_model(class_dropout_prob=0.0), obj, shapes, [0.5], settings=CaptureSettings(progress=False))
    with pytest.raises(AnalysisInputError, match="move the model first"):
        extract_features(model, obj, shapes, [0.5], settings=CaptureSettings(device="meta", progress=False))
    true = extract_features(model, obj, shapes, [0.5],
                            settings=CaptureSettings(labels="true", batch_size=12, progress=False))
    null = extract_features(model, obj, shapes, [0.5],
                            settings=CaptureSettings(labels="null", batch_size=12, progress=False))
    assert not torch.allclose(true.get(1, 0.5), null.get(1, 0.5))  # the class embedding modulates the blocks
    assert not true.get(1, 0.5).requires_grad  # extracted without autograd
    assert torch.equal(true.labels, torch.arange(12) % 4)



def test_module_device_reads_plain_cuda_as_the_current_device(monkeypatch):
    """``--device cuda`` must match a model on cuda:0 (it once failed: 'the model is on cuda:0 but device=cuda')."""

    class OnCuda1(nn.Module):  # parameters() reports cuda:1 without needing a GPU
        def parameters(self, recurse=True):
            return iter([types.SimpleNamespace(device=torch.device("cuda", 1))])

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert module_device(OnCuda1(), "cuda", "model") == torch.device("cuda", 1)
    assert module_device(OnCuda1(), "cuda:1", "model") == torch.device("cuda", 1)
    assert module_device(OnCuda1(), None, "model") == torch.device("cuda", 1)
    with pytest.raises(AnalysisInputError, match="the model is on cuda:1 but device=cuda:0"):
        module_device(OnCuda1(), "cuda:0", "model")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    with pytest.raises(AnalysisInputError, match="the encoder is on cuda:1 but device=cuda: move the encoder first"):
        module_device(OnCuda1(), "cuda", "encoder")
    assert module_device(nn.Linear(2, 2), "cpu", "model") == torch.device("cpu")

class _CountingEncoder(nn.Module):
    """Wraps a TargetEncoder and counts ``features`` calls."""

    def __init__(self, enc):
        super().__init__()
        self.enc, self.calls = enc, 0
        self.cache_key = enc.cache_key

    def features(self, images, kind):
        self.calls += 1
        return self.enc.features(images, kind)


def test_encoder_features_cached_on_disk(tmp_path, shapes):
    torch.manual_seed(0)
    enc = _CountingEncoder(load_encoder("tiny_vit", pretrained=False, resolution=8, input_size=8))
    first = encoder_features(enc, shapes, "cls", cache_dir=tmp_path, batch_size=5, progress=False)
    assert enc.calls == 3 and first.shape == (12, 64)
    again = encoder_features(enc, shapes, "cls", cache_dir=tmp_path, batch_size=5, progress=False)
    assert enc.calls == 3 and torch.equal(again, first)                      # cache hit: encoder not run
    torch.testing.assert_close(first, enc.enc.cls(torch.stack([shapes[i]["image"] for i in range(12)])))
    mean = encoder_features(enc, shapes, "mean_patch", cache_dir=tmp_path, batch_size=12, progress=False)
    assert enc.calls == 4 and mean.shape == (12, 64)                        # another kind: another key
    smaller = ShapesDataset(8, resolution=8, num_classes=4, seed=3, split="val")
    assert encoder_cache_key(enc, smaller, "cls") != encoder_cache_key(enc, shapes, "cls")
    encoder_features(enc, smaller, "cls", cache_dir=tmp_path, batch_size=8, progress=False)
    assert enc.calls == 5
    for f in tmp_path.glob("cls-*.pt"):
        f.write_bytes(b"garbage")                                           # a broken cache is recomputed
    torch.testing.assert_close(encoder_features(enc, shapes, "cls", cache_dir=tmp_path, batch_size=12,
                                                progress=False), first)
    assert enc.calls == 6


def test_prepare_inputs_pixels_and_latents(shapes):
    pix = prepare_inputs(shapes, None, batch_size=5, progress=False)
    assert pix.data.dtype == torch.uint8 and pix.x0(0, 2, "cpu").abs().max() <= 1.0

    class FakeVAE:
        scale, bias, device = 0.5, 0.1, torch.device("cpu")

        def encode_moments(self, images):
            mean = images.float()[:, :2, ::2, ::2] / 255.0
            return torch.cat([mean, torch.ones_like(mean)], dim=1)

        def normalize(self, raw):  # LatentVAE's: raw * scale + bias
            return raw * self.scale + self.bias

    lat = prepare_inputs(shapes, FakeVAE(), batch_size=5, progress=False)
    expected = torch.stack([shapes[i]["image"] for i in range(12)]).float()[:, :2, ::2, ::2] / 255.0 * 0.5 + 0.1
    torch.testing.assert_close(lat.x0(0, 12, "cpu"), expected)  # posterior mean, scaled, no sampling noise


def test_one_labels_rule_for_null_and_true_labels():
    from repa_probe.analysis.core.features import check_labels_fit, model_labels

    check_labels_fit(10, True, "null", None)
    check_labels_fit(10, False, "true", 10)
    with pytest.raises(AnalysisInputError, match="no null class"):
        check_labels_fit(10, False, "null", 10)
    with pytest.raises(AnalysisInputError, match="the dataset has 12 classes but the model 10"):
        check_labels_fit(10, True, "true", 12)
    with pytest.raises(AnalysisInputError, match="the dataset has None classes"):
        check_labels_fit(10, True, "true", None)
    model = DiffusionTransformer(input_size=8, patch_size=4, in_channels=3, hidden_size=32, depth=1, num_heads=2,
                                 num_classes=3)
    assert model_labels(model, torch.tensor([0, 2]), "null").tolist() == [3, 3]
    assert model_labels(model, torch.tensor([0, 2]), "true").tolist() == [0, 2]
    with pytest.raises(AnalysisInputError, match="the dataset has 4 classes but the model 3"):
        model_labels(model, torch.tensor([0, 3]), "true")
