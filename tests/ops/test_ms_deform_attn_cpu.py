"""The compiled CPU kernel: float64 gradcheck, agreement with the reference,
determinism."""
import pytest
import torch

from detr_cuda.ops import functional, ms_deform_attn
from tests.support.msda_inputs import (FOUR_LEVELS, ONE_LEVEL, check_against_reference, fresh_generator, make_inputs)

pytestmark = pytest.mark.skipif(not functional.extension_available(),
                                reason="detr_cuda._C is not built (python setup.py build_ext --inplace)")


def cpu_op(*inputs):
    return ms_deform_attn(*inputs, backend="cpu")


def gradcheck_cpu(shapes, channels, points, generator, batch=2, queries=2, heads=2):
    value, spatial_shapes, level_start_index, locations, attention = make_inputs(
        shapes, batch, queries, heads, channels, points, generator=generator)
    inputs = tuple(t.requires_grad_() for t in (value, locations, attention))
    assert torch.autograd.gradcheck(
        lambda v, loc, attn: cpu_op(v, spatial_shapes, level_start_index, loc, attn), inputs,
        eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("shapes", [ONE_LEVEL, FOUR_LEVELS], ids=["1level", "4levels"])
@pytest.mark.parametrize("points", [1, 4, 8])
def test_gradcheck_float64_levels_and_points(shapes, points):
    gradcheck_cpu(shapes, channels=8, points=points, generator=fresh_generator())


@pytest.mark.parametrize("channels", [1, 17, 30, 32, 64, 71])
def test_gradcheck_float64_channels(channels):
    gradcheck_cpu(FOUR_LEVELS, channels=channels, points=2, generator=fresh_generator(), batch=1, heads=1)


def test_gradcheck_float64_more_samples_than_one_corner_table():
    # 4 levels x 17 points = 68 samples per row, more than the 64 the kernel
    # locates at once: rows are done in groups.
    gradcheck_cpu(FOUR_LEVELS, channels=20, points=17, generator=fresh_generator(), batch=1, queries=2, heads=1)


@pytest.mark.parametrize("category", ["inside", "border", "outside"])
def test_gradcheck_float64_each_point_category(category):
    generator = fresh_generator()
    value, spatial_shapes, level_start_index, locations, attention = make_inputs(
        FOUR_LEVELS, 1, 3, 2, 4, 4, generator=generator, categories=(category,))
    inputs = tuple(t.requires_grad_() for t in (value, locations, attention))
    assert torch.autograd.gradcheck(
        lambda v, loc, attn: cpu_op(v, spatial_shapes, level_start_index, loc, attn), inputs)
    if category == "outside":
        assert cpu_op(*[t.detach() for t in (value, spatial_shapes, level_start_index, locations, attention)]
                      ).abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shapes, channels, points", [
    (FOUR_LEVELS, 32, 4), (FOUR_LEVELS, 30, 8), (ONE_LEVEL, 71, 1), ([(1, 17), (9, 1)], 8, 4)])
def test_matches_reference(dtype, shapes, channels, points):
    check_against_reference(cpu_op, "cpu", dtype, shapes, batch=2, queries=37, heads=3, channels=channels,
                            points=points, generator=fresh_generator())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels", [3, 5, 16, 17, 32, 48, 64, 96])
def test_matches_reference_for_channel_counts(dtype, channels):
    # Whole 128-byte chunks of channels go through explicit vectors, the rest
    # through plain loops: every mix of the two, for both accumulation types.
    check_against_reference(cpu_op, "cpu", dtype, FOUR_LEVELS, batch=2, queries=9, heads=2, channels=channels,
                            points=4, generator=fresh_generator())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels", [20, 64])
def test_matches_reference_with_more_samples_than_one_corner_table(dtype, channels):
    check_against_reference(cpu_op, "cpu", dtype, FOUR_LEVELS, batch=1, queries=7, heads=2, channels=channels,
                            points=17, generator=fresh_generator())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels", [8, 32])
def test_corners_off_the_map_read_nothing(dtype, channels):
    # value is NaN everywhere and every sample lies outside its map: an
    # off-map corner must read zeros, not a real value row times a zero weight.
    value, spatial_shapes, level_start_index, locations, attention = make_inputs(
        FOUR_LEVELS, 2, 6, 2, channels, 4, dtype=dtype, categories=("outside",), generator=fresh_generator(),
        loc_dtype=torch.float32)
    value = torch.full_like(value, float("nan")).requires_grad_()
    locations.requires_grad_()
    attention.requires_grad_()
    output = cpu_op(value, spatial_shapes, level_start_index, locations, attention)
    output.backward(torch.ones_like(output))
    for tensor in (output, value.grad, locations.grad, attention.grad):
        assert torch.equal(tensor, torch.zeros_like(tensor))


def test_half_precision_value_accepts_matching_locations():
    # bfloat16 locations are allowed with bfloat16 value (converted to float32
    # inside); gradients come back in bfloat16.
    check_against_reference(cpu_op, "cpu", torch.bfloat16, FOUR_LEVELS, 1, 5, 2, 8, 2, fresh_generator(),
                            loc_dtype=torch.bfloat16)


@pytest.mark.parametrize("dtype, channels", [(torch.float32, 16), (torch.float32, 32), (torch.bfloat16, 32),
                                             (torch.float64, 24)])
def test_backward_is_bitwise_deterministic_across_runs_and_thread_counts(dtype, channels):
    inputs = make_inputs(FOUR_LEVELS, 2, 64, 4, channels, 4, dtype=dtype, generator=fresh_generator(),
                         loc_dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    value, spatial_shapes, level_start_index, locations, attention = inputs

    def grads():
        leaves = [t.detach().clone().requires_grad_() for t in (value, locations, attention)]
        output = cpu_op(leaves[0], spatial_shapes, level_start_index, leaves[1], leaves[2])
        output.backward(torch.ones_like(output))
        return [output.detach()] + [leaf.grad for leaf in leaves]

    threads = torch.get_num_threads()
    first = grads()
    try:
        torch.set_num_threads(1)
        single_thread = grads()
        torch.set_num_threads(3)
        three_threads = grads()
    finally:
        torch.set_num_threads(threads)
    for a, b, c, d in zip(first, grads(), single_thread, three_threads):
        assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d)


def test_non_contiguous_inputs_are_made_contiguous():
    generator = fresh_generator()
    value, spatial_shapes, level_start_index, locations, attention = make_inputs(
        FOUR_LEVELS, 2, 5, 2, 8, 4, dtype=torch.float32, generator=generator)
    # value as one half of a fused projection; locations/weights transposed views.
    fused = torch.cat([value, torch.randn(value.shape, generator=generator)], dim=-1)
    value_view = fused[..., :8]
    locations_view = locations.transpose(0, 1).contiguous().transpose(0, 1)
    attention_view = attention.transpose(1, 2).contiguous().transpose(1, 2)
    assert not (value_view.is_contiguous() or locations_view.is_contiguous() or attention_view.is_contiguous())
    expected = cpu_op(value, spatial_shapes, level_start_index, locations, attention)
    actual = cpu_op(value_view, spatial_shapes, level_start_index, locations_view, attention_view)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.parametrize("batch, queries", [(0, 5), (2, 0)])
def test_empty_batch_or_queries_give_empty_output_and_zero_grads(batch, queries):
    value, spatial_shapes, level_start_index, locations, attention = make_inputs(
        FOUR_LEVELS, batch, queries, 2, 8, 4, dtype=torch.float32)
    leaves = [t.requires_grad_() for t in (value, locations, attention)]
    output = cpu_op(leaves[0], spatial_shapes, level_start_index, leaves[1], leaves[2])
    assert output.shape == (batch, queries, 16)
    output.sum().backward()
    assert all(leaf.grad is not None and leaf.grad.abs().sum() == 0 for leaf in leaves)


def test_double_backward_raises_instead_of_silently_dropping_terms():
    value, spatial_shapes, level_start_index, locations, attention = make_inputs(FOUR_LEVELS, 1, 2, 2, 4, 2)
    value.requires_grad_()
    output = cpu_op(value, spatial_shapes, level_start_index, locations, attention)
    (grad_value,) = torch.autograd.grad(output.square().sum(), value, create_graph=True)
    with pytest.raises(NotImplementedError, match="no second derivative"):
        grad_value.sum().backward()
