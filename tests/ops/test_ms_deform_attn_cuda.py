"""The compiled CUDA kernel. Skipped unless a GPU is visible and detr_cuda._C
was built with CUDA.

Tests that exercise grad_value run under every backward strategy
($DETR_CUDA_MSDA_GRAD_VALUE = atomic | shared | deterministic): the
`strategy` fixture sets it.
"""
import pytest
import torch

from detr_cuda.ops import functional, ms_deform_attn, ms_deform_attn_reference
from tests.support.msda_inputs import FOUR_LEVELS, ONE_LEVEL, check_against_reference, fresh_generator, make_inputs

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and functional.cuda_extension_available()),
    reason="needs a CUDA GPU and detr_cuda._C built with CUDA")


GRAD_VALUE_ENV_VAR = "DETR_CUDA_MSDA_GRAD_VALUE"
STRATEGIES = ("atomic", "shared", "deterministic")


def cuda_op(*inputs):
    return ms_deform_attn(*inputs, backend="cuda")


@pytest.fixture(params=STRATEGIES)
def strategy(request, monkeypatch):
    """Runs the test under each grad_value strategy of the CUDA backward."""
    monkeypatch.setenv(GRAD_VALUE_ENV_VAR, request.param)
    return request.param


@pytest.mark.parametrize("shapes, channels, points", [
    (ONE_LEVEL, 8, 1), (ONE_LEVEL, 8, 8), (FOUR_LEVELS, 8, 4), (FOUR_LEVELS, 1, 2), (FOUR_LEVELS, 30, 2),
    (FOUR_LEVELS, 32, 2), (FOUR_LEVELS, 64, 2), (FOUR_LEVELS, 71, 2)])
def test_gradcheck_float64(shapes, channels, points, strategy):
    value, spatial_shapes, level_start_index, locations, attention = make_inputs(
        shapes, 1, 2, 2, channels, points, device="cuda", generator=fresh_generator())
    inputs = tuple(t.requires_grad_() for t in (value, locations, attention))
    # Atomics make grad_value's summation order vary: nondet_tol covers it.
    assert torch.autograd.gradcheck(
        lambda v, loc, attn: cuda_op(v, spatial_shapes, level_start_index, loc, attn), inputs,
        nondet_tol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shapes, channels, points", [
    (FOUR_LEVELS, 32, 4), (FOUR_LEVELS, 30, 8), (FOUR_LEVELS, 32, 8), (ONE_LEVEL, 71, 1), ([(1, 17), (9, 1)], 8, 4),
    (FOUR_LEVELS, 256, 4), (FOUR_LEVELS, 16, 3)])
def test_matches_reference(dtype, shapes, channels, points, strategy):
    check_against_reference(cuda_op, "cuda", dtype, shapes, batch=3, queries=45, heads=3, channels=channels,
                            points=points, generator=fresh_generator())


def test_matches_cpu_kernel_float32():
    inputs = make_inputs(FOUR_LEVELS, 2, 50, 8, 32, 4, dtype=torch.float32, generator=fresh_generator())
    expected = ms_deform_attn(*inputs, backend="cpu")
    actual = cuda_op(*[t.cuda() for t in inputs])
    torch.testing.assert_close(actual.cpu(), expected, rtol=1e-5, atol=1e-5)


def test_large_batch_has_no_32_bit_overflow(strategy):
    # value has B*S*H*C = 520 * 16384 * 256 > 2**31 elements; the last image's
    # rows sit past every 32-bit offset.
    shapes = [(128, 128)]
    batch, heads, channels = 520, 8, 32
    generator = fresh_generator()
    value = torch.zeros(batch, 128 * 128, heads, channels, device="cuda")
    assert value.numel() > 2 ** 31
    value[-1].normal_()
    tail = make_inputs(shapes, 1, 16, heads, channels, 4, dtype=torch.float32, device="cuda",
                       generator=generator)
    spatial_shapes, level_start_index = tail[1], tail[2]
    locations = tail[3].expand(batch, -1, -1, -1, -1, -1).contiguous()
    attention = tail[4].expand(batch, -1, -1, -1, -1).contiguous()
    value.requires_grad_()
    output = cuda_op(value, spatial_shapes, level_start_index, locations, attention)
    grad_output = torch.randn_like(output)
    output.backward(grad_output)
    last_value = value[-1:].detach().clone().requires_grad_()
    expected = ms_deform_attn_reference(last_value, spatial_shapes, level_start_index, locations[-1:],
                                        attention[-1:])
    expected.backward(grad_output[-1:])
    torch.testing.assert_close(output[-1:], expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(value.grad[-1:], last_value.grad, rtol=1e-4, atol=1e-4)


def test_side_stream_gives_the_same_result():
    inputs = make_inputs(FOUR_LEVELS, 2, 64, 8, 32, 4, dtype=torch.float32, device="cuda",
                         generator=fresh_generator())
    expected = cuda_op(*inputs)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        actual = cuda_op(*inputs)
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_non_contiguous_and_misaligned_value():
    inputs = make_inputs(FOUR_LEVELS, 2, 20, 4, 32, 4, dtype=torch.float32, device="cuda",
                         generator=fresh_generator())
    value = inputs[0]
    expected = cuda_op(*inputs)
    fused = torch.cat([value, torch.randn_like(value)], -1)
    view = fused[..., :32]  # half of a fused projection: non-contiguous
    torch.testing.assert_close(cuda_op(view, *inputs[1:]), expected, rtol=0, atol=0)
    # Contiguous but 4-byte aligned only: the kernel falls back to scalar loads.
    storage = torch.empty(value.numel() + 1, device="cuda")
    shifted = storage[1:].view_as(value).copy_(value)
    assert shifted.data_ptr() % 16 != 0
    torch.testing.assert_close(cuda_op(shifted, *inputs[1:]), expected, rtol=1e-6, atol=1e-6)


def test_forward_is_deterministic_and_backward_nearly_so(strategy):
    inputs = make_inputs(FOUR_LEVELS, 2, 100, 8, 32, 4, dtype=torch.float32, device="cuda",
                         generator=fresh_generator())

    def run():
        leaves = [t.detach().clone().requires_grad_() for t in (inputs[0], inputs[3], inputs[4])]
        output = cuda_op(leaves[0], inputs[1], inputs[2], leaves[1], leaves[2])
        output.backward(torch.ones_like(output))
        return [output.detach()] + [leaf.grad for leaf in leaves]

    first, second = run(), run()
    assert torch.equal(first[0], second[0])          # forward: bitwise
    assert torch.equal(first[2], second[2]) and torch.equal(first[3], second[3])  # loc/attn grads: one writer
    difference = (first[1] - second[1]).abs().max().item()
    print(f"grad_value ({strategy}): max |run 1 - run 2| = {difference:.3g}")
    if strategy == "deterministic":
        assert torch.equal(first[1], second[1])  # fixed-point integer atomics: any order, same bits
    else:
        torch.testing.assert_close(first[1], second[1], rtol=1e-6, atol=1e-6)  # float atomics: order


def test_deterministic_algorithms_pick_the_deterministic_strategy(monkeypatch):
    """With torch.use_deterministic_algorithms(True) and the variable unset,
    grad_value is the deterministic strategy's, bit for bit."""
    inputs = make_inputs(FOUR_LEVELS, 2, 50, 4, 32, 4, dtype=torch.float32, device="cuda",
                         generator=fresh_generator())

    def grad_value():
        value = inputs[0].detach().clone().requires_grad_()
        cuda_op(value, *inputs[1:]).square().sum().backward()
        return value.grad

    monkeypatch.setenv(GRAD_VALUE_ENV_VAR, "deterministic")
    explicit = grad_value()
    monkeypatch.delenv(GRAD_VALUE_ENV_VAR)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        implied = grad_value()
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.equal(explicit, implied)


def test_strategies_agree_with_a_level_too_big_for_shared_memory(monkeypatch):
    # Level 0 (C=32 fp32: 300*400*32*4 B = 15 MB) never fits a block's shared
    # memory, the small levels do: the shared strategy mixes both paths.
    shapes = [(300, 400), (9, 7), (4, 6), (2, 3)]
    inputs = make_inputs(shapes, 2, 300, 4, 32, 4, dtype=torch.float32, device="cuda",
                         generator=fresh_generator())
    results = {}
    for name in STRATEGIES:
        monkeypatch.setenv(GRAD_VALUE_ENV_VAR, name)
        leaves = [t.detach().clone().requires_grad_() for t in (inputs[0], inputs[3], inputs[4])]
        output = cuda_op(leaves[0], inputs[1], inputs[2], leaves[1], leaves[2])
        output.backward(torch.ones_like(output))
        results[name] = [leaf.grad for leaf in leaves]
    atomic = results["atomic"]
    for name in ("shared", "deterministic"):
        other = results[name]
        torch.testing.assert_close(other[0], atomic[0], rtol=1e-5, atol=1e-5)
        # grad_locations / grad_attention do not depend on the strategy at all.
        assert torch.equal(other[1], atomic[1]) and torch.equal(other[2], atomic[2])


def test_unknown_grad_value_strategy_raises(monkeypatch):
    inputs = make_inputs(FOUR_LEVELS, 1, 4, 2, 8, 2, dtype=torch.float32, device="cuda",
                         generator=fresh_generator())
    value = inputs[0].requires_grad_()
    output = cuda_op(value, *inputs[1:])
    monkeypatch.setenv(GRAD_VALUE_ENV_VAR, "fast")
    with pytest.raises(RuntimeError, match="DETR_CUDA_MSDA_GRAD_VALUE must be 'atomic'.*'shared'.*'deterministic'"
                                           ".*got 'fast'"):
        output.sum().backward()


def test_unread_nan_at_the_clamped_corner_position_does_not_leak(strategy):
    # Off-map corners are loaded from position 0 of their level and then
    # zeroed. Samples here never read position 0 on the map (the reference
    # does not read it), but their off-map corners are clamped onto it.
    height, width = 4, 5
    shapes = [(height, width)]
    generator = fresh_generator()
    value, spatial_shapes, level_start_index, _, attention = make_inputs(
        shapes, 1, 40, 2, 32, 4, dtype=torch.float32, device="cuda", generator=generator)
    # Pixel x in (W-1, W) (right border: corner x0+1 is off the map) or beyond
    # the window (inactive); pixel y in [1, H-1).
    px = torch.where(torch.rand(1, 40, 2, 1, 4, generator=generator) < 0.5,
                     width - 1 + 0.1 + 0.8 * torch.rand(1, 40, 2, 1, 4, generator=generator),
                     width + 0.5 + torch.rand(1, 40, 2, 1, 4, generator=generator))
    py = 1.1 + (height - 2.2) * torch.rand(1, 40, 2, 1, 4, generator=generator)
    locations = torch.stack([(px + 0.5) / width, (py + 0.5) / height], -1).to("cuda")
    poisoned = value.clone()
    poisoned[:, 0] = float("nan")
    leaves = [t.detach().clone().requires_grad_() for t in (poisoned, locations, attention)]
    output = cuda_op(leaves[0], spatial_shapes, level_start_index, leaves[1], leaves[2])
    output.backward(torch.ones_like(output))
    expected = ms_deform_attn_reference(value.cpu().double(), spatial_shapes.cpu(), level_start_index.cpu(),
                                        locations.cpu().double(), attention.cpu().double())
    assert torch.isfinite(output).all()
    torch.testing.assert_close(output.cpu().double(), expected, rtol=1e-5, atol=1e-5)
    for leaf in leaves:
        assert torch.isfinite(leaf.grad).all()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_runs_on_a_non_default_device():
    inputs = make_inputs(FOUR_LEVELS, 2, 20, 4, 32, 4, dtype=torch.float32, generator=fresh_generator())
    expected = cuda_op(*[t.to("cuda:0") for t in inputs]).cpu()
    actual = cuda_op(*[t.to("cuda:1") for t in inputs])
    assert actual.device == torch.device("cuda:1")
    torch.testing.assert_close(actual.cpu(), expected, rtol=0, atol=0)


def test_torch_compile_on_cuda():
    inputs = make_inputs(FOUR_LEVELS, 2, 20, 4, 32, 4, dtype=torch.float32, device="cuda",
                         generator=fresh_generator())
    compiled = torch.compile(lambda *x: ms_deform_attn(*x).relu(), fullgraph=True)
    torch.testing.assert_close(compiled(*inputs), cuda_op(*inputs).relu())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_layer_under_autocast_runs_in_half_precision(dtype):
    from detr_cuda.ops import MSDeformAttn
    from msda_testing import level_geometry

    torch.manual_seed(0)
    layer = MSDeformAttn(d_model=256, n_levels=4, n_heads=8, n_points=4).cuda()
    spatial_shapes, level_start_index, num_values = level_geometry(FOUR_LEVELS, device="cuda")
    query = torch.randn(2, 30, 256, device="cuda")
    reference_points = torch.rand(2, 30, 4, 2, device="cuda")
    features = torch.randn(2, num_values, 256, device="cuda")
    expected = layer(query, reference_points, features, spatial_shapes, level_start_index)
    with torch.autocast("cuda", dtype=dtype):
        output = layer(query, reference_points, features, spatial_shapes, level_start_index)
        output.float().square().sum().backward()
    assert output.dtype == dtype
    assert (output.float() - expected).abs().max() <= 0.05 * expected.abs().max()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
