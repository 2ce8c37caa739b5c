"""Spatial-structure metrics: hand-computable cases, properties, iREPA golden values, bad input, chunking."""
from pathlib import Path

import pytest
import torch

from repa_probe.analysis import metrics as M
from repa_probe.analysis.errors import MetricInputError
from repa_probe.analysis.metrics.spatial import cds, lds, pair_counts, rmsc, spatial_metrics, srss
from repa_probe.errors import ReproError

GOLDEN = Path(__file__).parent / "data" / "golden" / "spatial.pt"
KWARGS = {"far_dist": "far", "dmax": "dmax", "sqrt": "sqrt", "d_pos": "d_pos", "d_neg": "d_neg",
          "d_pos_min": "d_pos_min"}  # iREPA keyword -> ours


def two_halves(extra: float | None = None) -> torch.Tensor:
    """Columns 0-7 = e1, columns 8-15 = e2 on a 16x16 grid (optionally a constant third channel)."""
    x = torch.zeros(1, 16, 16, 3)
    x[0, :, :8, 0], x[0, :, 8:, 1] = 1.0, 1.0
    if extra is not None:
        x[..., 2] = extra
    return x.reshape(1, 256, 3)


def rho_tokens(rho: float) -> torch.Tensor:
    """Tokens whose cosine is exactly rho ** Manhattan distance (rows of a square root of A ⊗ A)."""
    i = torch.arange(16, dtype=torch.float64)
    a = rho ** (i[:, None] - i[None, :]).abs()
    vals, vecs = torch.linalg.eigh(torch.kron(a, a))
    return (vecs * vals.clamp_min(0).sqrt()).float()[None]


def test_pair_counts_match_the_facts_table():
    n = pair_counts(16, 16)
    assert n[1:].sum() == 65280 and n[6:].sum() == 53300 and n[8:].sum() == 45064 and n[1:8].sum() == 20216
    assert n[[1, 10, 30]].tolist() == [960, 4500, 4]


def test_constant_map_is_zero_everywhere():
    x = torch.randn(1, 1, 8).expand(1, 256, 8)
    mask = torch.zeros(1, 256, dtype=torch.bool)
    mask[0, :100] = True
    out = spatial_metrics(x, masks=mask)
    for name in ("lds", "cds", "srss", "rmsc"):
        assert out[name].abs().item() < 1e-5, name
    assert lds(x, variant="paper").abs().item() < 1e-5


def test_orthonormal_tokens():
    x = torch.eye(256)[None]
    assert lds(x).abs().item() < 1e-6 and cds(x).abs().item() < 1e-6
    assert rmsc(x).item() == pytest.approx((1 - 1 / 256) ** 0.5, abs=1e-6)


def test_two_halves():
    x = two_halves()
    assert lds(x).item() == pytest.approx(0.551057, abs=1e-5)
    assert lds(x, variant="paper").item() == pytest.approx(0.442238, abs=1e-5)
    assert lds(x, near=1, far=6).item() == pytest.approx(464 / 480 - 0.415610, abs=1e-5)
    assert cds(x).item() == pytest.approx(0.049889, abs=1e-5)
    assert rmsc(x).item() == pytest.approx(2 ** -0.5, abs=1e-6)
    left = x[..., 0] > 0
    assert srss(x, masks=left).item() == pytest.approx(1.0, abs=1e-6)
    # an offset channel hides the structure (facts case 5, raw)
    y = two_halves(extra=3.0)
    assert lds(y).item() == pytest.approx(0.055106, abs=1e-5) and rmsc(y).item() == pytest.approx(0.223607, abs=1e-5)


@pytest.mark.parametrize("rho, want", [(0.5, (0.497561, 0.080626, 0.060035, 0.985119)),
                                       (0.8, (0.703611, 0.304585, 0.088197, 0.911794)),
                                       (0.9, (0.596307, 0.349667, 0.066709, 0.788788))])
def test_rho_decay_closed_forms(rho, want):
    x = rho_tokens(rho)
    got = (lds(x).item(), lds(x, variant="paper").item(), cds(x).item(), rmsc(x).item())
    assert got == pytest.approx(want, abs=1e-5)


def test_properties():
    g = torch.Generator().manual_seed(0)
    coarse = torch.randn(3, 8, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(coarse, size=(16, 16), mode="bilinear").flatten(2).transpose(1, 2)
    x = x + 0.3 * torch.randn(x.shape, generator=g)
    masks = torch.zeros(3, 16, 16, dtype=torch.bool)
    masks[:, 2:9, 3:10] = True
    masks = masks.flatten(1)
    base = spatial_metrics(x, masks=masks)
    rot = torch.linalg.qr(torch.randn(8, 8, generator=g))[0]
    scale = torch.rand(3, 256, 1, generator=g) + 0.1
    for name, v in spatial_metrics(x @ rot * scale, masks=masks).items():
        torch.testing.assert_close(v, base[name], atol=1e-5, rtol=0)
    perm = torch.randperm(256, generator=g)
    shuffled = spatial_metrics(x[:, perm], masks=masks[:, perm])
    torch.testing.assert_close(shuffled["rmsc"], base["rmsc"], atol=1e-6, rtol=0)
    for name in ("lds", "cds", "srss"):
        assert (shuffled[name] - base[name]).abs().min() > 1e-3, name
    xt = x.reshape(3, 16, 16, 8).transpose(1, 2).reshape(3, 256, 8)
    torch.testing.assert_close(lds(xt), base["lds"], atol=1e-5, rtol=0)
    torch.testing.assert_close(cds(xt), base["cds"], atol=1e-5, rtol=0)
    u = torch.nn.functional.normalize(x, dim=-1)
    torch.testing.assert_close(rmsc(x, sqrt=False), 1 - (u @ u.transpose(1, 2)).mean((1, 2)), atol=1e-5, rtol=0)


def test_chunking_does_not_change_values():
    x = torch.randn(7, 64, 5)
    m = torch.rand(7, 64) > 0.5
    whole = spatial_metrics(x, masks=m)
    parts = spatial_metrics(x, masks=m, chunk_size=2)
    for name in whole:
        torch.testing.assert_close(parts[name], whole[name], atol=1e-6, rtol=0, equal_nan=True)


def _golden_cases():
    assert GOLDEN.is_file(), f"{GOLDEN} is committed: restore it, or rebuild it with python -m tools.golden"
    return torch.load(GOLDEN, weights_only=True)["cases"]


def test_agrees_with_irepa_golden_values():
    checked = 0
    for case in _golden_cases():
        for call in case["calls"]:
            kwargs = {KWARGS[k]: v for k, v in call["kwargs"].items()}
            if call["metric"] == "srss":
                kwargs["masks"] = case["masks"]
            got = spatial_metrics(case["tokens"], [call["metric"]], (case["H"], case["W"]), **kwargs)[call["metric"]]
            want = call["value"]
            assert got.shape == want.shape
            assert torch.equal(got.isnan(), want.isnan()), (case["name"], call)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0, equal_nan=True, msg=f"{case['name']} {call}")
            checked += 1
    assert checked >= 25


def test_golden_covers_the_edge_cases():
    cases = {c["name"]: c for c in _golden_cases()}
    assert {"zero_tokens", "nonsquare_8x12", "grid_3x3", "srss_edge_masks"} <= set(cases)
    edge = cases["srss_edge_masks"]["calls"][0]["value"]
    assert edge[:4].isnan().all() and not edge[4].isnan()


def test_bad_input_is_a_one_line_repro_error():
    x = torch.randn(2, 16, 4)
    with pytest.raises(MetricInputError, match="no token pairs at distance >= 6"):
        lds(torch.randn(1, 9, 4))                            # 3x3: largest distance 4
    with pytest.raises(MetricInputError, match="d_neg"):
        srss(torch.randn(1, 9, 4), masks=torch.ones(1, 9))
    with pytest.raises(MetricInputError, match="not a square"):
        lds(torch.randn(1, 12, 4))
    with pytest.raises(MetricInputError, match="does not hold"):
        lds(x, grid=(3, 4))
    with pytest.raises(MetricInputError, match="unknown spatial metric"):
        spatial_metrics(x, ["lds", "foo"])
    with pytest.raises(MetricInputError, match="masks"):
        srss(x, masks=None)
    with pytest.raises(MetricInputError, match="masks must be"):
        srss(x, masks=torch.ones(2, 15))
    with pytest.raises(MetricInputError, match="slope"):
        cds(torch.randn(1, 2, 4), grid=(1, 2))
    with pytest.raises(MetricInputError, match="far"):
        lds(x, far=0)
    with pytest.raises(MetricInputError, match="variant"):
        lds(x, variant="pape")
    with pytest.raises(MetricInputError, match="floating"):
        lds(torch.ones(1, 16, 4, dtype=torch.int64))
    assert issubclass(MetricInputError, ReproError)


def test_reexported_from_metrics():
    assert M.lds is lds and M.cds is cds and M.srss is srss and M.rmsc is rmsc
