"""Interrupted and repeated runs (issue 21 items 4, 5, 11, 12): Ctrl-C is one line and exit 130 and leaves the
folder marked incomplete; a second run into the same --out removes the first run's outputs and says which;
duplicate times are computed once; skipped probe selection is said; the trainer's checkpoint fallback."""
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import repa_probe.analysis.alignment.run as alignment
from analysis.alignment import main as alignment_main
from analysis.probe import main as probe_main
from analysis.segment import main as segment_main
from repa_probe.analysis.core.writers import INCOMPLETE

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--num-samples", "12", "--topk", "3", "--layers", "1,2", "--no-cache", "-q"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-step tiny run with checkpoints at steps 1 and 2."""
    from repa_probe.training.config import load_config
    from repa_probe.training.trainer import train

    out = tmp_path_factory.mktemp("runs")
    return Path(train(load_config(None, [f"run.out_dir={out}", "train.steps=2", "train.ckpt_every=1",
                                         "train.log_every=1", "data.num_samples=32", "train.batch_size=8",
                                         "train.tensorboard=false"])))


def test_reruns_into_one_out_and_ctrl_c(run, tmp_path, capsys, caplog, monkeypatch):
    """A second run into the same --out removes the first run's outputs (and says which); Ctrl-C is one line,
    exit 130, and leaves the folder marked incomplete with no summary; a rerun repairs it."""
    out, ck2 = tmp_path / "x", str(run / "checkpoints" / "0000002.pt")
    assert alignment_main(["--ckpt", str(run), "--out", str(out), "--timesteps", "0,1"] + FAST) == 0
    first = set(json.loads((out / "summary.json").read_text())["files"]["figures"])
    (out / "mine.txt").write_text("the user's own file")
    with caplog.at_level(logging.WARNING, logger="repa_probe"):
        assert alignment_main(["--ckpt", ck2, "--out", str(out), "--timesteps", "0.5,0.50"] + FAST) == 0
    summary = json.loads((out / "summary.json").read_text())
    figures = {str(p.relative_to(out)) for p in (out / "figures").rglob("*") if p.is_file()}
    assert figures == set(summary["files"]["figures"]) and first - figures      # no figure of the first run left
    assert "held the outputs of an earlier run; removed alignment.csv" in caplog.text
    assert "figure file(s)" in caplog.text and (out / "mine.txt").exists() and not (out / INCOMPLETE).exists()
    # item 5: a time given twice is computed once, and said
    assert "--timesteps: 0.5 given more than once; each is computed once" in caplog.text
    rows = (out / "alignment.csv").read_text().splitlines()[1:]
    assert len(rows) == len(set(rows)) == 2                                        # 2 layers x 1 time x cknna

    calls = []

    def interrupted_after_one(self, run_, entry, model):
        if calls:
            raise KeyboardInterrupt
        calls.append(entry.label)
        return real(self, run_, entry, model)

    real = alignment.AlignmentAnalysis.analyse
    monkeypatch.setattr(alignment.AlignmentAnalysis, "analyse", interrupted_after_one)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        alignment_main(["--ckpt", str(run), "--out", str(out), "--timesteps", "0.5"] + FAST)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert exc.value.code == 130
    assert len(err) == 1 and err[0].startswith("interrupted: ") and INCOMPLETE in err[0], err
    assert (out / INCOMPLETE).exists() and not (out / "summary.json").exists()  # no summary of the earlier run
    assert not list((out / "figures").iterdir()) and not list(out.glob(".*.tmp"))
    assert len((out / "alignment.csv").read_text().splitlines()) == 1 + 2          # the first checkpoint's rows
    monkeypatch.undo()                                                               # a rerun repairs the folder
    assert alignment_main(["--ckpt", ck2, "--out", str(out), "--timesteps", "0.5"] + FAST) == 0
    assert (out / "summary.json").exists() and not (out / INCOMPLETE).exists()


def test_ctrl_c_of_a_real_process(run, tmp_path):
    """SIGINT to `python -m analysis.alignment` while it works: one line on stderr, exit code 130."""
    out = tmp_path / "x"
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "analysis.alignment", "--ckpt", str(run), "--out", str(out),
                             "--num-samples", "2000", "--no-cache", "-q"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / INCOMPLETE).exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)                           # the marker: the run has started writing --out
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert proc.returncode == 130, err
    assert len(lines) == 1 and lines[0].startswith("interrupted: ") and "Traceback" not in err, err
    assert (out / INCOMPLETE).exists() and not (out / "summary.json").exists()


def test_probe_selection_skipped_is_said(run, tmp_path, caplog):
    """Item 4: too few training images for the held-out part: a warning, also in summary.json."""
    ck = str(run / "checkpoints" / "0000002.pt")
    common = ["--ckpt", ck, "--data", "shapes", "--num-test", "8", "--layers", "1", "--timesteps", "0.5", "-q"]
    with caplog.at_level(logging.WARNING, logger="repa_probe"):
        assert probe_main(common + ["--out", str(tmp_path / "p"), "--num-train", "3"]) == 0
        assert segment_main(common + ["--out", str(tmp_path / "s"), "--num-train", "2", "--epochs", "1"]) == 0
    warnings = json.loads((tmp_path / "p" / "summary.json").read_text())["warnings"]
    assert len(warnings) == 1 and "not chosen on a held-out part (--num-train 3" in warnings[0]
    assert "no held-out images (--num-train 2)" in json.loads((tmp_path / "s" / "summary.json").read_text())[
        "warnings"][0]
    assert caplog.text.count("not chosen on a held-out part") == 1


def test_when_every_checkpoint_is_corrupt_the_last_warning_does_not_promise_a_fallback(tmp_path, caplog):
    from repa_probe.training.rundir import RunDirError, load_latest

    for step in (1, 2):
        (tmp_path / f"{step:07d}.pt").write_bytes(b"broken")

    def loader(path):
        raise ValueError("truncated")

    with caplog.at_level(logging.WARNING, logger="repa_probe"), pytest.raises(RunDirError, match="2 tried"):
        load_latest(tmp_path, loader)
    lines = [r.getMessage() for r in caplog.records]
    assert "0000002.pt" in lines[0] and "falling back to the previous one" in lines[0]
    assert "0000001.pt" in lines[1] and "falling back" not in lines[1] and "the oldest one" in lines[1]
