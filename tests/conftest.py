"""Suite-wide settings."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """The test models are tiny: intra-op threads buy nothing, and on a shared 2-core machine every
    OpenMP barrier can cost a scheduler slice (a 3-block forward + backward took 2 s with 2 threads under
    load, 20 ms with 1). Nothing in the suite asserts on time."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
