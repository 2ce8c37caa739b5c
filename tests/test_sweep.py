"""Sweeps: config, expansion and skip, launchers (SLURM without a cluster), dry run, end to end on the local
executor with a job killed mid-way, and aggregation of partial results."""
import dataclasses
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from repa_probe.sweeps.aggregate import read_table
from repa_probe.sweeps.config import LauncherConfig, SweepError, load_sweep_config
from repa_probe.sweeps.launch import make_executor, slurm_parameters, submit_and_watch
from repa_probe.sweeps.plan import DONE, Checkpoint, Job, Unit, expand, pending
from repa_probe.sweeps.sweep import run_sweep
from repa_probe.training.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _fake_run(root: Path, name: str, steps=(10, 20)) -> Path:
    d = root / name / "checkpoints"
    d.mkdir(parents=True)
    for s in steps:
        (d / f"{s:07d}.pt").write_bytes(b"")
    return root / name


def _cfg(tmp_path, *over):
    return load_sweep_config(None, [f"sweep.out_dir={tmp_path / 'sw'}", *over])


def test_expansion_groups_shared_work_and_skips_done_units(tmp_path):
    a, b = _fake_run(tmp_path, "a"), _fake_run(tmp_path, "b", (10, 20, 30))
    cfg = _cfg(tmp_path, f"runs=[{a},{b}]", "analyses.alignment={num_samples: 64}", "analyses.probe={}")
    root = tmp_path / "sw" / "sweep"
    jobs = expand(cfg, root)
    align = [j for j in jobs if j.analysis == "alignment"]
    probe = [j for j in jobs if j.analysis == "probe"]
    assert [len(j.units) for j in align] == [2, 3]  # one job per run: shared encoder features
    assert len(probe) == 5 and all(len(j.units) == 1 for j in probe)  # one job per checkpoint
    assert {u.ckpt.label for j in probe for u in j.units} == {"a/0000010", "a/0000020", "b/0000010", "b/0000020",
                                                              "b/0000030"}
    assert len({u.out_dir for j in jobs for u in j.units}) == 10
    assert pending(jobs) == jobs
    # a finished unit: its probe job is skipped, the alignment job of run a keeps one unit to do
    for j in (probe[0], align[0]):
        Path(j.units[0].out_dir).mkdir(parents=True, exist_ok=True)
        (Path(j.units[0].out_dir) / DONE).write_text("{}")
    todo = pending(expand(cfg, root))
    assert len(todo) == len(jobs) - 1 and probe[0].key not in {j.key for j in todo}
    assert sum(not u.done for u in todo[0].units) == 1
    # other options -> other units (results never mixed); force -> everything again, markers gone
    other = expand(_cfg(tmp_path, f"runs=[{a},{b}]", "analyses.probe={num_train: 10}"), root)
    assert not {u.key for j in other for u in j.units} & {u.key for j in probe for u in j.units}
    assert len(pending(jobs, force=True)) == len(jobs)
    assert not (Path(probe[0].units[0].out_dir) / DONE).exists()
    # per-analysis steps and the sweep-wide steps filter
    only = expand(_cfg(tmp_path, f"runs=[{a},{b}]", "analyses.probe={checkpoint_steps: [20]}", "steps=[20,30]"), root)
    assert [u.ckpt.label for j in only for u in j.units] == ["a/0000020", "b/0000020"]


@pytest.mark.parametrize("over, error, match", [
    (["checkpoints=[/nonexistent/*.pt]"], SweepError, "matches no file"),
    (["steps=[999]"], SweepError, "matches no checkpoint"),
    (["analyses.nope={}"], ConfigError, "unknown analysis 'nope'; available: alignment, fid, probe, segment"),
    (["analyses.probe={bogus: 1}"], ConfigError, "unknown option 'analyses.probe.bogus'; valid options"),
    (["launcher.slurm.bogus=1"], ConfigError, "valid keys at launcher.slurm: partition"),
    (["launcher.kind=pbs"], ConfigError, "launcher.kind='pbs' is not one of: local, slurm"),
])
def test_bad_input_is_one_line_error(tmp_path, over, error, match):
    run = _fake_run(tmp_path, "a")
    with pytest.raises(error, match=match) as exc:
        cfg = _cfg(tmp_path, f"runs=[{run}]", "analyses.alignment={}", *over)
        expand(cfg, tmp_path / "sw")
    assert "\n" not in str(exc.value)


def test_slurm_parameters_are_accepted_by_submitit_and_submission_errors(tmp_path, monkeypatch):
    launcher = LauncherConfig(kind="slurm", timeout_min=90)
    launcher.slurm.partition, launcher.slurm.account, launcher.slurm.qos = "gpu", "lab", "high"
    launcher.slurm.mem_gb, launcher.slurm.gpus_per_job, launcher.slurm.array_parallelism = 64, 2, 7
    launcher.slurm.extra = {"exclude": "node12"}
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(SweepError, match="'sbatch' is not on PATH"):
        make_executor(launcher, tmp_path / "logs", "x")
    fake = tmp_path / "bin"  # a login node whose sbatch refuses the job
    fake.mkdir()
    for name, body in (("srun", "exit 0"), ("sbatch", "echo 'sbatch: error: invalid partition specified' >&2; exit 1")):
        (fake / name).write_text(f"#!/bin/sh\n{body}\n")
        (fake / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:/usr/bin:/bin")
    executor = make_executor(launcher, tmp_path / "logs", "x")
    params = executor._executor.parameters  # what submitit will write as #SBATCH lines
    assert params["partition"] == "gpu" and params["account"] == "lab" and params["qos"] == "high"
    assert params["gpus_per_node"] == 2 and params["time"] == 90 and params["array_parallelism"] == 7
    assert params["mem"] == "64GB" and params["additional_parameters"] == {"exclude": "node12"}
    assert slurm_parameters(launcher, "x")["slurm_array_parallelism"] == 7
    cfg = _cfg(tmp_path, f"runs=[{_fake_run(tmp_path, 'a')}]", "analyses.probe={}")
    with pytest.raises(SweepError, match="SLURM submission failed: sbatch: error: invalid partition"):
        submit_and_watch(expand(cfg, tmp_path / "sw"), launcher, tmp_path / "logs", tmp_path / "cache", "x")


def test_dry_run_lists_jobs_and_submits_nothing(tmp_path, capsys):
    from analysis.sweep import main

    run = _fake_run(tmp_path, "a")
    assert main(["--cfg", str(ROOT / "configs/sweep_tiny.yaml"), f"runs=[{run}]", f"sweep.out_dir={tmp_path / 'sw'}",
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "alignment: a/0000010, a/0000020" in out and "probe: a/0000020" in out and "segment: a/0000010" in out
    assert "5 job(s) to submit" in out
    assert not (tmp_path / "sw").exists()
    with pytest.raises(SystemExit) as exc:
        main(["--cfg", str(ROOT / "configs/sweep_tiny.yaml"), "runs=[/nonexistent]", "--dry-run"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: SweepError: runs: /nonexistent has no checkpoints") and "\n" not in err


def test_shipped_sweep_configs_load():
    for name in ("sweep_tiny", "sweep_slurm"):
        cfg = load_sweep_config(str(ROOT / f"configs/{name}.yaml"))
        assert cfg.analyses
    assert load_sweep_config(str(ROOT / "configs/sweep_slurm.yaml")).launcher.kind == "slurm"


# ------------------------------------------------------------------------------- end to end (local executor)
def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _kill_when(path_glob: str, root: Path, stop: threading.Event):
    """SIGKILL the job whose first unit finished, like a node dying: the local job's controller (its pid is the
    job id) and its task process."""
    while not stop.is_set():
        if list(root.glob(path_glob)):
            for log in root.glob("logs/*_0_log.out"):
                pid = int(log.name.split("_")[0])
                for p in _children(pid) + [pid]:
                    os.kill(p, signal.SIGKILL)
            return
        time.sleep(0.05)


@pytest.mark.slow
def test_local_sweep_killed_job_is_retried_and_results_appear_once(tiny_run, tmp_path, capsys):
    over = [f"runs=[{tiny_run}]", f"sweep.out_dir={tmp_path}", "sweep.name=s", "launcher.poll_s=0.3",
            "analyses.alignment={num_samples: 32, timesteps: '0,1', layers: '1,2', batch_size: 32, device: cpu}"]
    cfg = load_sweep_config(None, over)
    root = tmp_path / "s"
    stop = threading.Event()
    killer = threading.Thread(target=_kill_when, args=("units/alignment/*/done.json", root, stop))
    killer.start()
    try:
        first = run_sweep(cfg)
    finally:
        stop.set()
        killer.join()
    # the job died after its first checkpoint: reported with its log, the partial table says what is missing
    assert len(first["failed"]) == 1 and first["failed"][0]["log"].endswith("_0_log.err")
    assert "has not produced any output" in first["failed"][0]["error"]
    summary = json.loads((root / "results/alignment/summary.json").read_text())
    assert summary["done"] == 1 and not summary["complete"]
    assert [m["checkpoint"] for m in summary["missing"]] == ["tiny/0000002"]
    assert summary["missing"][0]["state"] == "failed" and summary["missing"][0]["log"]
    rows = read_table(root / "results/alignment/alignment.csv")
    assert {r["checkpoint"] for r in rows} == {"tiny/0000001"} and len(rows) == 2 * 2  # 2 blocks x 2 timesteps
    assert "--retry-failed" in capsys.readouterr().out
    done_first = next(root.glob("units/alignment/*/done.json"))
    stamp = done_first.stat().st_mtime_ns
    # without --retry-failed the failed job is held back; with it, only the missing checkpoint is computed
    assert run_sweep(cfg)["failed"] and done_first.stat().st_mtime_ns == stamp
    second = run_sweep(cfg, retry_failed=True)
    assert not second["failed"] and second["results"]["alignment"]["complete"]
    assert done_first.stat().st_mtime_ns == stamp  # not recomputed
    rows = read_table(root / "results/alignment/alignment.csv")
    assert sorted(r["checkpoint"] for r in rows) == ["tiny/0000001"] * 4 + ["tiny/0000002"] * 4
    assert {(r["layer"], r["timestep"]) for r in rows} == {(1, 0.0), (1, 1.0), (2, 0.0), (2, 1.0)}
    assert (root / "results/alignment/figures/steps_tiny_t0_cknna.png").is_file()  # alignment vs step
    # a finished sweep submits nothing; a probe added later runs through the same machinery
    assert run_sweep(cfg, dry_run=True)["planned"] == []
    over.append("analyses.probe={num_train: 48, num_test: 24, timesteps: '0.5', layers: '1,2', device: cpu, "
                "checkpoint_steps: [2]}")
    third = run_sweep(load_sweep_config(None, over))
    assert not third["failed"]
    probe = read_table(root / "results/probe/probe.csv")
    assert {(r["checkpoint"], r["layer"], r["metric"]) for r in probe} == {
        ("tiny/0000002", layer, m) for layer in (1, 2) for m in ("top1", "top5")}
    assert (root / "results/probe/figures/probe_tiny_top1.png").is_file()  # probe accuracy vs block per run
    state = json.loads((root / "state.json").read_text())
    assert all(v["state"] == "done" for v in state.values()) and len(state) == 2


def test_preemption_requeues_the_same_job(tmp_path):
    """submitit calls ``checkpoint`` on preemption / time-out: the same units come back, and the requeued job
    skips the ones already done (their markers), so it continues where it stopped."""
    from submitit.helpers import DelayedSubmission

    from repa_probe.sweeps.jobs import SweepJob

    cfg = _cfg(tmp_path, f"runs=[{_fake_run(tmp_path, 'a')}]", "analyses.alignment={}")
    job = expand(cfg, tmp_path / "sw")[0]
    delayed = SweepJob(job, str(tmp_path / "cache")).checkpoint()
    assert isinstance(delayed, DelayedSubmission) and isinstance(delayed.function, SweepJob)
    assert [u.key for u in delayed.function.job.units] == [u.key for u in job.units]
    for u in job.units:  # every unit already done: the requeued job has nothing to compute
        Path(u.out_dir).mkdir(parents=True)
        (Path(u.out_dir) / DONE).write_text("{}")
    assert delayed.function() == {"job": job.key, "ran": []}


def test_progress_table_redraws_in_place_on_a_terminal(tmp_path):
    import io

    from repa_probe.sweeps.launch import ProgressTable, Tracked

    class Tty(io.StringIO):
        def isatty(self):
            return True

    cfg = _cfg(tmp_path, f"runs=[{_fake_run(tmp_path, 'a')}]", "analyses.probe={}")
    tracked = [Tracked(j) for j in expand(cfg, tmp_path / "sw")]
    out = Tty()
    table = ProgressTable(out)
    assert table.update(tracked) and not table.update(tracked)  # nothing changed: nothing drawn
    tracked[0].state, tracked[1].state = "done", "failed"
    assert table.update(tracked)
    text = out.getvalue()
    assert text.count("sweep: 2 pending, 0 running, 0 done, 0 failed") == 1
    assert "\x1b[3F\x1b[J" + "sweep: 0 pending, 0 running, 1 done, 1 failed" in text  # header + 2 job rows
    assert "failed   -              probe: a/0000020" in text


def test_failed_job_error_is_the_remote_error_line():
    from submitit.core.utils import FailedJobError, UncompletedJobError

    from repa_probe.sweeps.launch import error_line

    remote = FailedJobError(
        "Job (task=0) failed during processing with trace:\n----------------------\nTraceback (most recent call "
        "last):\n  File \"x.py\", line 1, in f\n    raise AnalysisInputError('bad')\nrepa_probe.analysis.core.inputs."
        "AnalysisInputError: --timesteps: 'abc' is not a number\n\n----------------------\nYou can check full logs "
        "with 'job.stderr(0)' and 'job.stdout(0)'or at paths:\n  - /logs/1_0_log.err\n  - /logs/1_0_log.out")
    assert error_line(remote) == "AnalysisInputError: --timesteps: 'abc' is not a number"
    killed = UncompletedJobError("Job 7 (task: 0) with path /logs/7_0_result.pkl\nhas not produced any output "
                                 "(state: INTERRUPTED)\nError stream produced:\n----\nsome log line")
    assert error_line(killed) == "job has not produced any output (state: INTERRUPTED)"


def test_aggregate_is_not_redrawn_when_nothing_changed(tmp_path, monkeypatch):
    """A rerun of a finished sweep reuses the gathered table and figures; a changed unit redraws them."""
    import json

    from repa_probe.sweeps import aggregate as agg
    from repa_probe.sweeps.registry import get_analysis

    ckpt = Checkpoint(str(tmp_path / "a.pt"), "run/0000001", "run", 1)
    unit = Unit("alignment", ckpt, "u1", str(tmp_path / "units" / "u1"))
    Path(unit.out_dir).mkdir(parents=True)
    table = Path(unit.out_dir) / "alignment.csv"
    get_analysis("alignment").write_table([dict(checkpoint="run/0000001", step=1, layer=1, timestep=0.5,
                                                metric="cknna", value=0.25, n=8)], table)
    (Path(unit.out_dir) / "done.json").write_text("{}")
    job = Job("j1", "alignment", {"timesteps": "0.5"}, [unit])
    calls = []
    spec = get_analysis("alignment")
    monkeypatch.setattr(agg, "get_analysis", lambda name: dataclasses.replace(
        spec, figures=lambda *a: calls.append(1) or []))
    first = agg.aggregate([job], tmp_path, {})
    again = agg.aggregate([job], tmp_path, {})
    assert len(calls) == 1 and again["alignment"]["done"] == first["alignment"]["done"] == 1
    get_analysis("alignment").write_table([dict(checkpoint="run/0000001", step=1, layer=1, timestep=0.5,
                                                metric="cknna", value=0.5, n=8)], table)
    os.utime(table, ns=(1, 1))  # a different modification time, whatever the clock's resolution
    agg.aggregate([job], tmp_path, {})
    assert len(calls) == 2
    rows = json.loads((tmp_path / "results" / "alignment" / "summary.json").read_text())
    assert rows["checkpoints"] == [dict(label="run/0000001", run="run")]  # the run as the plan named it


def test_fid_options_are_the_fields_of_fid_options():
    """The registry reads the options dataclass (no function signatures): every FidOptions field the sweep
    does not set itself is a valid option, and nothing else."""
    from repa_probe.analysis.generation.options import FidOptions
    from repa_probe.sweeps.registry import RESERVED, SWEEP_OPTIONS, get_analysis

    valid = get_analysis("fid").valid_options()
    assert valid == [f for f in FidOptions.field_names() if f not in RESERVED] + list(SWEEP_OPTIONS)
    assert {"cfg_scale", "inception_weights", "num_samples"} <= set(valid) and "samples" not in valid
    with pytest.raises(ConfigError, match="unknown option 'analyses.fid.entries'"):
        get_analysis("fid").check_options({"entries": 1}, "analyses.fid")
