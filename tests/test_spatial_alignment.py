"""`analysis.alignment --metric lds,...`: spatial metrics per block × timestep and the target reference rows."""
import csv
import json
import logging
from pathlib import Path

import pytest
import torch

from analysis.alignment import main
from repa_probe.analysis.core.features import extract_features, prepare_inputs
from repa_probe.analysis.core.inputs import build_analysis_dataset, load_checkpoints, resolve_encoder, resolve_source
from repa_probe.analysis.errors import OptionsError
from repa_probe.analysis.core.options import AlignmentOptions
from repa_probe.analysis.metrics.spatial import lds, srss
from repa_probe.analysis.alignment.spatial import summarise, token_masks
from repa_probe.analysis.core.targets import encoder_features


@pytest.fixture
def ckpt(tiny_run):
    """The step-2 checkpoint of the shared tiny run."""
    return tiny_run / "checkpoints" / "0000002.pt"


def _rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_cli_lds_matches_the_metric_on_the_tokens(ckpt, tmp_path):
    out = tmp_path / "out"
    assert main(["--ckpt", str(ckpt), "--out", str(out), "--metric", "lds", "--layers", "1,3", "--timesteps", "0,1",
                 "--num-samples", "12", "--no-cache", "-q"]) == 0
    rows = _rows(out / "alignment.csv")
    assert {r["metric"] for r in rows} == {"lds"}
    assert sorted((r["layer"], r["timestep"]) for r in rows) == [("1", "0.0"), ("1", "1.0"), ("3", "0.0"),
                                                                  ("3", "1.0"), ("target", "")]
    # recompute independently: block tokens of the same inputs, and the encoder's patch tokens
    opts = AlignmentOptions(num_samples=12, progress=False)
    (entry,) = load_checkpoints([ckpt], opts)
    source = resolve_source([entry], opts, need_encoder=True)
    dataset, _ = build_analysis_dataset(source, opts.split, opts.num_samples)
    encoder = resolve_encoder([entry], opts, source.resolution)
    fs = extract_features(entry.model, entry.objective, prepare_inputs(dataset, progress=False), [0.0, 1.0],
                          [1, 3], pool="tokens", progress=False)
    got = {(r["layer"], r["timestep"]): float(r["value"]) for r in rows}
    for layer in (1, 3):
        for t in (0.0, 1.0):
            assert got[(str(layer), str(t))] == pytest.approx(lds(fs.get(layer, t)).mean().item(), abs=1e-5)
    target = lds(encoder_features(encoder, dataset, "patch", progress=False)).mean().item()
    assert got[("target", "")] == pytest.approx(target, abs=1e-5)
    assert got[("1", "0.0")] != pytest.approx(got[("1", "1.0")], abs=1e-4)        # timestep matters
    summary = json.loads((out / "summary.json").read_text())
    assert summary["spatial"]["metrics"] == ["lds"] and all(b["best_layer"] != "target" for b in summary["best"])


@pytest.mark.slow
def test_srss_uses_the_shapes_masks_and_is_skipped_without_masks(ckpt, tmp_path, caplog):
    out = tmp_path / "out"
    assert main(["--ckpt", str(ckpt), "--out", str(out), "--metric", "srss,rmsc", "--layers", "2", "--timesteps", "0.5",
                 "--num-samples", "16", "--no-cache", "-q"]) == 0
    srss_rows = [r for r in _rows(out / "alignment.csv") if r["metric"] == "srss"]
    assert len(srss_rows) == 2 and all(0 < int(r["n"]) <= 16 for r in srss_rows)
    with caplog.at_level(logging.WARNING, logger="repa_probe"):
        assert main(["--ckpt", str(ckpt), "--out", str(tmp_path / "d"), "--data", "digits", "--metric", "srss,lds",
                     "--layers", "2", "--timesteps", "0.5", "--num-samples", "16", "--no-cache", "-q"]) == 0
    assert "srss skipped" in caplog.text
    assert {r["metric"] for r in _rows(tmp_path / "d" / "alignment.csv")} == {"lds"}


def test_token_masks_pool_and_filter():
    class Masks(torch.utils.data.Dataset):
        def __init__(self):
            m = torch.zeros(3, 8, 8, dtype=torch.int64)
            m[0, :4, :] = 2                     # top half foreground
            m[1, 0, 0] = 1                      # one pixel: too little foreground
            m[2, :, :4] = 255                   # VOC void border only: background
            self.m = m

        def __len__(self):
            return 3

        def __getitem__(self, i):
            return {"image": torch.zeros(3, 8, 8, dtype=torch.uint8), "label": 0, "mask": self.m[i]}

    masks = token_masks(Masks(), (4, 4))
    assert masks.shape == (3, 16)
    assert masks[0].reshape(4, 4)[:2].all() and not masks[0].reshape(4, 4)[2:].any()
    assert not masks[1].any() and not masks[2].any()
    assert srss(torch.randn(3, 16, 4), masks=masks, d_neg=3)[1:].isnan().all()


def test_summarise_and_metric_names():
    v = torch.tensor([1.0, float("nan"), 3.0, 2.0])
    s = summarise(v, bootstrap=200, seed=0)
    assert s["value"] == pytest.approx(2.0) and s["n"] == 3 and 0.9 <= s["ci_low"] < 2.0 < s["ci_high"] <= 3.1
    assert s["replicates"].shape == (200,) and s["replicate_scale"] == 1.0
    assert summarise(v) == dict(value=pytest.approx(2.0), ci_low=None, ci_high=None, n=3)
    assert AlignmentOptions(metric="cknna, lds,rmsc").metric == ["cknna", "lds", "rmsc"]
    with pytest.raises(OptionsError, match="unknown metric.*ldz"):
        AlignmentOptions(metric="lds,ldz")
