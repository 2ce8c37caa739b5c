"""The study: train tiny runs with and without REPA, sweep the analyses, write report.md and report.html."""
import csv
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from repa_probe.sweeps.study import load_study_config, run_study
from repa_probe.training.config import ConfigError
from test_reports import check_sentences  # tests/ is on sys.path (rootdir conftest)

ROOT = Path(__file__).resolve().parents[1]


def check_report(root: Path, md: str) -> None:
    """The tiny study's report: findings first, sentences quoting findings.csv, at most 10 figures before the
    appendix (per-run duplicates after it), a LaTeX fragment that parses (and compiles with pdflatex when
    installed), one HTML5 file with every figure inline."""
    import html5lib
    from pylatexenc.latexwalker import LatexWalker

    with open(root / "findings.csv", newline="") as f:
        found = list(csv.DictReader(f))
    assert {(r["run_a"], r["run_b"]) for r in found} == {("repa", "baseline"), ("irepa", "baseline")}
    assert {r["metric"] for r in found} == {"cknna", "lds", "cds", "rmsc", "top1", "top5", "fd_tiny_vit"}
    assert all(r["ci_low"] != "" and int(r["replicates"]) >= 50 for r in found)  # every finding has its interval
    check_sentences(found)
    findings = md[md.index("## Findings"):md.index("## Results at a glance")]
    assert md.index("## Findings") < md.index("## What was run")
    for r in found:
        assert f"- {r['sentence']}" in findings
        assert ("unresolved" in r["sentence"]) == (r["resolved"] == "False")
    main, appendix = md.split("## Appendix")
    figures = [line for line in md.splitlines() if line.startswith("![")]
    assert 1 <= sum(line.startswith("![") for line in main.splitlines()) <= 10
    assert any("heatmap-cknna" in f for f in figures) and any("cknna-vs-step" in f for f in figures)
    assert any("probe-top1-vs-block" in f for f in figures) and any("scatter-cknna" in f for f in figures)
    assert "steps_repa" in appendix and "probe_" in appendix and "fid_vs_step" in appendix
    for f in figures:
        png = root / f.split("](")[1][:-1]
        assert png.is_file() and (png.suffix != ".png" or png.with_suffix(".pdf").is_file() or "sweep" in str(png))
    tex = (root / "report.tex").read_text()
    LatexWalker(tex, tolerant_parsing=False).get_latex_nodes()
    assert tex.count("\\includegraphics") == sum(line.startswith("![") for line in main.splitlines())
    if shutil.which("pdflatex"):
        (root / "paper.tex").write_text("\\documentclass{article}\\usepackage{booktabs,graphicx}\\begin{document}"
                                        "\\input{report.tex}\\end{document}\n")
        run = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "paper.tex"], cwd=root,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stdout[-3000:]
    page = (root / "report.html").read_text()
    tree = html5lib.HTMLParser(strict=True, namespaceHTMLElements=False).parse(page)
    assert len([i for i in tree.iter("img")]) == len(figures) and page.count("data:image/png;base64,") == len(figures)
    assert [a.get("href") for a in tree.iter("a")][0] == "#findings"


def test_shipped_study_configs_load():
    tiny = load_study_config(str(ROOT / "configs/study_tiny.yaml"))
    assert set(tiny.train.runs) == {"repa", "irepa", "baseline"} and tiny.launcher.kind == "local"
    assert set(tiny.analyses) == {"alignment", "probe", "fid"} and len(tiny.correlations) == 2
    big = load_study_config(str(ROOT / "configs/study_imagenet.yaml"))
    assert big.launcher.kind == "slurm" and len(big.train.runs) == 4


def test_report_section_is_validated():
    cfg = load_study_config(str(ROOT / "configs/study_tiny.yaml"), ["report.pairs=[[irepa,repa]]", "report.block=3"])
    assert cfg.report.pairs == [["irepa", "repa"]] and cfg.report.block == "3"
    assert load_study_config(str(ROOT / "configs/study_imagenet.yaml")).report.pairs[0] == ["repa_sit_b2", "sit_b2"]
    for override, match in (("report.baseline=nope", "unknown run 'nope'"), ("report.block=top", "repa, best or"),
                             ("report.pairs=[[repa]]", r"\[\[run_a, run_b\], ...\]")):
        with pytest.raises(ConfigError, match=match):
            load_study_config(str(ROOT / "configs/study_tiny.yaml"), [override])


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
    check_report(root, md)
    assert "## What was run" in md and "| repa | SiT-S/4 | 2 | 64 | 8 |" in md and "| baseline |" in md
    assert "### alignment" in md and "6/6 units (complete)" in md and "### probe" in md and "3/3 units" in md
    assert "### fid" in md and "## Correlations across checkpoints" in md
    assert md.count(" | pearson | 3 | ") == 2  # both correlations over the three final checkpoints
    best = (root / "tables" / "best-alignment.csv").read_text()  # the per-checkpoint tables: CSVs, linked
    for ckpt in ("repa/0000004", "repa/0000008", "irepa/0000008", "baseline/0000004", "baseline/0000008"):
        assert f"{ckpt}," in best
    assert "tables/best-alignment.csv" in md
    assert json.loads((root / "study.json").read_text())["runs"]["baseline"]["proj_coeff"] == 0.0
    # rerun: nothing trained or computed again, no figure redrawn
    drawn = (root / "figures" / "heatmap-cknna.pdf").stat().st_mtime_ns
    again = run_study(cfg, command="pytest")
    assert all(r["trained"] == "existing" for r in again["runs"].values())
    assert (root / "figures" / "heatmap-cknna.pdf").stat().st_mtime_ns == drawn and (root / "report.tex").is_file()
    assert not again["sweep"]["failed"]
