import os

import pytest
import torch

from sag.models import load_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-network tests (restored afterwards): on a shared 2-core machine one
    thread is faster than two (no OpenMP contention). Use with ``pytestmark = pytest.mark.usefixtures(...)``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_pixel():
    return load_model("tiny_pixel")


@pytest.fixture(scope="session")
def tiny_pixel_cond():
    return load_model("tiny_pixel_cond")


@pytest.fixture(scope="session")
def tiny_sd():
    return load_model("tiny_sd")


@pytest.fixture(scope="session")
def tiny_main_job(tmp_path_factory):
    """The tiny main job, run once per session (tests/main_job_run.py) and shared by test_main_job, test_evaluate_cli
    and test_notebooks; tests must not write into its dirs (copy what they change)."""
    from main_job_run import run_tiny_main

    return run_tiny_main(tmp_path_factory.mktemp("main") / "main")
