"""Test-wide settings: no hub network calls, deterministic CPU threads, CPU only."""
import os

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
