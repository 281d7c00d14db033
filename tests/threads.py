"""One intra-op thread for tests on tiny models.

Products on models of tens of parameters are far too small to split across
threads; on a machine whose cores are shared, PyTorch's worker threads then wait
for each other and a measurement takes ten times longer than with one thread.
"""

import pytest
import torch


@pytest.fixture
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
