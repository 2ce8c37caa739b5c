"""Test-wide settings: no hub network calls, deterministic CPU threads, CPU only."""
import os
from pathlib import Path

# The suite is a CPU suite (bit-exact resume, DDP over gloo, numbers compared with CPU recomputations): on a
# GPU machine "auto" devices would pick CUDA and bf16. Hide the GPUs unless REPA_PROBE_TEST_CUDA=1.
if os.environ.get("REPA_PROBE_TEST_CUDA") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see train/__init__.py

import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


import pytest  # noqa: E402


@pytest.fixture
def one_thread():
    """One intra-op thread for tests on tiny tensors (no thread contention on a shared 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def _tiny_run_and_encoder(tmp_path_factory):
    from repa_probe.training import state, trainer
    from repa_probe.training.config import load_config

    out = tmp_path_factory.mktemp("runs")
    built = {}
    real = state.build_encoder

    def recording_build_encoder(cfg, device):
        enc = real(cfg, device)
        built["state"] = {k: v.clone() for k, v in enc.state_dict().items()}
        return enc

    cfg = load_config(None, [f"run.out_dir={out}", "train.steps=2", "train.ckpt_every=1", "train.log_every=1",
                             "data.num_samples=32", "train.batch_size=8", "train.tensorboard=false"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(state, "build_encoder", recording_build_encoder)
        run_dir = trainer.train(cfg)
    return Path(run_dir), built["state"]


@pytest.fixture(scope="session")
def tiny_run(_tiny_run_and_encoder):
    """The suite's one trained run (read it, never write into it): the default tiny config (SiT-S/4, depth 4,
    REPA at block 2 against the random tiny ViT) trained 2 steps on 32 shapes, batch 8; checkpoints
    ``tiny_run / "checkpoints" / "0000001.pt"`` and ``"0000002.pt"`` (labels ``tiny/0000001``, ``tiny/0000002``)."""
    return _tiny_run_and_encoder[0]


@pytest.fixture(scope="session")
def tiny_run_encoder(_tiny_run_and_encoder):
    """The state dict of the target encoder the trainer of :func:`tiny_run` built."""
    return _tiny_run_and_encoder[1]


@pytest.fixture
def free_port() -> int:
    """A TCP port the OS reports free on 127.0.0.1 (for gloo / torchrun rendezvous; never a fixed number, so
    parallel workers and concurrent suites on one machine do not collide)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
