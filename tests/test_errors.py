"""User errors are one line and exit 2; bugs keep their traceback; --debug shows user-error tracebacks."""
import subprocess
import sys

import pytest

from repa_probe import errors
from repa_probe.analysis.errors import AnalysisInputError
from repa_probe.checkpoint import CheckpointError
from repa_probe.data.common import DatasetError
from repa_probe.encoders import EncoderWeightsError
from repa_probe.errors import CLIExit, ReproError, one_line_errors
from repa_probe.training.config import ConfigError


@pytest.mark.parametrize("cls", [ConfigError, CheckpointError, DatasetError, EncoderWeightsError, AnalysisInputError])
def test_project_errors_share_one_base(cls):
    assert issubclass(cls, ReproError)


def test_user_error_is_one_line_exit_2(capsys):
    with pytest.raises(CLIExit) as info:
        with one_line_errors():
            raise ConfigError("unknown key 'trian.lr'; valid keys: train.lr\nsecond line")
    assert info.value.code == errors.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err == "error: ConfigError: unknown key 'trian.lr'; valid keys: train.lr\n"


@pytest.mark.parametrize("exc", [RuntimeError("a bug"), KeyError("x"), ValueError("y"), TypeError("z")])
def test_other_errors_keep_their_traceback(exc):
    with pytest.raises(type(exc)):
        with one_line_errors():
            raise exc


def test_out_of_memory_names_the_options(capsys):
    import torch
    with pytest.raises(CLIExit) as info:
        with one_line_errors():
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert info.value.code == errors.EXIT_OUT_OF_MEMORY
    err = capsys.readouterr().err
    assert "out of memory" in err and "--batch-size" in err and "train.grad_accum" in err
    assert err.count("\n") == 1


def test_debug_logs_the_traceback(caplog, monkeypatch):
    monkeypatch.delenv(errors.DEBUG_ENV, raising=False)
    with caplog.at_level("ERROR", logger="repa_probe"), pytest.raises(CLIExit):
        with one_line_errors(debug=True):
            raise ConfigError("bad")
    assert any(r.exc_info for r in caplog.records)
    caplog.clear()
    monkeypatch.setenv(errors.DEBUG_ENV, "1")
    with caplog.at_level("ERROR", logger="repa_probe"), pytest.raises(CLIExit):
        with one_line_errors():
            raise ConfigError("bad")
    assert any(r.exc_info for r in caplog.records)


def test_cli_config_typo_exits_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "train", "trian.lr=1", f"run.out_dir={tmp_path}"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ConfigError:") and "train" in lines[0]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_train_on_missing_cuda_is_a_one_line_error(tmp_path):
    from repa_probe.devices import DeviceError
    from repa_probe.training import trainer
    from repa_probe.training.config import load_config

    with pytest.raises(DeviceError, match=r"^train.device=cuda: CUDA is not available on this machine; "
                                          r"use train.device=cpu$"):
        trainer.train(load_config(None, [f"run.out_dir={tmp_path}", "train.device=cuda"]))
    assert not list(tmp_path.iterdir())  # nothing written before the check


def test_batch_not_divisible_by_micro_batches_is_a_config_error(tmp_path):
    from repa_probe.training import trainer
    from repa_probe.training.config import load_config

    with pytest.raises(ConfigError, match=r"train.batch_size=10 is not divisible by the 1 process\(es\) x "
                                          r"train.grad_accum=3"):
        trainer.train(load_config(None, [f"run.out_dir={tmp_path}", "train.batch_size=10", "train.grad_accum=3",
                                         "train.device=cpu"]))
