"""The README's promise for every command: a bad input is one line on stderr, no traceback, a non-zero exit, and
the output folders (and the run analysed) are left exactly as they were.

One table of bad inputs walks all ten commands in-process (``main(argv)``, stderr captured); the rows that need a
real process (Ctrl-C) are in tests/test_interruptions.py.
"""
import csv
import json
from pathlib import Path

import pytest

from analysis.alignment import main as alignment_main
from analysis.correlate import main as correlate_main
from analysis.fid import main as fid_main
from analysis.probe import main as probe_main
from analysis.sample import main as sample_main
from analysis.segment import main as segment_main
from analysis.study import main as study_main
from analysis.sweep import main as sweep_main
from train.cli import main as train_main
from train.extract_latents import main as extract_latents_main

ROOT = Path(__file__).resolve().parents[1]
MAINS = {"train": train_main, "extract_latents": extract_latents_main, "alignment": alignment_main,
         "probe": probe_main, "segment": segment_main, "sample": sample_main, "fid": fid_main,
         "correlate": correlate_main, "sweep": sweep_main, "study": study_main}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 2-step tiny run (checkpoints 1 and 2), a PNG, a text file and two conflicting alignment tables."""
    from PIL import Image

    from repa_probe.training.config import load_config
    from repa_probe.training.trainer import train

    root = tmp_path_factory.mktemp("world")
    run = train(load_config(None, [f"run.out_dir={root / 'runs'}", "train.steps=2", "train.ckpt_every=1",
                                   "train.log_every=1", "data.num_samples=32", "train.batch_size=8",
                                   "train.tensorboard=false"]))
    Image.new("RGB", (8, 8), (200, 10, 10)).save(root / "image.png")
    (root / "notes.txt").write_text("not weights\n")
    for name, n, values in (("align", 64, (0.1, 0.2)), ("align_n32", 32, (0.9, 0.1))):
        folder = root / "tables" / name
        folder.mkdir(parents=True)
        with open(folder / "alignment.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["checkpoint", "step", "layer", "timestep", "metric", "value"])
            for i in range(1, 5):
                w.writerows([[f"a/{i}", i, layer, 0.5, "cknna", values[layer - 1] * i] for layer in (1, 2)])
        (folder / "options.json").write_text(json.dumps({"num_samples": n, "seed": 0}))
    with open(root / "tables" / "fid.csv", "w", newline="") as f:
        csv.writer(f).writerows([["checkpoint", "step", "metric", "value"]] +
                                [[f"a/{i}", i, "fid_inception", 10.0 * i] for i in range(1, 5)])
    return dict(root=root, run=Path(run), ck=str(Path(run) / "checkpoints" / "0000002.pt"),
                png=str(root / "image.png"), txt=str(root / "notes.txt"), tables=str(root / "tables"))


# (command, argv with {placeholders}, what the one line must say)
ALIGN = ["--ckpt", "{ck}", "--out", "{out}", "--no-cache", "-q"]
PROBE = ["--ckpt", "{ck}", "--out", "{out}", "-q"]
SWEEP_CFG = ["--cfg", "configs/sweep_tiny.yaml", "sweep.out_dir={out}", "runs=[{run}]"]
STUDY_CFG = ["--cfg", "configs/study_tiny.yaml", "study.out_dir={out}"]
CASES = [
    # train
    ("train", ["--cfg", "{png}"], "not a YAML config"),
    ("train", ["run.out_dir={out}", "model.hiden_size=3"], "unknown config key 'model.hiden_size'"),
    ("train", ["run.out_dir={out}", "train.steps=0"], "train.steps must be positive"),
    ("train", ["run.out_dir={runs}", "run.name=tiny", "model.hidden_size=64", "data.num_samples=32"],
     "model.hidden_size=64 (stored 128)"),                                          # issue 21 item 10
    ("train", ["run.out_dir={out}/runs", "run.name=new", "encoder.pretrained=true", "encoder.weights={out}/x.pth"],
     "does not exist"),                                                             # no half-made run folder
    # extract_latents
    ("extract_latents", ["--data", "shapes", "--out", "{out}/lat", "--vae", "none"], "--vae none"),
    ("extract_latents", ["--data", "imagefolder", "--out", "{out}/lat", "--vae", "random:tiny"], "root"),
    # alignment
    ("alignment", ALIGN + ["--num-samples", "1"], "--num-samples"),
    ("alignment", ALIGN + ["--num-samples", "100000000"], "capped at 50000"),        # item 13
    ("alignment", ALIGN + ["--ckpt", "{ck}"], "0000002.pt is listed twice"),
    ("alignment", ALIGN + ["--timesteps", "0,1.5"], "must lie in [0, 1]"),
    ("alignment", ALIGN + ["--layers", "9"], "outside"),
    ("alignment", ["--ckpt", "{txt}", "--out", "{out}"], "notes.txt"),
    ("alignment", ["--ckpt", "{ck}", "--out", "{txt}"], "--out"),
    # probe / segment
    ("probe", PROBE + ["--data", "shapes", "--num-train", "100000000"], "capped at 50000"),
    ("probe", PROBE + ["--num-train", "100000000"], "--num-train 100000000 must be in 1.."),
    ("probe", PROBE + ["--backend", "xgboost"], "invalid choice"),
    ("segment", PROBE + ["--data", "digits"], "not a segmentation probe dataset"),
    ("segment", PROBE + ["--num-test", "0"], "--num-test must be an integer >= 1"),
    # sample / fid
    ("sample", ["--ckpt", "{out}/missing.pt", "--out", "{out}/s", "--num-samples", "4"], "missing.pt"),
    ("sample", ["--ckpt", "{txt}", "--out", "{out}/s", "--num-samples", "4"], "notes.txt"),
    ("fid", ["--ckpt", "{out}/missing.pt", "--out", "{out}/f"], "missing.pt"),
    ("fid", ["--out", "{out}/f"], "--ckpt"),
    ("sample", ["--ckpt", "{ck}", "--out", "{out}/s", "--num-samples", "4", "--cfg-scale", "nan"],
     "--cfg-scale must be a finite number"),                                        # item 2
    ("sample", ["--ckpt", "{ck}", "--out", "{out}/s", "--num-samples", "4", "--steps", "0"], "--steps"),  # item 3
    ("fid", ["--ckpt", "{ck}", "--out", "{out}/f", "--num-samples", "0"], "--num-samples"),             # item 3
    ("fid", ["--ckpt", "{ck}", "--out", "{out}/f", "--num-samples", "1"], "--num-samples"),
    ("sample", ["--ckpt", "{ck}", "--out", "{out}/s", "--num-samples", "4", "--batch-size", "0"],
     "--batch-size"),                                                               # item 6
    ("fid", ["--ckpt", "{ck}", "--out", "{out}/f", "--batch-size", "-3"], "--batch-size"),
    ("extract_latents", ["--data", "shapes", "--out", "{out}/lat", "--vae", "random:tiny", "--batch-size", "0"],
     "--batch-size"),
    ("sample", ["--ckpt", "{ck}", "--out", "{out}/earlier.txt", "--num-samples", "4"], "is a file"),    # item 7
    ("fid", ["--ckpt", "{ck}", "--out", "{out}/earlier.txt", "--num-samples", "4"], "is a file"),
    ("extract_latents", ["--data", "shapes", "--out", "{out}/earlier.txt", "--vae", "random:tiny"], "is a file"),
    ("fid", ["--ckpt", "{ck}", "--out", "{out}/f", "--num-samples", "4", "--inception-weights", "{txt}"],
     "--inception-weights"),                                                        # item 9
    # correlate
    ("correlate", ["--tables", "{tables}", "--x", "cknna@best,t=0.5", "--y", "fid_inception", "--out", "{out}/c"],
     "num_samples 64 vs 32"),                                                       # item 1
    ("correlate", ["--tables", "{tables}/align", "--x", "ckna@2,t=0.5", "--y", "fid_inception", "--out", "{out}/c"],
     "unknown metric 'ckna'"),
    # sweep / study: the config and every analysis's options are checked when the config is read (item 14)
    ("sweep", ["--cfg", "{png}"], "not a YAML config"),
    ("sweep", SWEEP_CFG + ["--dry-run", "analyses.alignment.timesteps=1.5"], "analyses.alignment: --timesteps"),
    ("sweep", SWEEP_CFG + ["analyses.alignment.num_samples=0"], "--num-samples must be an integer >= 1"),
    ("sweep", SWEEP_CFG + ["analyses.colour={{}}"], "unknown analysis 'colour'"),
    ("study", ["--cfg", "{png}"], "not a YAML config"),
    ("study", STUDY_CFG + ["analyses.alignment.timesteps=1.5"], "analyses.alignment: --timesteps"),
    ("study", STUDY_CFG + ["analyses.probe.layers=0"], "--layers"),
]


def _snapshot(*folders: Path) -> dict:
    """Every file and folder under ``folders`` with its size and modification time."""
    out = {}
    for folder in folders:
        for p in sorted(Path(folder).rglob("*")):
            st = p.stat()
            out[str(p)] = (p.is_dir(), st.st_size if p.is_file() else None, st.st_mtime_ns if p.is_file() else None)
    return out


@pytest.mark.parametrize("command,argv,needle", CASES, ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(CASES)])
def test_bad_input_is_one_line_and_touches_nothing(world, tmp_path, capsys, monkeypatch, command, argv, needle):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.txt").write_text("a file the user had here\n")
    values = dict(world, out=out, runs=world["run"].parent)
    argv = [a.format(**values) for a in argv]
    before = _snapshot(tmp_path, world["root"])
    try:
        code = MAINS[command](argv)
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert code not in (0, None), captured
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    assert needle in lines[0], lines[0]
    assert _snapshot(tmp_path, world["root"]) == before
