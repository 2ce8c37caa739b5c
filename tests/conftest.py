"""Test-wide settings: no hub network calls, deterministic CPU threads."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see train/__init__.py

import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))
