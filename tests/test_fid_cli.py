"""`python -m analysis.sample` and `python -m analysis.fid` end to end on a tiny trained run, and their errors."""
import csv
import json

import numpy as np
import pytest

from analysis.fid import main as fid_main
from analysis.sample import main as sample_main
from repa_probe.analysis.generation.run import CSV_COLUMNS

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def run(tiny_run):
    """The shared tiny run, checkpoints at steps 1 and 2."""
    return tiny_run


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
    assert fid_main(["--ckpt", str(run), "--num-samples", "80", "--steps", "2", "--out", str(out), "--bootstrap",
                     "20", "-q"]) == 0
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
    reps = np.load(out / "replicates.npz")  # 20 replicates of each FD over the 80 samples
    assert reps["values"].shape == (2, 20) and np.isfinite(reps["values"]).all()
    assert "| tiny/0000002 | 2 | FD (tiny_vit) |" in (out / "report.md").read_text()
    # the cached reference statistics and the samples folder can be evaluated again without the checkpoint
    again = tmp_path / "again"
    npz = out / "samples" / "tiny_0000002" / "samples.npz"
    assert fid_main(["--samples", str(npz), "--ref", str(out / "reference_stats.pt"), "--encoder", "tiny_vit",
                     "--random-encoder", "--out", str(again), "-q"]) == 0
    with open(again / "fid.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert float(row["value"]) == pytest.approx(float(rows[1]["value"]), rel=1e-9)
    assert "FD (tiny_vit)" in (again / "report.md").read_text() and not (again / "replicates.npz").exists()


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


# ------------------------------------------------------------------ options, files, bad input (issues 17, 21)
@pytest.mark.parametrize("argv, match", [
    (["--cfg-scale", "nan"], "--cfg-scale must be a finite number"),
    (["--cfg-scale", "inf"], "--cfg-scale must be a finite number"),
    (["--guidance-high", "1.5"], "--guidance-high must be a finite number in [0.0, 1.0]"),
    (["--steps", "0"], "--steps must be an integer >= 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    (["--batch-size", "-4"], "--batch-size must be an integer >= 1, got -4"),
    (["--num-samples", "0"], "--num-samples must be an integer >= 1, got 0"),
    (["--seed", "-1"], "--seed must be an integer >= 0"),
    (["--cfg-channels", "0"], "--cfg-channels must be an integer >= 1"),
])
def test_sample_options_refused_before_any_work(run, tmp_path, capsys, argv, match):
    out = tmp_path / "s"
    line = _one_line_error(sample_main, capsys, ["--ckpt", str(run / "checkpoints" / "0000002.pt"), "--num-samples",
                                                 "4", "--out", str(out), "-q", *argv])
    assert match in line and not out.exists()


def test_fid_num_samples_and_out_file_name_the_flag(run, tmp_path, capsys):
    ckpt = str(run / "checkpoints" / "0000002.pt")
    line = _one_line_error(fid_main, capsys, ["--ckpt", ckpt, "--num-samples", "1", "--out", str(tmp_path / "f")])
    assert "--num-samples must be an integer >= 2, got 1" in line
    (tmp_path / "file").write_text("x")
    for main in (fid_main, sample_main):
        line = _one_line_error(main, capsys, ["--ckpt", ckpt, "--num-samples", "4", "--steps", "2", "--out",
                                              str(tmp_path / "file"), "-q"])
        assert "--out" in line and "is a file" in line and (tmp_path / "file").read_text() == "x"


def test_sample_writes_options_and_a_table(run, tmp_path):
    out = tmp_path / "two"
    assert sample_main(["--ckpt", str(run), "--num-samples", "2", "--steps", "2", "--out", str(out), "-q"]) == 0
    options = json.loads((out / "options.json").read_text())
    assert options["num_samples"] == 2 and options["steps"] == 2 and options["cfg_scale"] == 1.0
    with open(out / "sample.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["checkpoint"], r["folder"], r["run"]) for r in rows] == [
        ("tiny/0000001", "tiny_0000001", "tiny"), ("tiny/0000002", "tiny_0000002", "tiny")]
    assert all((out / r["folder"] / "samples.npz").exists() for r in rows)


def _random_inception(path):
    """A state dict of torch-fidelity's InceptionV3 shapes with random values (no download offline)."""
    import torch
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    empty = path.parent / "empty.pth"
    torch.save({}, empty)
    real = FeatureExtractorInceptionV3.load_state_dict
    FeatureExtractorInceptionV3.load_state_dict = lambda self, sd, strict=True: None
    try:
        model = FeatureExtractorInceptionV3("x", ["2048"], feature_extractor_weights_path=str(empty))
    finally:
        FeatureExtractorInceptionV3.load_state_dict = real
    torch.save(model.state_dict(), path)
    return model.state_dict()


def test_inception_weights_checked_before_sampling(run, tmp_path, capsys):
    """A text file, an image renamed .pth, wrong keys or shapes: one line naming --inception-weights, and no
    sample is drawn (the check runs in setup)."""
    import torch
    from PIL import Image

    from repa_probe.analysis.generation.fid import inception_space

    state = _random_inception(tmp_path / "good.pth")
    assert inception_space(tmp_path / "good.pth", isc=True).layers == ("2048", "logits_unbiased")
    (tmp_path / "text.pth").write_text("not weights\n")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "image.png")
    (tmp_path / "image.png").rename(tmp_path / "image.pth")
    torch.save({"a": torch.zeros(2)}, tmp_path / "keys.pth")
    state["fc.weight"] = torch.zeros(3, 2048)
    torch.save(state, tmp_path / "shapes.pth")
    for name, match in (("text", "not a PyTorch weights file"), ("image", "not a PyTorch weights file"),
                        ("keys", "does not fit torch-fidelity's InceptionV3"),
                        ("shapes", "does not fit torch-fidelity's InceptionV3")):
        out = tmp_path / f"o_{name}"
        line = _one_line_error(fid_main, capsys, ["--ckpt", str(run / "checkpoints" / "0000002.pt"), "--num-samples",
                                                  "4", "--steps", "2", "--inception-weights",
                                                  str(tmp_path / f"{name}.pth"), "--out", str(out), "-q"])
        assert "--inception-weights" in line and match in line, line
        assert not out.exists()


def test_broken_png_in_samples_is_one_line(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "samples"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(folder / f"{i:06d}.png")
    (folder / "000001.png").write_bytes((folder / "000001.png").read_bytes()[:20])  # truncated
    line = _one_line_error(fid_main, capsys, ["--samples", str(folder), "--ref", str(folder), "--encoder", "tiny_vit",
                                              "--random-encoder", "--out", str(tmp_path / "o"), "-q"])
    assert "000001.png is not a readable image" in line


def test_fid_of_samples_folders_writes_options_and_relative_paths(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "a.npz", arr_0=rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8))
    np.savez(tmp_path / "ref.npz", arr_0=rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8))
    out = tmp_path / "o"
    assert fid_main(["--samples", str(tmp_path / "a.npz"), "--ref", str(tmp_path / "ref.npz"), "--encoder",
                     "tiny_vit", "--random-encoder", "--out", str(out), "-q"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["files"] == {"csv": "fid.csv", "options": "options.json", "reference_stats": "reference_stats.pt",
                                "report": "report.md", "replicates": None, "figures": []}
    assert summary["checkpoints"] == [dict(label="a", path=str(tmp_path / "a.npz"), run=None, step=None,
                                           source_format="samples")]
    assert json.loads((out / "options.json").read_text())["samples"] == [str(tmp_path / "a.npz")]


def test_cls_cfg_scale_is_a_checked_sampler_option():
    from repa_probe.analysis.generation.options import OptionsError, SampleOptions

    assert SampleOptions(cls_cfg_scale="1.5").cls_cfg_scale == 1.5 and SampleOptions().cls_cfg_scale is None
    with pytest.raises(OptionsError, match="--cls-cfg-scale must be a finite number"):
        SampleOptions(cls_cfg_scale=float("nan"))
