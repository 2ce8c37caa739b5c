"""`python -m analysis.sample` and `python -m analysis.fid` end to end on a tiny trained run, and their errors."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest

from analysis.fid import main as fid_main
from analysis.sample import main as sample_main
from repa_probe.analysis.generation.run import CSV_COLUMNS

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-step tiny run with checkpoints at steps 1 and 2."""
    from repa_probe.training import trainer
    from repa_probe.training.config import load_config

    out = tmp_path_factory.mktemp("runs")
    cfg = load_config(None, [f"run.out_dir={out}", "train.steps=2", "train.ckpt_every=1", "train.log_every=1",
                             "data.num_samples=32", "train.batch_size=8", "train.tensorboard=false"])
    return Path(trainer.train(cfg))


def _one_line_error(main, capsys, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert exc.value.code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_sample_cli(run, tmp_path, capsys):
    out = tmp_path / "s"
    assert sample_main(["--ckpt", str(run / "checkpoints" / "0000002.pt"), "--num-samples", "6", "--steps", "3",
                        "--method", "sde", "--batch-size", "4", "--out", str(out), "-q"]) == 0
    with np.load(out / "samples.npz") as z:
        assert z["arr_0"].shape == (6, 32, 32, 3) and z["arr_0"].dtype == np.uint8
    assert (out / "grid.png").exists() and json.loads((out / "sampling.json").read_text())["step"] == 2


def test_fid_cli_on_a_run(run, tmp_path):
    out = tmp_path / "fid"
    assert fid_main(["--ckpt", str(run), "--num-samples", "80", "--steps", "2", "--out", str(out), "-q"]) == 0
    with open(out / "fid.csv") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        rows = list(reader)
    assert [(r["checkpoint"], r["step"], r["metric"]) for r in rows] == [
        ("tiny/0000001", "1", "fd_tiny_vit"), ("tiny/0000002", "2", "fd_tiny_vit")]
    assert all(float(r["value"]) > 0 and r["num_samples"] == "80" and r["method"] == "euler" and r["steps"] == "2"
               and r["run"] == "tiny" for r in rows)
    assert (out / "figures" / "fid_vs_step.pdf").exists() and (out / "figures" / "fid_vs_step.png").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"] == ["fd_tiny_vit"] and summary["reference"].startswith("shapes:")
    # the cached reference statistics and the samples folder can be evaluated again without the checkpoint
    again = tmp_path / "again"
    npz = out / "samples" / "tiny_0000002" / "samples.npz"
    assert fid_main(["--samples", str(npz), "--ref", str(out / "reference_stats.pt"), "--encoder", "tiny_vit",
                     "--random-encoder", "--out", str(again), "-q"]) == 0
    with open(again / "fid.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert float(row["value"]) == pytest.approx(float(rows[1]["value"]), rel=1e-9)


@pytest.mark.parametrize("argv, match", [
    (["--method", "ddpm"], "--method 'ddpm' does not apply"),
    (["--cfg-scale", "2", "--guidance-low", "0.9", "--guidance-high", "0.1"], "guidance interval"),
    (["--inception-weights", "/nonexistent.pth"], "--inception-weights"),
])
def test_fid_cli_errors_are_one_line(run, tmp_path, capsys, argv, match):
    out = tmp_path / "bad"
    line = _one_line_error(fid_main, capsys, ["--ckpt", str(run / "checkpoints" / "0000002.pt"), "--num-samples",
                                              "4", "--out", str(out), "-q", *argv])
    assert match in line
    assert not (out / "fid.csv").exists() and not list(out.rglob("samples.npz"))


def test_fid_cli_bad_reference(tmp_path, capsys):
    np.savez(tmp_path / "ref.npz", mu=np.zeros(3))
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    line = _one_line_error(fid_main, capsys, ["--samples", str(tmp_path / "s.npz"), "--ref",
                                              str(tmp_path / "ref.npz"), "--encoder", "tiny_vit",
                                              "--random-encoder", "--out", str(tmp_path / "o")])
    assert "not sigma" in line and not (tmp_path / "o" / "fid.csv").exists()
