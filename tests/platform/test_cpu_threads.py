"""The CPU thread policy: 1 thread for small models, free cores for big ones, never over the user's choice."""

import pytest
import torch

from hayabusa.engine.loading.config import PRESETS
from hayabusa.engine.platform import cpu_threads
from hayabusa.engine.platform.machine_load import MachineLoad


@pytest.fixture(autouse=True)
def restore_threads(monkeypatch):
    threads = torch.get_num_threads()
    for name in cpu_threads.THREAD_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cpu_threads, "TORCH_THREADS_AT_IMPORT", threads)
    monkeypatch.setattr(cpu_threads, "_applied", [])
    yield
    torch.set_num_threads(threads)


def fake_load(monkeypatch, other_busy_cpus):
    monkeypatch.setattr(cpu_threads, "measure_machine_load",
                        lambda: MachineLoad(cpus=8, loadavg_1m=None, other_busy_cpus=other_busy_cpus,
                                            busiest_processes=[]))


def test_small_models_get_one_thread(monkeypatch):
    fake_load(monkeypatch, 0.0)
    assert cpu_threads.model_weight_bytes(PRESETS["small"], torch.float32) < cpu_threads.SMALL_MODEL_BYTES
    choice = cpu_threads.apply_cpu_threads(PRESETS["tiny"], torch.float32)
    assert choice.threads == 1 == torch.get_num_threads() and "MiB" in choice.reason
    # the engine's own earlier choice is not mistaken for the user's: a big model gets the cores back
    assert cpu_threads.choose_cpu_threads(PRESETS["2.7b"], torch.float32).threads >= 1
    assert "set by" not in cpu_threads.choose_cpu_threads(PRESETS["2.7b"], torch.float32).reason


@pytest.mark.parametrize(("other_busy", "expected"), [(0.0, 4), (1.4, 3), (3.6, 1), (None, 4)])
def test_big_models_get_the_cores_other_processes_leave(monkeypatch, other_busy, expected):
    monkeypatch.setattr(cpu_threads, "TORCH_THREADS_AT_IMPORT", 4)
    torch.set_num_threads(4)
    fake_load(monkeypatch, other_busy)
    assert cpu_threads.model_weight_bytes(PRESETS["2.7b"], torch.bfloat16) > 5e9
    assert cpu_threads.choose_cpu_threads(PRESETS["2.7b"], torch.bfloat16).threads == expected


def test_the_users_choice_stands(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    choice = cpu_threads.apply_cpu_threads(PRESETS["tiny"], torch.float32)
    assert choice.threads == torch.get_num_threads() and "OMP_NUM_THREADS=3" in choice.reason
    monkeypatch.delenv("OMP_NUM_THREADS")
    torch.set_num_threads(cpu_threads.TORCH_THREADS_AT_IMPORT + 1)  # the user's own call
    choice = cpu_threads.apply_cpu_threads(PRESETS["tiny"], torch.float32)
    assert choice.threads == cpu_threads.TORCH_THREADS_AT_IMPORT + 1 and "torch.set_num_threads" in choice.reason
