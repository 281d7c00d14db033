"""Settings shared by the whole test suite."""

import os

import torch


def pytest_configure(config):
    """Run every test, and the processes tests start, on one intra-op thread.

    The models of the tests have tens to thousands of parameters: their products are
    far too small to split across threads, and on a machine whose cores are busy
    PyTorch's worker threads wait for each other, which made some tests ten times
    slower. Subprocesses (the DDP tests) inherit the limit through the environment.
    """
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
