"""The report builder: number formatting, bootstrap intervals of paired differences, findings whose sentences
quote the CSV numbers, LaTeX that parses (and compiles when a TeX binary exists), HTML5 that parses."""
import csv
import re
import shutil
import subprocess

import numpy as np
import pytest

from repa_probe.reports import document as D
from repa_probe.reports import numbers as N
from repa_probe.reports.bootstrap import (difference, interval, read_replicates, resample_means, row_key,
                                          take_replicates, write_replicates)
from repa_probe.reports.findings import find
from repa_probe.reports.html import render_html
from repa_probe.reports.latex import escape
from repa_probe.reports.paper import build_paper, write_report
from repa_probe.reports.selection import ReportChoice, ReportData, ReportError, comparisons
from repa_probe.reports.tables import summary_cells

NUMBER = r"[+-]?\d+(?:\.\d+)?"


def test_numbers_follow_the_interval():
    assert N.fmt(0.47123) == "0.471" and N.fmt(1234.5) == "1234" and N.fmt(0.000123456) == "0.000123"
    assert N.fmt_interval(0.4712, 0.4511, 0.4913) == "0.471 [0.451, 0.491]"
    assert N.fmt_interval(0.4712, 0.4701, 0.4723) == "0.4712 [0.4701, 0.4723]"  # a narrow interval resolves more
    assert N.fmt_interval(1234.5, 1190.2, 1279.9) == "1234 [1190, 1280]"
    assert N.fmt_interval(0.14, 0.11, 0.17, sign=True) == "+0.140 [0.110, 0.170]"
    assert N.fmt(-0.0001, 2) == "0.00" and N.fmt(float("nan")) == "n/a" and N.fmt(None) == "n/a"
    assert N.metric_label("cknna") == "CKNNA" and N.metric_label("fd_tiny_vit") == "FD (tiny_vit)"
    assert N.lower_is_better("fid_inception") and not N.lower_is_better("cknna")


def test_paired_difference_interval_is_narrower_and_keys_survive_the_csv(tmp_path):
    rng = np.random.default_rng(0)
    shared = rng.normal(size=400)  # per-image difficulty shared by both models: pairing removes it
    a, b = shared + 0.10 + 0.05 * rng.normal(size=400), shared + 0.05 * rng.normal(size=400)
    ra, rb = resample_means(a, 300, seed=1), resample_means(b, 300, seed=1)
    d, lo, hi = difference(a.mean(), b.mean(), ra, rb)
    lo_u, hi_u = interval(a.mean() - b.mean(), ra - rng.permutation(rb))  # unpaired replicates
    assert lo > 0 and hi - lo < 0.3 * (hi_u - lo_u) and lo < d < hi
    assert interval(1.0, [1.0]) == (None, None)
    rows = [dict(checkpoint="r/0000040", step=40, layer=2, timestep=0.5, metric="cknna", value=0.4, replicates=ra),
            dict(checkpoint="r/0000040", step=40, layer="target", timestep=None, metric="lds", value=0.1)]
    store = take_replicates(rows)
    assert "replicates" not in rows[0] and list(store) == [row_key(rows[0])]
    path = write_replicates(store, tmp_path / "replicates.npz")
    back = read_replicates([path])
    csv_row = dict(checkpoint="r/0000040", step=40, layer=2, timestep=0.5, metric="cknna")  # as read_table types it
    assert np.allclose(back[row_key(csv_row)][0], ra, atol=1e-6)
    write_replicates({}, path)
    assert not path.exists()  # a rerun without bootstrap leaves no stale replicates


def check_sentences(found: list[dict]) -> None:
    """Every number of each finding's sentence (after "where:") is its ``findings.csv`` value, rounded to the
    decimals printed: a, b, difference and, when there is one, the interval."""
    for r in found:
        texts = re.findall(NUMBER, r["sentence"].split(": ", 2)[-1])
        columns = ("value_a", "value_b", "difference") + (("ci_low", "ci_high") if r["ci_low"] else ())
        assert len(texts) >= len(columns), r["sentence"]
        for text, column in zip(texts, columns):
            places = len(text.split(".")[1]) if "." in text else 0
            assert abs(float(text) - float(r[column])) <= 0.5 * 10 ** -places + 1e-12, (r["sentence"], column)


def _data(effect: float = 0.12) -> ReportData:
    """Two runs and a baseline, two checkpoints each, an alignment table with replicates and an FD table."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=200)
    rows, fid, reps, fid_reps = [], [], {}, {}
    noise = rng.normal(size=200)
    wobble = noise - noise.mean()  # "other" = baseline + zero-mean per-image noise: no effect, an interval around 0
    for k, run in enumerate(("repa", "other", "baseline")):
        shift = {"repa": effect, "other": 0.0, "baseline": 0.0}[run]
        for step in (20, 40):
            for layer in (1, 2, 3):
                for t in (0.0, 0.5):
                    per_image = 0.3 + shift * step / 40 + 0.01 * layer + base + 0.05 * wobble * (run == "other")
                    r = dict(checkpoint=f"{run}/{step:07d}", step=step, layer=layer, timestep=t, metric="cknna",
                             value=float(per_image.mean()), ci_low=None, ci_high=None, n=200)
                    rows.append(r)
                    reps[row_key(r)] = (resample_means(per_image, 100, seed=0), 1.0)
            f = dict(checkpoint=f"{run}/{step:07d}", step=step, metric="fd_tiny_vit", value=10.0 - k - step / 40,
                     num_samples=64)
            fid.append(f)
            fid_reps[row_key(f)] = (f["value"] + rng.normal(scale=0.5, size=100), 1.0)
    run_of = {r["checkpoint"]: r["checkpoint"].split("/")[0] for r in rows}
    return ReportData({"alignment": rows, "fid": fid}, {"alignment": reps, "fid": fid_reps}, run_of,
                      {"repa": 2, "other": 2, "baseline": None}, ["repa", "other", "baseline"])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One paper build shared by the tests below: (data, parts, directory)."""
    root = tmp_path_factory.mktemp("paper")
    data = _data()
    return data, build_paper(ReportChoice(), data, root), root


def test_findings_sentences_quote_the_csv(built):
    data, parts, tmp_path = built
    assert comparisons(ReportChoice(), data) == [("repa", "baseline"), ("other", "baseline")]
    assert comparisons(ReportChoice(pairs=[["other", "repa"]]), data) == [("other", "repa")]
    with pytest.raises(ReportError, match="unknown run 'nope'"):
        ReportChoice(baseline="nope").validate(data.runs)
    with open(tmp_path / "findings.csv", newline="") as f:
        found = list(csv.DictReader(f))
    assert len(found) == 4  # 2 comparisons x (cknna, fd)
    by = {(r["run_a"], r["metric"]): r for r in found}
    assert by[("repa", "cknna")]["resolved"] == "True" and by[("other", "cknna")]["resolved"] == "False"
    assert "unresolved" in by[("other", "cknna")]["sentence"] and by[("repa", "cknna")]["block_a"] == "2"
    check_sentences(found)
    rows = parts.tables[0][1]  # the compact table prints the sentences' numbers
    repa = next(r for r in rows if r["run"] == "repa")
    assert repa["CKNNA"] in by[("repa", "cknna")]["sentence"]
    assert repa["block"] == 2 and len(parts.figures) == 2  # the heatmap and CKNNA (+ FD) vs step


def test_best_block_and_pairs_choose_what_is_compared():
    data = _data()
    data.tables.pop("fid")
    found = find(ReportChoice(block="best", pairs=[["other", "repa"]]), data)
    assert [(f.a.run, f.b.run, f.block) for f in found] == [("other", "repa", "best")]
    assert found[0].a.row["layer"] == found[0].b.row["layer"] == 3  # the highest CKNNA of both runs
    assert "at the best block (3 vs 3), t = 0.5, step 40" in found[0].sentence() and found[0].resolved is True
    assert find(ReportChoice(block="1", timestep=0.1), data)[0].where() == "at block 1, t = 0, step 40"


def test_imagenet_study_shape_each_pair_at_its_own_repa_block():
    """configs/study_imagenet.yaml: B/2 aligned at block 4, XL/2 at block 8, each compared with its own baseline;
    the compact table shows each baseline at its pair's block."""
    rows = [dict(checkpoint=f"{run}/0400000", step=400000, layer=layer, timestep=0.5, metric="cknna",
                 value=0.1 * layer + (0.05 if run.startswith("repa") else 0.0))
            for run in ("repa_b2", "b2", "repa_xl", "xl") for layer in range(1, 9)]
    data = ReportData({"alignment": rows}, {}, {r["checkpoint"]: r["checkpoint"].split("/")[0] for r in rows},
                      {"repa_b2": 4, "b2": None, "repa_xl": 8, "xl": None}, ["repa_b2", "b2", "repa_xl", "xl"])
    choice = ReportChoice(pairs=[["repa_b2", "b2"], ["repa_xl", "xl"]])
    found = find(choice, data)
    assert [(f.a.run, f.b.run, f.block) for f in found] == [("repa_b2", "b2", 4), ("repa_xl", "xl", 8)]
    assert all(f.resolved is None and "no interval" in f.sentence() for f in found)  # no replicates stored
    cells = {e["run"]: e["block"] for e in summary_cells(choice, data)}
    assert cells == {"repa_b2": 4, "b2": 4, "repa_xl": 8, "xl": 8}


def test_latex_fragment_parses_and_compiles(built):
    from pylatexenc.latexwalker import LatexEnvironmentNode, LatexWalker  # the dev extra: this check always runs

    _, parts, tmp_path = built
    blocks = [D.heading("Study 1 & 2", 1), D.heading("Findings")] + parts.findings + parts.tables + parts.figures
    paths = write_report(blocks, blocks, tmp_path)
    tex = (tmp_path / "report.tex").read_text()
    nodes, _, _ = LatexWalker(tex, tolerant_parsing=False).get_latex_nodes()
    envs = [n.environmentname for n in nodes if isinstance(n, LatexEnvironmentNode)]
    assert envs.count("table") == 2 and "itemize" in envs and {"figure", "figure*"} & set(envs)
    for rel in re.findall(r"\\(?:input|includegraphics(?:\[[^]]*\])?)\{\\reportdir/([^}]+)\}", tex):
        assert (tmp_path / rel).is_file(), rel
    table = (tmp_path / "tables" / "summary.tex").read_text()
    assert "\\toprule" in table and "\\bottomrule" in table and "FD (tiny\\_vit)" in table
    LatexWalker(table, tolerant_parsing=False).get_latex_nodes()
    assert escape("a_b & 50% −0.1 × -2") == r"a\_b \& 50\% $-$0.1 $\times$ $-$2"
    assert tmp_path / "report.html" in paths
    if shutil.which("pdflatex") is None:
        pytest.skip("no pdflatex: structure checked with pylatexenc only")
    (tmp_path / "paper.tex").write_text("\\documentclass{article}\\usepackage{booktabs,graphicx}\\begin{document}"
                                        "\\input{report.tex}\\end{document}\n")
    run = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "paper.tex"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:]


def test_html_is_one_parseable_file_with_contents(built):
    import html5lib  # the dev extra
    parts = built[1]
    blocks = [D.heading("Study <1>", 1), D.para("intro `code`"), D.heading("Findings")] + parts.findings + \
        [D.heading("Results")] + parts.tables + [D.heading("Figures")] + parts.figures
    page = render_html(blocks)
    parser = html5lib.HTMLParser(strict=True, namespaceHTMLElements=False)
    tree = parser.parse(page)
    links = [a.get("href") for a in tree.iter("a")]
    ids = {e.get("id") for e in tree.iter() if e.get("id")}
    assert links == ["#findings", "#results", "#figures"] and all(h[1:] in ids for h in links)
    imgs = [i.get("src") for i in tree.iter("img")]
    assert len(imgs) == len(parts.figures) and all(s.startswith("data:image/png;base64,") for s in imgs)
    order = [e.get("id") or e.get("class") for e in tree.iter() if e.get("id") or e.get("class") == "finding"]
    assert order.index("finding") < order.index("results")  # findings at the top, before the tables
