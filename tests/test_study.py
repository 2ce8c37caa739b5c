"""The study: train tiny runs with and without REPA, sweep the analyses, write report.md and report.html."""
import json
from pathlib import Path

import pytest

from repa_probe.sweeps.study import load_study_config, run_study
from repa_probe.training.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_study_configs_load():
    tiny = load_study_config(str(ROOT / "configs/study_tiny.yaml"))
    assert set(tiny.train.runs) == {"repa", "irepa", "baseline"} and tiny.launcher.kind == "local"
    assert set(tiny.analyses) == {"alignment", "probe", "fid"} and len(tiny.correlations) == 2
    big = load_study_config(str(ROOT / "configs/study_imagenet.yaml"))
    assert big.launcher.kind == "slurm" and len(big.train.runs) == 4


def test_bad_run_override_names_the_run():
    with pytest.raises(ConfigError, match=r"train.runs.repa: unknown config key 'repa.nope'"):
        load_study_config(str(ROOT / "configs/study_tiny.yaml"), ["train.runs.repa=[repa.nope=1]"])


@pytest.mark.slow
def test_tiny_study_writes_its_report(tmp_path):
    cfg = load_study_config(str(ROOT / "configs/study_tiny.yaml"), [
        f"study.out_dir={tmp_path}", "launcher.poll_s=0.3", "launcher.max_parallel=2",
        "train.overrides=[train.steps=8,train.ckpt_every=4,train.keep_last=2,train.batch_size=8,model.depth=2,"
        "model.hidden_size=64,data.num_samples=256,train.tensorboard=false]",
        "analyses.alignment.num_samples=32", "analyses.alignment.timesteps='0.5'",
        "analyses.probe.checkpoint_steps=[8]", "analyses.probe.num_train=48", "analyses.probe.num_test=24",
        "analyses.fid.num_samples=32", "analyses.fid.steps=4", "analyses.fid.checkpoint_steps=[8]"])
    record = run_study(cfg, command="pytest")
    root = tmp_path / "tiny"
    assert not record["sweep"]["failed"]
    for run in ("repa", "irepa", "baseline"):
        assert sorted(p.name for p in (root / "runs" / run / "checkpoints").glob("*.pt")) == ["0000004.pt",
                                                                                                "0000008.pt"]
    md = (root / "report.md").read_text()
    assert "## What was run" in md and "| repa | SiT-S/4 | 2 | 64 | 8 |" in md and "| baseline |" in md
    assert "## alignment" in md and "6/6 units (complete)" in md and "## probe" in md and "3/3 units" in md
    assert "## fid" in md and "## Correlations across checkpoints" in md
    assert "| pearson | 3 |" in md and "| spearman | 3 |" in md  # both correlations over the three final checkpoints
    for ckpt in ("repa/0000004", "repa/0000008", "irepa/0000008", "baseline/0000004", "baseline/0000008"):
        assert f"| {ckpt} |" in md  # every checkpoint in the tables
    assert {"lds", "cds", "rmsc", "cknna"} <= {line.split(" | ")[3] for line in md.splitlines()
                                                if line.startswith("| repa/0000008 |") and line.count(" | ") >= 5}
    figures = [line for line in md.splitlines() if line.startswith("![")]
    assert any("steps_repa" in f for f in figures) and any("probe_" in f for f in figures)
    assert any("fid_vs_step" in f for f in figures) and any("scatter_cknna" in f for f in figures)
    for f in figures:
        assert (root / f.split("](")[1][:-1]).is_file()
    html = (root / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(figures) and "<table>" in html
    assert json.loads((root / "study.json").read_text())["runs"]["baseline"]["proj_coeff"] == 0.0
    # rerun: nothing trained or computed again
    again = run_study(cfg, command="pytest")
    assert all(r["trained"] == "existing" for r in again["runs"].values())
    assert not again["sweep"]["failed"]
