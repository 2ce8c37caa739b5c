"""`analysis.correlate`: recovering a known correlation from synthetic result tables, and its bad input."""
import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr

from analysis.correlate import main
from repa_probe.analysis.errors import AnalysisInputError
from repa_probe.analysis.correlation.correlate import (Quantity, correlate_table, correlation, load_tables,
                                           parse_quantity)

ALIGN_COLS = ("checkpoint", "step", "layer", "timestep", "metric", "value", "ci_low", "ci_high", "n")
FID_COLS = ("checkpoint", "run", "step", "metric", "value", "num_samples", "method", "steps", "cfg_scale", "guidance_low",
            "guidance_high", "seed")


def _write(path: Path, cols, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in cols})
    return path


def _describe(folder: Path, run: str, rows) -> None:
    """The ``summary.json`` an analysis writes beside its table: each checkpoint's label and run."""
    labels = dict.fromkeys(r["checkpoint"] for r in rows)
    (folder / "summary.json").write_text(json.dumps({"checkpoints": [dict(label=c, run=run) for c in labels]}))


def make_runs(root: Path, rho: float = -0.8, runs: int = 4, per_run: int = 15, timesteps=(0.0, 0.5), seed: int = 0):
    """Runs whose fid_inception has correlation ``rho`` with cknna@block2,t=0.5 (other layers / t are noise).

    Returns the true x and y arrays in table order."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for r in range(runs):
        align, fid = [], []
        target_lds = 0.1 + 0.1 * r
        for i in range(per_run):
            ck, step = f"run{r}/{(i + 1) * 100:07d}", (i + 1) * 100
            x = rng.normal()
            y = rho * x + np.sqrt(1 - rho ** 2) * rng.normal()
            xs.append(x), ys.append(y)
            for t in timesteps:
                for layer in (1, 2, 3):
                    v = x if (layer == 2 and t == 0.5) else rng.normal()
                    align.append(dict(checkpoint=ck, step=step, layer=layer, timestep=t, metric="cknna", value=v, n=64))
            align.append(dict(checkpoint=ck, step=step, layer="target", metric="lds", value=target_lds, n=64))
            fid.append(dict(checkpoint=ck, step=step, metric="fid_inception", value=20 + 5 * y, num_samples=1000))
        _write(root / f"run{r}" / "alignment" / "alignment.csv", ALIGN_COLS, align)
        _describe(root / f"run{r}" / "alignment", f"run{r}", align)
        _write(root / f"run{r}" / "fid" / "fid.csv", FID_COLS, [dict(f, run=f"run{r}") for f in fid])
    return np.array(xs), np.array(ys)


def test_parse_quantity():
    assert parse_quantity("cknna@block8,t=0.5") == Quantity("cknna", 8, 0.5)
    assert parse_quantity("cknna@8, t=0") == Quantity("cknna", 8, 0.0)
    assert parse_quantity("cknna@best,t=0.5") == Quantity("cknna", "best", 0.5)
    assert parse_quantity("lds@target") == Quantity("lds", "target", None)
    assert parse_quantity("fid_inception") == Quantity("fid_inception")
    for bad in ("cknna@layer", "cknna,t=x", "", "a b"):
        with pytest.raises(AnalysisInputError):
            parse_quantity(bad)


def test_statistics_match_scipy():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=20), rng.normal(size=20)
    y = y + 0.5 * x
    s = correlation(x, y, bootstrap=100, permutations=200)
    assert s["pearson"]["r"] == pytest.approx(pearsonr(x, y)[0], abs=1e-12)
    assert s["spearman"]["r"] == pytest.approx(spearmanr(x, y)[0], abs=1e-12)
    ind = correlation(rng.normal(size=30), rng.normal(size=30), bootstrap=0, permutations=999)
    assert ind["pearson"]["p_perm"] > 0.05 and ind["pearson"]["ci_low"] is None


def test_recovers_a_known_correlation_with_covering_intervals(tmp_path):
    x, y = make_runs(tmp_path, rho=-0.8)
    points, stats = correlate_table(load_tables([tmp_path]), "cknna@block2,t=0.5", "fid_inception",
                                    bootstrap=2000, permutations=2000)
    assert stats["n"] == 60 and stats["runs"] == 4
    assert stats["pearson"]["r"] == pytest.approx(pearsonr(x, y)[0], abs=1e-9)   # fid is affine in y
    for name in ("pearson", "spearman"):
        s = stats[name]
        assert s["ci_low"] < s["r"] < s["ci_high"]
        assert s["ci_low"] <= -0.8 <= s["ci_high"] and s["ci_high"] < 0          # covers the truth, excludes 0
        assert s["p_perm"] < 0.01
    # a layer that is pure noise gives an interval that covers 0
    _, noise = correlate_table(load_tables([tmp_path]), "cknna@block1,t=0.5", "fid_inception", bootstrap=500,
                               permutations=500)
    assert noise["pearson"]["ci_low"] < 0 < noise["pearson"]["ci_high"]


def test_best_layer_target_and_last_only(tmp_path):
    make_runs(tmp_path, runs=3, per_run=4)
    df = load_tables([tmp_path])
    points, stats = correlate_table(df, "lds@target", "fid_inception", last_only=True, bootstrap=50, permutations=50)
    assert len(points) == 3 and list(points["step"]) == [400, 400, 400]
    assert list(points["x"]) == pytest.approx([0.1, 0.2, 0.3])
    best, _ = correlate_table(df, "cknna@best,t=0", "fid_inception", bootstrap=0, permutations=0)
    rows = df[(df.metric == "cknna") & (df.timestep == 0)]
    assert list(best.sort_values("checkpoint")["x"]) == list(rows.groupby("checkpoint")["value"].max())


def test_cli_writes_csv_json_and_figures(tmp_path, capsys):
    make_runs(tmp_path / "t", runs=2, per_run=5)
    out = tmp_path / "out"
    assert main(["--tables", str(tmp_path / "t" / "*" / "*" / "*.csv"), "--x", "cknna@block2,t=0.5", "--y",
                 "fid_inception", "--out", str(out), "--bootstrap", "200", "--permutations", "200"]) == 0
    assert "r = " in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 10 and set(summary["pearson"]) == {"r", "ci_low", "ci_high", "p_perm"}
    assert (out / "correlation.csv").read_text().splitlines()[0] == "run,checkpoint,step,x,y"
    figs = {Path(p).name for p in summary["files"]["figures"]}
    assert {"scatter_cknna_block2_t_0.5_vs_fid_inception.pdf", "steps_cknna_block2_t_0.5_vs_fid_inception.png"} <= figs
    assert all((out / p).stat().st_size > 0 for p in summary["files"]["figures"])
    assert "| pearson | 10 |" in (out / "report.md").read_text()


def _one_line_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_input(tmp_path, capsys):
    make_runs(tmp_path, runs=2, per_run=3)
    base = ["--tables", str(tmp_path), "--out", str(tmp_path / "o")]
    err = _one_line_error(capsys, base + ["--x", "ckna@block2,t=0.5", "--y", "fid_inception"])
    assert "unknown metric 'ckna'" in err and "cknna@block1..3|best,t=0|0.5" in err and "lds@target" in err
    err = _one_line_error(capsys, base + ["--x", "cknna@block9,t=0.5", "--y", "fid_inception"])
    assert "not in the tables" in err and "cknna@block1..3" in err
    err = _one_line_error(capsys, base + ["--x", "cknna@block2,t=0.5", "--y", "fd_dinov2_vitl14"])
    assert "fid_inception" in err
    assert "add @blockN" in _one_line_error(capsys, base + ["--x", "cknna", "--y", "fid_inception"])
    assert "give a timestep" in _one_line_error(capsys, base + ["--x", "cknna@2", "--y", "fid_inception"])
    err = _one_line_error(capsys, base + ["--x", "lds@target", "--y", "fid_inception", "--last-only"])
    assert "only 2 checkpoint(s)" in err and "no correlation" in err
    assert not (tmp_path / "o" / "summary.json").exists()
    _write(tmp_path / "extra" / "fid.csv", FID_COLS, [dict(checkpoint="run0/0000100", step=100, metric="fid_inception",
                                                           value=99.0)])
    err = _one_line_error(capsys, base + ["--x", "cknna@block2,t=0.5", "--y", "fid_inception"])
    assert "run0/0000100 has 2 different values" in err
    assert "no such file" in _one_line_error(capsys, ["--tables", str(tmp_path / "nope"), "--x", "a", "--y", "b",
                                                      "--out", str(tmp_path / "o")])


def test_different_timesteps_join_on_shared_ones_with_a_warning(tmp_path, caplog):
    make_runs(tmp_path / "a", runs=2, per_run=4, timesteps=(0.0, 0.5), seed=1)
    make_runs(tmp_path / "b", runs=1, per_run=4, timesteps=(0.5, 1.0), seed=2)
    (tmp_path / "b" / "run0").rename(tmp_path / "b" / "run9")
    df = load_tables([tmp_path])
    df.loc[df.file.str.contains("/b/"), "checkpoint"] = df.checkpoint.str.replace("run0", "run9")
    with caplog.at_level(logging.WARNING, logger="repa_probe"):
        points, stats = correlate_table(df, "cknna@block2", "fid_inception", bootstrap=0, permutations=0)
    assert stats["n"] == 12                                  # t = 0.5, the only shared timestep, in all 3 runs
    assert "different timesteps; shared: 0.5" in caplog.text
    with caplog.at_level(logging.WARNING, logger="repa_probe"):
        points, stats = correlate_table(df, "cknna@block2,t=0", "fid_inception", bootstrap=0, permutations=0)
    assert stats["n"] == 8 and "t=0 is missing from" in caplog.text


def test_constant_quantity_warns_that_the_correlation_is_undefined(caplog):
    import pandas as pd

    from repa_probe.analysis.correlation.correlate import correlate_table

    rows = [dict(checkpoint=f"r{k}/{s}", run=f"r{k}", step=s, layer="target", timestep=None, metric="lds", value=0.5)
            for k in range(2) for s in (1, 2)]
    rows += [dict(checkpoint=f"r{k}/{s}", run=f"r{k}", step=s, layer=None, timestep=None, metric="fd_x",
                  value=float(k + s)) for k in range(2) for s in (1, 2)]
    with caplog.at_level("WARNING", logger="repa_probe"):
        _, stats = correlate_table(pd.DataFrame(rows), "lds@target", "fd_x", bootstrap=0, permutations=0)
    assert any("same value (0.5) at every checkpoint" in w for w in stats["warnings"])


def _alignment_table_with_settings(folder: Path, num_samples: int, values, encoder: str = "enc", seed: int = 0):
    """alignment.csv of checkpoints a/1..a/4 (blocks 1, 2 at t = 0.5) with options.json / summary.json."""
    rows = [dict(checkpoint=f"a/{i}", step=i, layer=layer, timestep=0.5, metric="cknna", value=v[layer - 1], n=num_samples)
            for i, v in enumerate(values, 1) for layer in (1, 2)]
    _write(folder / "alignment.csv", ALIGN_COLS, rows)
    (folder / "options.json").write_text(json.dumps(dict(num_samples=num_samples, seed=seed, timesteps=[0.5])))
    (folder / "summary.json").write_text(json.dumps(dict(settings=dict(num_samples=num_samples),
                                                         encoder=dict(name=encoder))))


def test_tables_of_different_settings_are_refused_for_every_layer_choice(tmp_path, capsys):
    """Issue 21 item 1: two alignments of the same checkpoints (N = 64 and N = 32) under one --tables folder;
    @best took the best block over both tables and flipped the sign of r without a word."""
    _alignment_table_with_settings(tmp_path / "cor" / "align", 64, [(0.1, 0.2), (0.2, 0.3), (0.3, 0.4), (0.4, 0.5)])
    _alignment_table_with_settings(tmp_path / "cor" / "align_n32", 32, [(0.9, 0.1), (0.7, 0.1), (0.5, 0.1), (0.3, 0.1)])
    _write(tmp_path / "cor" / "fid" / "fid.csv", FID_COLS,
           [dict(checkpoint=f"a/{i}", step=i, metric="fid_inception", value=10.0 * i) for i in range(1, 5)])
    for x in ("cknna@best,t=0.5", "cknna@block2,t=0.5"):
        err = _one_line_error(capsys, ["--tables", str(tmp_path / "cor"), "--x", x, "--y", "fid_inception",
                                       "--out", str(tmp_path / "o")])
        assert "share checkpoint a/1" in err and "num_samples 64 vs 32" in err and "one setting" in err, err
    assert not (tmp_path / "o").exists()
    # the same conflict without settings files: the values disagree, refused before @best picks a winner
    for name in ("options.json", "summary.json"):
        (tmp_path / "cor" / "align_n32" / name).unlink()
    err = _one_line_error(capsys, ["--tables", str(tmp_path / "cor"), "--x", "cknna@best,t=0.5", "--y",
                                   "fid_inception", "--out", str(tmp_path / "o")])
    assert "checkpoint a/1 has 2 different values" in err, err


def test_tables_of_different_checkpoints_need_the_same_n_and_seed_but_not_the_same_encoder(tmp_path, capsys):
    _alignment_table_with_settings(tmp_path / "r1", 64, [(0.1, 0.2), (0.2, 0.3)], encoder="dinov2")
    _alignment_table_with_settings(tmp_path / "r2", 64, [(0.1, 0.2), (0.2, 0.3)], encoder="mae")
    df = load_tables([tmp_path / "r1", tmp_path / "r2"])
    df.loc[df.file.str.contains("r2"), "checkpoint"] = df.checkpoint.str.replace("a/", "b/")
    from repa_probe.analysis.correlation.correlate import check_settings

    check_settings(df)  # iREPA's figure: runs with different target encoders
    (tmp_path / "r2" / "options.json").write_text(json.dumps(dict(num_samples=64, seed=3)))
    with pytest.raises(AnalysisInputError, match="hold different checkpoints.*seed 0 vs 3"):
        check_settings(df)


def test_a_second_correlation_into_the_same_out_removes_the_first_ones_figures(tmp_path, caplog):
    make_runs(tmp_path / "t", runs=2, per_run=3)
    out = tmp_path / "o"
    base = ["--tables", str(tmp_path / "t"), "--y", "fid_inception", "--out", str(out), "--bootstrap", "0",
            "--permutations", "0"]
    assert main(base + ["--x", "cknna@block2,t=0.5"]) == 0
    first = set(json.loads((out / "summary.json").read_text())["files"]["figures"])
    with caplog.at_level(logging.WARNING, logger="repa_probe"):
        assert main(base + ["--x", "cknna@block1,t=0"]) == 0
    now = {str(p.relative_to(out)) for p in (out / "figures").rglob("*") if p.is_file()}
    assert now == set(json.loads((out / "summary.json").read_text())["files"]["figures"]) and not first & now
    assert "held the outputs of an earlier correlation; removed correlation.csv" in caplog.text
    assert not (out / "INCOMPLETE").exists()
