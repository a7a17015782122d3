import os

import pytest
import torch

from edm2.utils.distributed import configure_threads


def pytest_configure(config):
    """The commands' CPU thread count for the whole suite: $OMP_NUM_THREADS when
    set, else min(available cores, 4) (`configure_threads`; docs/reliability.md),
    instead of PyTorch's one thread per core."""
    configure_threads()


@pytest.fixture(scope="module")
def one_thread():
    """Run a test module's tiny networks on one intra-op thread: with tensors this
    small, thread hand-offs cost more than they save (badly so on a shared 2-core
    machine, where OpenMP threads spin). Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`. OMP_NUM_THREADS=1 keeps
    the CLI commands, which call `edm2.utils.distributed.configure_threads()`, at one
    thread as well."""
    old, old_env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(old)
    if old_env is None:
        del os.environ["OMP_NUM_THREADS"]
    else:
        os.environ["OMP_NUM_THREADS"] = old_env


@pytest.fixture(autouse=True)
def keep_thread_count():
    """A CLI command run in-process sets torch's thread count for the process
    (`configure_threads`); give the next test the count it had before."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# --- data and metrics ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def image_dataset(tmp_path_factory):
    """A small labelled image dataset folder (`helpers.make_dataset`: 24 grayscale 16x16
    images of 4 classes, dataset.json labels). Shared by the whole session: read it, never change it."""
    from helpers import make_dataset

    return make_dataset(tmp_path_factory.mktemp("image_dataset") / "data")


@pytest.fixture(scope="session")
def tiny_snapshot(tmp_path_factory):
    """An unconditional snapshot of the `tiny` preset (16x16 grayscale) with non-zero
    gains (`helpers.write_snapshot`). Shared by the whole session: read it, never change it."""
    from helpers import write_snapshot

    return write_snapshot(tmp_path_factory.mktemp("tiny_snapshot") / "net.safetensors", label_dim=0)


@pytest.fixture(scope="session")
def ema_run(tmp_path_factory):
    """A fake training run folder of EMA snapshots (`helpers.write_ema_run`: times 64, 128,
    192; sigma_rel 0.05 and 0.10; run id 'aaaa1111'). Shared by the whole session: read it,
    never change it."""
    from helpers import write_ema_run

    return write_ema_run(tmp_path_factory.mktemp("ema_run") / "run", run_id="aaaa1111")
