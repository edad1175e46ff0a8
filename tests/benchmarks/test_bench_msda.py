"""The operator benchmark's own arithmetic and inputs (benchmarks/bench_msda.py)."""
import importlib.util
import os

import pytest
import torch

from detr_cuda.ops.functional import _check_inputs

BENCH_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks",
                          "bench_msda.py")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_msda", BENCH_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_floors_match_the_kernel_notes(bench):
    # anchors-kernel.md section 2: encoder 800x1333, B=2 on an H100 SXM.
    forward_floor, backward_floor, forward_bytes, backward_bytes = bench.floor_ms("enc800", 4, bench.GPU_SPECS["H100"])
    assert forward_bytes == pytest.approx(159.3e6, rel=1e-3)
    assert forward_floor * 1e3 == pytest.approx(87.1, rel=1e-2)    # L1 gather bound
    assert backward_floor * 1e3 == pytest.approx(95.1, rel=1e-2)   # HBM incl. the grad_value zero-fill
    assert bench.floor_ms("enc800", 2, bench.GPU_SPECS["H100"])[0] * 1e3 == pytest.approx(43.5, rel=1e-2)


@pytest.mark.parametrize("shape_name", ["enc320", "dec300"])
def test_inputs_are_valid_and_realistic(bench, shape_name):
    value, spatial_shapes, level_start_index, locations, attention = bench.make_inputs(
        shape_name, torch.float32, "cpu")
    _check_inputs(value, spatial_shapes, level_start_index, locations, attention)
    assert locations.shape[2:] == (bench.HEADS, 4, bench.POINTS, 2)
    torch.testing.assert_close(attention.sum((-1, -2)), torch.ones(attention.shape[:3]))
    # Offsets of a few pixels: on the finest level nearly every sample stays on the map.
    inside = ((locations[:, :, :, 0] >= 0) & (locations[:, :, :, 0] <= 1)).all(-1).float().mean()
    assert inside > 0.85
    if shape_name == "enc320":
        # Encoder queries are the pixel centres; head 0 points along +x, point 0 one pixel out.
        height, width = spatial_shapes[0].tolist()
        level0 = torch.arange(height * width)
        pixel_x = locations[:, :height * width, 0, 0, 0, 0] * width - 0.5 - (level0 % width)
        pixel_y = locations[:, :height * width, 0, 0, 0, 1] * height - 0.5 - (level0 // width)
        assert pixel_x.mean().item() == pytest.approx(1.0, abs=0.05)
        assert pixel_y.mean().item() == pytest.approx(0.0, abs=0.05)


def test_cuda_shared_backend_sets_the_strategy_only_around_its_calls(bench, monkeypatch):
    monkeypatch.setenv(bench.GRAD_VALUE_ENV_VAR, "atomic")
    seen = []
    with bench.grad_value_strategy("shared"):
        seen.append(os.environ[bench.GRAD_VALUE_ENV_VAR])
    assert seen == ["shared"] and os.environ[bench.GRAD_VALUE_ENV_VAR] == "atomic"
    monkeypatch.delenv(bench.GRAD_VALUE_ENV_VAR)
    with bench.grad_value_strategy("shared"):
        pass
    assert bench.GRAD_VALUE_ENV_VAR not in os.environ
    assert bench.OursBackend("cuda-shared").op_backend == "cuda"
    assert bench.OursBackend("cuda-deterministic").strategy == "deterministic"
    # A CPU machine has no cuda rows, and the cpu row leaves the variable alone.
    assert not bench.backend_runs("cuda-shared", torch.float32, "cpu", None)
    assert bench.OursBackend("cpu").strategy is None
