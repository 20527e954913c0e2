import os

import pytest
import torch

from sag.models import load_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_pixel():
    return load_model("tiny_pixel")


@pytest.fixture(scope="session")
def tiny_pixel_cond():
    return load_model("tiny_pixel_cond")


@pytest.fixture(scope="session")
def tiny_sd():
    return load_model("tiny_sd")
