"""End-to-end tests of `python -m analysis.alignment` on a checkpoint made by the trainer, and its errors."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import repa_probe.analysis.alignment.run as alignment
from analysis.alignment import main
from repa_probe.analysis.alignment.run import CSV_COLUMNS, AlignmentOptions, alignment_table
from repa_probe.reports.bootstrap import interval, read_replicates, row_key
from repa_probe.reports.numbers import fmt_interval
from repa_probe.analysis.core.inputs import (DataSource, build_analysis_dataset, build_config_encoder,
                                        load_checkpoints)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def run(tiny_run, tiny_run_encoder):
    """The shared tiny run (checkpoints at steps 1 and 2) and the target encoder the trainer built."""
    return tiny_run, tiny_run_encoder


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Fail the test if feature extraction starts (errors must come before any heavy work)."""
    def boom(*a, **k):
        pytest.fail("heavy work started before the error was raised")

    for name in ("prepare_inputs", "encoder_features", "extract_features"):
        monkeypatch.setattr(alignment, name, boom)


def _one_line_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert exc.value.code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_cli_end_to_end_on_a_run(run, tmp_path, capsys):
    run_dir, _ = run
    out = tmp_path / "out"
    assert main(["--ckpt", str(run_dir), "--out", str(out), "--num-samples", "48", "--timesteps", "0,0.5,1",
                 "--bootstrap", "4", "--cache-dir", str(tmp_path / "cache"), "-q"]) == 0
    with open(out / "alignment.csv") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        rows = list(reader)
    assert len(rows) == 2 * 4 * 3                                    # checkpoints x blocks x timesteps
    assert {(r["checkpoint"], r["step"]) for r in rows} == {("tiny/0000001", "1"), ("tiny/0000002", "2")}
    assert {r["layer"] for r in rows} == {str(i) for i in range(1, 5)}
    assert {float(r["timestep"]) for r in rows} == {0.0, 0.5, 1.0}
    assert {r["metric"] for r in rows} == {"cknna"} and {r["n"] for r in rows} == {"48"}
    for r in rows:
        v, lo, hi = float(r["value"]), float(r["ci_low"]), float(r["ci_high"])
        assert -1 <= v <= 1 and lo <= hi
    by_t = {t: [float(r["value"]) for r in rows if float(r["timestep"]) == t] for t in (0.0, 1.0)}
    # clean images carry the structure the encoder sees; pure noise carries none (CKNNA's chance level at
    # N = 48, k = 10 is ~0.19, not 0: the unbiased HSIC of sparse kNN masks is biased up at small N)
    assert max(by_t[1.0]) < min(by_t[0.0]) - 0.1

    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["best"]) == 2 * 3
    for b in summary["best"]:
        same = [r for r in rows if r["checkpoint"] == b["checkpoint"] and float(r["timestep"]) == b["timestep"]]
        assert b["best_layer"] == int(max(same, key=lambda r: float(r["value"]))["layer"])
    assert summary["settings"]["split"] == "val" and summary["settings"]["target_kind"] == "cls"
    options = json.loads((out / "options.json").read_text())
    assert options == summary["options"] and options["timesteps"] == [0.0, 0.5, 1.0] and options["bootstrap"] == 4
    assert [c["weights"] for c in summary["checkpoints"]] == ["model", "model"]  # EMA not warmed up after 2 steps
    assert summary["versions"]["torch"] == torch.__version__
    figs = {Path(p).name for p in summary["files"]["figures"]}
    for stem in ("heatmap_tiny_0000001_cknna", "layers_tiny_0000002_cknna", "layers_t0.5_cknna",
                 "steps_tiny_t0.5_cknna"):
        assert {stem + ".pdf", stem + ".png"} <= figs
    for name in figs:
        data = (out / "figures" / name).read_bytes()
        assert len(data) > 2000 and data[:4] in (b"%PDF", b"\x89PNG")
    assert "best block" in capsys.readouterr().out
    # report.md: the best block of each checkpoint at the plot timestep, with the interval of its replicates
    report = (out / "report.md").read_text()
    best = max((r for r in rows if r["checkpoint"] == "tiny/0000002" and r["timestep"] == "0.5"),
               key=lambda r: float(r["value"]))
    reps = read_replicates([out / "replicates.npz"])
    assert len(reps) == len(rows) and summary["files"]["replicates"] == "replicates.npz"
    lo, hi = interval(float(best["value"]), *reps[row_key({**best, "layer": int(best["layer"]),
                                                          "timestep": 0.5})])
    assert lo == pytest.approx(float(best["ci_low"])) and hi == pytest.approx(float(best["ci_high"]))
    line = f"| tiny/0000002 | 2 | 0.5 | CKNNA | {best['layer']} | {fmt_interval(float(best['value']), lo, hi)} |"
    assert line in report and "`alignment.csv`" in report

    # the library API gives the same numbers without files (same data, noise and settings)
    entry = load_checkpoints([run_dir / "checkpoints" / "0000002.pt"], AlignmentOptions())[0]
    source = DataSource("shapes", None, 32, 0, 4, "none", None, True)
    dataset, _ = build_analysis_dataset(source, split="val", num_samples=48)
    table = alignment_table(entry.model, entry.objective, dataset, build_config_encoder(entry.cfg),
                            AlignmentOptions(timesteps=[0.5], batch_size=16, progress=False), checkpoint="x")
    csv_values = {int(r["layer"]): float(r["value"]) for r in rows
                  if r["checkpoint"] == "tiny/0000002" and float(r["timestep"]) == 0.5}
    assert len(table) == 4
    for r in table:
        assert r["ci_low"] is None and r["value"] == pytest.approx(csv_values[r["layer"]], abs=1e-5)


def test_analysis_rebuilds_the_training_encoder(run):
    run_dir, trained_state = run
    entry = load_checkpoints([run_dir / "checkpoints" / "0000001.pt"], AlignmentOptions())[0]
    state = build_config_encoder(entry.cfg).state_dict()
    assert state.keys() == trained_state.keys()
    assert all(torch.equal(state[k], trained_state[k]) for k in state)


def test_bad_inputs_fail_in_one_line_before_heavy_work(run, tmp_path, capsys, monkeypatch, no_heavy_work):
    import huggingface_hub.constants as hfc

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(tmp_path / "hf"))
    run_dir, _ = run
    ckpt = str(run_dir / "checkpoints" / "0000002.pt")
    base = ["--ckpt", ckpt, "--out", str(tmp_path / "o"), "--no-cache", "-q"]
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    official = tmp_path / "official.pt"
    torch.save(torch.load(ckpt, weights_only=True)["model"], official)
    cases = {
        "not a torch checkpoint": ["--ckpt", str(garbage), "--out", str(tmp_path / "o")],
        "no such file": ["--ckpt", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o")],
        "no pretrained weights for encoder dinov2_vits14": base + ["--encoder", "dinov2_vits14"],
        "more than": base + ["--data", "digits", "--num-samples", "5000"],
        "must lie in [0, 1]": base + ["--timesteps", "0,1.5"],
        "ambiguous: write step:250 for DDPM step 250 or 0.25": base + ["--timesteps", "0,250"],
        "names a DDPM step": base + ["--timesteps", "0,step:250"],
        "--batch-size must be an integer >= 1": base + ["--batch-size", "0"],
        "--device 'gpu0' is not a device": base + ["--device", "gpu0"],
        "layers [7] are outside 1..4": base + ["--layers", "2,7"],
        "--topk 10 must be smaller than the number of images N = 8 (--num-samples)": base + ["--num-samples", "8"],
        "must exceed --topk": base + ["--num-samples", "16", "--bootstrap", "10"],
        "pass --data and --encoder": ["--ckpt", str(official), "--out", str(tmp_path / "o")],
        "unknown metric": base + ["--metric", "cknna,ssim"],
        "not one of --timesteps": base + ["--plot-timestep", "0.3"],
        "invalid choice": base + ["--target-kind", "patch"],
        "the following arguments are required: --out": ["--ckpt", ckpt],
    }
    for needle, argv in cases.items():
        line = _one_line_error(capsys, argv)
        assert needle in line, (needle, line)


def test_python_m_entry_point_help_and_exit_code(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    help_text = subprocess.run([sys.executable, "-m", "analysis.alignment", "--help"], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=120)
    assert help_text.returncode == 0
    assert "t = 0 is clean data, t = 1 is pure noise" in help_text.stdout and "--plot-timestep" in help_text.stdout
    bad = subprocess.run([sys.executable, "-m", "analysis.alignment", "--ckpt", str(tmp_path / "x.pt"), "--out",
                          str(tmp_path / "o")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and bad.stderr.startswith("error: ")
