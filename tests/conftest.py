import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Run a test module's tiny networks on one intra-op thread: with tensors this
    small, thread hand-offs cost more than they save (badly so on a shared 2-core
    machine, where OpenMP threads spin). Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
