"""The compiled CUDA kernel. Skipped unless a GPU is visible and detr_cuda._C
was built with CUDA."""
import pytest
import torch

from detr_cuda.ops import functional, ms_deform_attn, ms_deform_attn_reference
from msda_testing import FOUR_LEVELS, ONE_LEVEL, check_against_reference, fresh_generator, make_inputs

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and functional.cuda_extension_available()),
    reason="needs a CUDA GPU and detr_cuda._C built with CUDA")


def cuda_op(*inputs):
    return ms_deform_attn(*inputs, backend="cuda")


@pytest.mark.parametrize("shapes, channels, points", [
    (ONE_LEVEL, 8, 1), (ONE_LEVEL, 8, 8), (FOUR_LEVELS, 8, 4), (FOUR_LEVELS, 1, 2), (FOUR_LEVELS, 30, 2),
    (FOUR_LEVELS, 32, 2), (FOUR_LEVELS, 64, 2), (FOUR_LEVELS, 71, 2)])
def test_gradcheck_float64(shapes, channels, points):
    value, spatial_shapes, level_start_index, locations, attention = make_inputs(
        shapes, 1, 2, 2, channels, points, device="cuda", generator=fresh_generator())
    inputs = tuple(t.requires_grad_() for t in (value, locations, attention))
    # Atomics make grad_value's summation order vary: nondet_tol covers it.
    assert torch.autograd.gradcheck(
        lambda v, loc, attn: cuda_op(v, spatial_shapes, level_start_index, loc, attn), inputs,
        nondet_tol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shapes, channels, points", [
    (FOUR_LEVELS, 32, 4), (FOUR_LEVELS, 30, 8), (ONE_LEVEL, 71, 1), ([(1, 17), (9, 1)], 8, 4),
    (FOUR_LEVELS, 256, 4)])
def test_matches_reference(dtype, shapes, channels, points):
    check_against_reference(cuda_op, "cuda", dtype, shapes, batch=3, queries=45, heads=3, channels=channels,
                            points=points, generator=fresh_generator())


def test_matches_cpu_kernel_float32():
    inputs = make_inputs(FOUR_LEVELS, 2, 50, 8, 32, 4, dtype=torch.float32, generator=fresh_generator())
    expected = ms_deform_attn(*inputs, backend="cpu")
    actual = cuda_op(*[t.cuda() for t in inputs])
    torch.testing.assert_close(actual.cpu(), expected, rtol=1e-5, atol=1e-5)


def test_large_batch_has_no_32_bit_overflow():
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


def test_forward_is_deterministic_and_backward_nearly_so():
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
    torch.testing.assert_close(first[1], second[1], rtol=1e-6, atol=1e-6)  # grad_value: atomics order


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
