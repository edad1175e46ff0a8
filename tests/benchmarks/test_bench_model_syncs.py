"""Host-sync counting (benchmarks/host_syncs.py) and bench_model.py's syncs mode on a tiny model."""
import argparse
import importlib.util
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCHMARKS = os.path.join(ROOT, "benchmarks")
TINY = ["model.backbone=resnet18", "model.hidden_dim=64", "model.nheads=4", "model.enc_layers=1",
        "model.dec_layers=2", "model.dim_feedforward=64", "model.num_queries=12", "model.enc_n_points=2",
        "model.dec_n_points=2"]


def load(name):
    if BENCHMARKS not in sys.path:
        sys.path.insert(0, BENCHMARKS)
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCHMARKS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def host_syncs():
    return load("host_syncs")


def test_emulation_counts_what_a_gpu_would_wait_for(host_syncs):
    weight = torch.nn.Parameter(torch.randn(6))  # parameters live on the device
    with host_syncs.HostSyncCounter(emulate=True) as counter:
        x = weight * 2
        with counter.phase("a"):
            x.sum().item()                                   # item
            bool((x > 0).any())                              # item
            torch.tensor([1, 2], device=x.device).tolist()   # to_device (data copied up), to_host
            host = x.detach().cpu()                          # to_host; host from here on
            host.numpy(), host.tolist(), int(host[0])        # nothing: already on the host
        with counter.phase("b"):
            x[x > 0]                                         # data_dependent
            index = torch.as_tensor(np.array([0, 1]))        # host: no device argument
            int(index.sum()), index.tolist()                 # nothing
            x[index]                                         # to_device (the index is copied up)
            moved = index.to(x.device)                       # to_device
            moved.tolist()                                   # to_host
            index.tolist()                                   # nothing: the source stays on the host
            torch.zeros(3).tolist()                          # nothing: made on the host
            torch.zeros(2, device="cpu").tolist()            # nothing: the string "cpu" is the host
            x.to(torch.float64)                              # nothing: a dtype change
            labels = (x.detach().abs() * 10).long() % 3      # device
            torch.nn.functional.one_hot(labels, 3)           # nothing: a GPU checks the range in the kernel
    assert counter.counts("a") == {"item": 2, "to_host": 2, "to_device": 1, "data_dependent": 0}
    assert counter.counts("b") == {"item": 0, "to_host": 1, "to_device": 2, "data_dependent": 1}
    # Every site names this file and its line.
    assert all(site.startswith("tests/benchmarks/test_bench_model_syncs.py:") for _, _, site in counter.events)


def test_real_devices_on_a_cpu_have_no_syncs(host_syncs):
    x = torch.randn(5)
    with host_syncs.HostSyncCounter(emulate=False) as counter:
        x.sum().item(), x.cpu().tolist(), x[x > 0], torch.tensor([1.0]).to("cpu")
    assert sum(counter.counts().values()) == 0


def test_counter_restores_torch_also_after_an_error(host_syncs):
    before = {name: getattr(torch, name) for name in ("tensor", "as_tensor", "zeros", "from_numpy")}
    one_hot = torch.nn.functional.one_hot
    with pytest.raises(ZeroDivisionError):
        with host_syncs.HostSyncCounter(emulate=True):
            assert torch.tensor is not before["tensor"]
            1 / 0
    assert {name: getattr(torch, name) for name in before} == before
    assert torch.nn.functional.one_hot is one_hot
    for name in ("cpu", "numpy", "tolist", "to"):
        assert name not in torch.Tensor.__dict__, name  # inherited from the C base again, as before


@pytest.mark.parametrize("variant", ["deformable", "dn"])
def test_syncs_mode_counts_a_tiny_model(variant):
    bench = load("bench_model")
    args = argparse.Namespace(device="cpu", preset="small", set=TINY, sizes=[(64, 64), (48, 96)], baseline=None)
    infer_counter, train_counter = bench.count_syncs(args, variant, "cpu")
    assert {phase for phase, _, _ in train_counter.events} <= {"forward", "criterion", "backward"}
    assert {phase for phase, _, _ in infer_counter.events} <= {"forward"}
    # Hungarian matching runs on the host: the cost matrices of every prediction set (last layer +
    # 1 auxiliary layer here) go there together, in the matcher; nothing else reads a value back.
    criterion = train_counter.counts("criterion")
    assert criterion["to_host"] == 1 and criterion["item"] == 0
    assert infer_counter.counts()["item"] == infer_counter.counts()["to_host"] == 0
    assert any(kind == "to_host" and "detr_cuda/models/matcher.py" in site
               for _, kind, site in train_counter.events)
    # A training step does at least what an inference forward does.
    assert sum(train_counter.counts("forward").values()) >= sum(infer_counter.counts().values())
