"""End to end: `python -m analysis.probe` / `analysis.segment` on a tiny checkpoint made by the trainer."""
import csv
import json
import re

import numpy as np
import pytest
from PIL import Image

from analysis.probe import main as probe_main
from analysis.segment import main as segment_main
from repa_probe.analysis.probes.run import CSV_COLUMNS, layer_groups


@pytest.fixture
def tiny_ckpt(tiny_run):
    """The step-2 checkpoint of the shared tiny run."""
    return str(tiny_run / "checkpoints" / "0000002.pt")


pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(path):
    with open(path) as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        return list(reader)


def test_probe_cli_end_to_end(tiny_ckpt, tmp_path):
    out = tmp_path / "probe"
    assert probe_main(["--ckpt", tiny_ckpt, "--out", str(out), "--data", "shapes", "--num-train", "64",
                       "--num-test", "32", "--layers", "1,4", "--timesteps", "0,1", "--encoder-reference", "-q"]) == 0
    rows = _rows(out / "probe.csv")
    model = [r for r in rows if r["source"] == "model"]
    refs = [r for r in rows if r["source"] != "model"]
    assert len(model) == 2 * 2  # layers x timesteps x top1 (4 classes: top-5 is 1 by construction, not reported)
    assert {r["metric"] for r in rows} == {"top1"}
    assert {(r["layer"], r["timestep"]) for r in model} == {("1", "0.0"), ("4", "0.0"), ("1", "1.0"), ("4", "1.0")}
    assert {r["source"] for r in refs} == {"encoder:cls", "encoder:mean_patch"} and len(refs) == 2
    assert all(r["checkpoint"] == "tiny/0000002" and r["step"] == "2" for r in model)
    assert all(0.0 <= float(r["value"]) <= 1.0 for r in rows)
    # at t = 1 the input is pure noise: a probe must sit near chance (0.25). Well above it would mean the
    # test images share their noise with training images of the same label (shapes: label = index % 4).
    pure_noise = [float(r["value"]) for r in model if r["timestep"] == "1.0" and r["metric"] == "top1"]
    assert max(pure_noise) < 0.6, pure_noise
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "linear" and summary["settings"]["num_train"] == 64
    assert len(summary["details"]) == 6 and all("hparams" in d and "C" in d["hparams"] for d in summary["details"])
    assert all("top5" not in d for d in summary["details"]) and summary["settings"]["data"] == "shapes"
    for ext in ("pdf", "png"):
        assert (out / "figures" / f"probe_top1.{ext}").stat().st_size > 0
    assert not (out / "figures" / "probe_top5.png").exists()  # 4 classes: top-5 is 1 by construction
    # replicates over the 32 test images (200 by default): a top-1 interval in report.md, 1/32 resolution
    report = (out / "report.md").read_text()
    assert "Best block of each checkpoint" in report and "encoder:cls" in report
    assert re.search(r"\| top-1 \| [14] \| \d\.\d+ \[\d\.\d+, \d\.\d+\] \|", report), report


def test_probe_demo_default_is_above_chance_and_falls_with_noise(tiny_ckpt, tmp_path):
    """The README's demo: with only --ckpt / --out, a shapes-trained run is probed on digits (shapes classes are
    not linearly separable, so a probe there sits at chance whatever the model). Clean inputs must be read well
    above chance (0.1), pure noise must not be."""
    out = tmp_path / "demo"
    assert probe_main(["--ckpt", tiny_ckpt, "--out", str(out), "--num-train", "300", "--num-test", "150",
                       "--layers", "1,4", "--timesteps", "0,1", "-q"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["data"] == "digits" and summary["settings"]["num_classes"] == 10
    top1 = {(r["layer"], r["timestep"]): r["value"] for r in summary["rows"] if r["metric"] == "top1"}
    clean = max(v for (_, t), v in top1.items() if t == 0.0)
    noise = max(v for (_, t), v in top1.items() if t == 1.0)
    assert clean > 0.1 + 0.4, top1
    assert noise < 0.1 + 0.15 and clean > noise + 0.3, top1
    assert {r["metric"] for r in _rows(out / "probe.csv")} == {"top1", "top5"}  # 10 classes: top-5 reported
    assert (out / "figures" / "probe_top5.png").is_file()


def test_probe_cli_torch_backend_on_digits(tiny_ckpt, tmp_path):
    out = tmp_path / "digits"
    assert probe_main(["--ckpt", tiny_ckpt, "--out", str(out), "--data", "digits", "--num-train", "60",
                       "--num-test", "40", "--layers", "2", "--timesteps", "0", "--backend", "torch", "--epochs", "3",
                       "--device", "cpu", "-q"]) == 0
    rows = _rows(out / "probe.csv")
    assert {r["metric"] for r in rows} == {"top1", "top5"} and all(r["num_test"] == "40" for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["details"][0]["backend"] == "torch" and summary["details"][0]["hparams"]["epochs"] == 3
    assert summary["settings"]["num_classes"] == 10
    assert (out / "figures" / "probe_top5.png").is_file()  # 10 classes: top-5 is informative


def test_segment_cli_end_to_end_on_shapes(tiny_ckpt, tmp_path):
    out = tmp_path / "seg"
    assert segment_main(["--ckpt", tiny_ckpt, "--out", str(out), "--num-train", "32", "--num-test", "16",
                         "--layers", "1,3", "--timesteps", "0", "--epochs", "3", "--encoder-reference", "-q"]) == 0
    rows = _rows(out / "segment.csv")
    assert len(rows) == 2 * 2 + 2 and {r["metric"] for r in rows} == {"miou", "pixel_acc"}
    assert {r["source"] for r in rows} == {"model", "encoder:patch"}
    assert all(0.0 <= float(r["value"]) <= 1.0 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["num_classes"] == 5  # background + 4 shapes
    d = summary["details"][-1]
    assert len(d["per_class_iou"]) == 5 and d["mask_size"] == [32, 32] and d["token_grid"] == [8, 8]
    for ext in ("pdf", "png"):
        assert (out / "figures" / f"segment_miou.{ext}").stat().st_size > 0


def _fake_voc(root, n=4, size=(40, 36)):
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(root / f"JPEGImages/{i}.jpg")
        m = np.zeros((size[1], size[0]), np.uint8)
        m[5:20, 5:25] = 1 + i % 3
        m[4, :] = 255
        im = Image.fromarray(m, mode="P")
        im.putpalette([0] * 768)
        im.save(root / f"SegmentationClass/{i}.png")
    for split in ("train", "val"):
        (root / f"ImageSets/Segmentation/{split}.txt").write_text("\n".join(str(i) for i in range(n)))


def test_segment_cli_on_voc_folder(tiny_ckpt, tmp_path):
    _fake_voc(tmp_path / "VOC2012")
    out = tmp_path / "voc"
    assert segment_main(["--ckpt", tiny_ckpt, "--out", str(out), "--data", "voc", str(tmp_path),
                         "--layers", "1", "--timesteps", "0.5", "--epochs", "1", "-q"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["num_classes"] == 21 and summary["settings"]["num_train"] == 4
    assert summary["details"][0]["mask_size"] == [32, 32]  # cropped to the model resolution


def _image_folder(root, classes, per_class=6):
    rng = np.random.default_rng(1)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_probe_cli_on_image_folder(tiny_ckpt, tmp_path, capsys):
    _image_folder(tmp_path / "ok" / "train", ["ant", "bee", "cat"])
    _image_folder(tmp_path / "ok" / "val", ["ant", "bee", "cat"], per_class=2)
    out = tmp_path / "out"
    assert probe_main(["--ckpt", tiny_ckpt, "--out", str(out), "--data", "imagefolder", str(tmp_path / "ok"),
                       "--layers", "1", "--timesteps", "0", "-q"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["settings"]["num_train"], summary["settings"]["num_test"]) == (18, 6)
    assert summary["settings"]["num_classes"] == 3
    # a val split whose class folders differ would silently shift the labels: refused
    _image_folder(tmp_path / "bad" / "train", ["ant", "bee"])
    _image_folder(tmp_path / "bad" / "val", ["ant", "cow"])
    with pytest.raises(SystemExit) as info:
        probe_main(["--ckpt", tiny_ckpt, "--out", str(tmp_path / "o2"), "--data", "imagefolder",
                    str(tmp_path / "bad"), "--layers", "1", "--timesteps", "0", "-q"])
    assert info.value.code == 2 and "different classes" in capsys.readouterr().err


@pytest.mark.parametrize("args,match", [
    (["--ckpt", "/nonexistent.pt"], "no such file"),
    (["--layers", "1,99"], "outside 1..4"),
    (["--timesteps", "2.5"], r"\[0, 1\]"),
    (["--data", "voc"], "needs a directory"),
    (["--data", "imagefolder", "/nonexistent"], "not a directory"),
    (["--num-train", "0", "--data", "digits"], "--num-train must be an integer >= 1"),
    (["--data", "voc", "/x"], "AnalysisInputError: --data 'voc' is not a linear probe dataset"),
    (["--timesteps", "0,3"], "ambiguous: write step:3"),
])
def test_probe_cli_errors_are_one_line(tiny_ckpt, tmp_path, capsys, args, match):
    argv = ["--out", str(tmp_path / "o"), "-q"] + args
    if "--ckpt" not in args:
        argv = ["--ckpt", tiny_ckpt] + argv
    main = segment_main if args == ["--data", "voc"] else probe_main
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    import re
    assert re.search(match, err), err


def test_layer_groups():
    assert layer_groups([1, 2, 3, 4, 5], 10, 100, budget_bytes=2 * 4 * 10 * 100) == [[1, 2], [3, 4], [5]]
    assert layer_groups([3, 7], 10, 100, budget_bytes=1) == [[3], [7]]
    assert layer_groups([1, 2, 3], 10, 100, budget_bytes=1e12) == [[1, 2, 3]]
