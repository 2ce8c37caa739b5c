"""Fréchet distance closed forms, torch-fidelity plumbing with a random extractor, references and bad input."""
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from repa_probe.analysis.generation import fid
from repa_probe.analysis.errors import AnalysisInputError, MetricInputError
from repa_probe.analysis.generation.fid import ImageArray, Reference, evaluate, read_reference, register_encoder
from repa_probe.analysis.metrics.frechet import frechet_distance, statistics
from repa_probe.encoders.target import load_encoder

METHODS = ("eigvals", "sqrtm")
pytestmark = pytest.mark.usefixtures("one_thread")


def _psd(d, rank, seed):
    a = np.random.default_rng(seed).normal(size=(d, rank))
    return a @ a.T / rank


@pytest.mark.parametrize("method", METHODS)
def test_closed_forms(method):
    rng = np.random.default_rng(0)
    mu, s = rng.normal(size=8), _psd(8, 16, 1)
    mu2 = mu + rng.normal(size=8)
    assert abs(frechet_distance(mu, s, mu, s, method)) <= 1e-9
    assert frechet_distance(mu, s, mu2, s, method) == pytest.approx(np.sum((mu - mu2) ** 2), rel=1e-9)
    assert frechet_distance(mu, s, mu, 9 * s, method) == pytest.approx(4 * np.trace(s), rel=1e-9)  # (1-c)^2 tr
    a, b = rng.uniform(0.1, 2, 8), rng.uniform(0.1, 2, 8)
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2) + np.sum((mu - mu2) ** 2)
    assert frechet_distance(mu, np.diag(a), mu2, np.diag(b), method) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]], method) == pytest.approx(4 + 1, rel=1e-12)
    s2 = _psd(8, 16, 2)
    assert frechet_distance(mu, s, mu2, s2, method) == pytest.approx(frechet_distance(mu2, s2, mu, s, method),
                                                                     rel=1e-9)


@pytest.mark.parametrize("rank", [300, 100])  # full rank and rank-deficient
def test_eigvals_and_sqrtm_agree(rank):
    s1, s2 = _psd(256, rank, 3), _psd(256, rank, 4)
    mu = np.zeros(256)
    a, b = frechet_distance(mu, s1, mu, s2, "eigvals"), frechet_distance(mu, s1, mu, s2, "sqrtm")
    assert a == pytest.approx(b, rel=1e-7)


def test_statistics_warn_when_rank_deficient(caplog):
    with caplog.at_level(logging.WARNING, logger="repa_probe"):
        mu, sigma = statistics(np.random.default_rng(0).normal(size=(10, 32)))
    assert "only 10 samples for 32-dimensional" in caplog.text
    assert mu.dtype == np.float64 and sigma.shape == (32, 32)
    with pytest.raises(MetricInputError, match="do not match"):
        frechet_distance(mu, sigma, mu[:3], sigma[:3, :3])


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, size=(40, 32, 32, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-60, 60, size=a.shape), 0, 255).astype(np.uint8)
    return a, b


@pytest.fixture(scope="module")
def space():
    torch.manual_seed(0)
    return register_encoder(load_encoder("tiny_vit", pretrained=False, resolution=32), "fd_tiny_vit")


def test_agrees_with_torch_fidelity(images, space):
    import torch_fidelity

    a, b = images
    ours = evaluate(a, Reference("b", b), [space])
    assert set(ours) == {"fd_tiny_vit"} and ours["fd_tiny_vit"] > 0
    theirs = torch_fidelity.calculate_metrics(input1=ImageArray(a), input2=ImageArray(b), fid=True, cuda=False,
                                              feature_extractor=space.extractor, cache=False, verbose=False,
                                              save_cpu_ram=True)["frechet_inception_distance"]
    assert ours["fd_tiny_vit"] == pytest.approx(theirs, rel=1e-6)
    same = torch_fidelity.calculate_metrics(input1=ImageArray(a), input2=ImageArray(a), fid=True, cuda=False,
                                            feature_extractor=space.extractor, cache=False, verbose=False,
                                            save_cpu_ram=True)["frechet_inception_distance"]
    assert abs(same) < 1e-6 and abs(evaluate(a, Reference("a", a), [space])["fd_tiny_vit"]) < 1e-6


def test_reference_stats_cache_roundtrip(images, space, tmp_path):
    a, b = images
    ref = Reference("b", b)
    value = evaluate(a, ref, [space])["fd_tiny_vit"]
    fid.save_reference_stats(ref, tmp_path / "reference_stats.pt")
    cached = read_reference(tmp_path / "reference_stats.pt")
    assert cached.images is None and evaluate(a, cached, [space])["fd_tiny_vit"] == pytest.approx(value, rel=1e-12)


def test_adm_reference_and_bad_references(tmp_path):
    mu, sigma = np.zeros(2048, np.float64), np.eye(2048)
    np.savez(tmp_path / "adm.npz", mu=mu, sigma=sigma)
    ref = read_reference(tmp_path / "adm.npz")
    assert ref.images is None and ref.stats["fid_inception"]["sigma"].shape == (2048, 2048)
    np.savez(tmp_path / "mu_only.npz", mu=mu)
    with pytest.raises(AnalysisInputError, match="not sigma"):
        read_reference(tmp_path / "mu_only.npz")
    np.savez(tmp_path / "none.npz", x=mu)
    with pytest.raises(AnalysisInputError, match="neither mu/sigma"):
        read_reference(tmp_path / "none.npz")
    np.savez(tmp_path / "chw.npz", arr_0=np.zeros((2, 3, 8, 8), np.uint8))
    with pytest.raises(AnalysisInputError, match=r"uint8 of shape \(N, H, W, 3\)"):
        read_reference(tmp_path / "chw.npz")
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "a.png")
    Image.fromarray(np.zeros((9, 8, 3), np.uint8)).save(folder / "b.png")
    with pytest.raises(AnalysisInputError, match="different sizes"):
        fid.load_images(folder)


def test_inception_needs_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(AnalysisInputError, match="--inception-weights"):
        fid.inception_space(None)
    with pytest.raises(AnalysisInputError, match="--inception-weights"):
        fid.inception_space(tmp_path / "nope.pth")


def test_isc_splits_follow_adm():
    """ADM's evaluator: one Inception Score split per 5000 samples (ceil), so 10 at N = 50 000."""
    assert [fid.isc_splits(n) for n in (2, 4999, 5000, 5001, 50000)] == [1, 1, 1, 2, 10]


def test_reference_goes_through_the_extractor_once(images, space, monkeypatch):
    """KID / precision-recall and FD of several checkpoints: the reference images are extracted once and the
    extractor is built once (its weights loaded once), whatever the number of evaluations."""
    import torch_fidelity.utils as tfu

    a, b = images
    inception_like = fid.FeatureSpace("fid_inception", fid.INCEPTION, "cls")  # KID / PRC take Inception spaces
    inception_like._built[False] = space.extractor_on("cpu")
    built, extracted = [], []
    real_create, real_extract = tfu.create_feature_extractor, tfu.get_featuresdict_from_dataset
    monkeypatch.setattr(tfu, "create_feature_extractor", lambda *x, **k: built.append(1) or real_create(*x, **k))
    monkeypatch.setattr(tfu, "get_featuresdict_from_dataset",
                        lambda ds, *x, **k: extracted.append(len(ds)) or real_extract(ds, *x, **k))
    ref = Reference("b", b[:30])
    for _ in range(2):  # two checkpoints
        out = evaluate(a, ref, [inception_like], extras=fid.Extras(kid=True, prc=True))
        assert {"fid_inception", "kid_inception", "precision_inception", "recall_inception"} <= set(out)
    assert extracted == [40, 30, 40] and built == []
    fresh = fid.FeatureSpace("fd_x", space.extractor, "cls")
    evaluate(a, Reference("b", b), [fresh])
    evaluate(a, Reference("b", b), [fresh])
    assert len(built) == 1
