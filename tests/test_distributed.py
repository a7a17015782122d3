"""Devices, process groups and CPU threads (edm2.utils.distributed)."""
import pytest
import torch

from edm2.utils import distributed
from edm2.utils.distributed import configure_threads, default_device, init_distributed, rank_world, resolve_device
from edm2.utils.errors import EDM2Error


def test_single_process_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed() == (0, 1)
    assert rank_world() == (0, 1)
    distributed.shutdown_distributed()  # nothing to leave: no error
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert default_device() == expected
    assert resolve_device(None) == expected
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_cuda_without_index_is_this_processes_gpu(monkeypatch):
    """`--device cuda` names the process's own GPU: torch.cuda.set_device needs an index."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)   # as on a machine with 4 GPUs
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("cuda") == torch.device("cuda", 3)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(EDM2Error, match="device=cuda:4: this process sees 4 GPU"):
        resolve_device("cuda:4")
    monkeypatch.setenv("LOCAL_RANK", "5")
    with pytest.raises(EDM2Error, match=r"device=cuda \(cuda means cuda:LOCAL_RANK = cuda:5\): this process"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(EDM2Error, match="device=cuda: CUDA is not available here"):
        resolve_device("cuda")


def test_configure_threads_order_explicit_env_default(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert configure_threads(2) == 2 and torch.get_num_threads() == 2  # an explicit value wins
    assert configure_threads() == 3 and torch.get_num_threads() == 3   # then OMP_NUM_THREADS
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(distributed, "available_cores", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert configure_threads() == 4                                    # min(cores, 4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert configure_threads() == 2                                    # shared by 2 local processes
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert configure_threads() == 1                                    # never below 1
    monkeypatch.setattr(distributed, "available_cores", lambda: 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert configure_threads() == 2 and torch.get_num_threads() == 2  # few cores: all of them


def test_configure_threads_rejects_bad_values(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "many")
    with pytest.raises(ValueError, match="OMP_NUM_THREADS='many'"):
        configure_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "0")
    with pytest.raises(ValueError, match="OMP_NUM_THREADS=0"):
        configure_threads()
    with pytest.raises(ValueError, match="threads=0"):
        configure_threads(0)
