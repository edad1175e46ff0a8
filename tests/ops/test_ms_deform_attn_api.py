"""The ms_deform_attn Python face: input validation, backend selection and its
warning, torch.compile, autocast, and the MSDeformAttn layer."""
import re
import warnings

import pytest
import torch

from detr_cuda.ops import MSDeformAttn, functional, ms_deform_attn, ms_deform_attn_reference
from tests.support.msda_inputs import FOUR_LEVELS, fresh_generator, level_geometry, make_inputs

needs_extension = pytest.mark.skipif(not functional.extension_available(),
                                     reason="detr_cuda._C is not built (python setup.py build_ext --inplace)")


def small_inputs(dtype=torch.float32):
    return make_inputs(FOUR_LEVELS, 2, 3, 2, 4, 2, dtype=dtype, generator=torch.Generator().manual_seed(1))


def replace(inputs, index, tensor):
    inputs = list(inputs)
    inputs[index] = tensor
    return inputs


# ---------------------------------------------------------------- validation

def _bad_inputs():
    value, shapes, starts, loc, attn = small_inputs()
    cases = {
        "value rank": (replace((value, shapes, starts, loc, attn), 0, value[0]), ValueError, "value must be 4-d"),
        "locations rank": (replace((value, shapes, starts, loc, attn), 3, loc[..., 0]), ValueError,
                           "sampling_locations must be 6-d"),
        "weights rank": (replace((value, shapes, starts, loc, attn), 4, attn[0]), ValueError,
                         "attention_weights must be 5-d"),
        "shapes rank": (replace((value, shapes, starts, loc, attn), 1, shapes.flatten()), ValueError,
                        "spatial_shapes must be 2-d"),
        "starts rank": (replace((value, shapes, starts, loc, attn), 2, starts[None]), ValueError,
                        "level_start_index must be 1-d"),
        "batch": (replace((value, shapes, starts, loc, attn), 3, loc[:1]), ValueError,
                  "sampling_locations has shape (1, 3, 2, 4, 2, 2), expected (2, 3, 2, 4, 2, 2)"),
        "heads": (replace((value, shapes, starts, loc, attn), 4, attn[:, :, :1]), ValueError,
                  "attention_weights has shape (2, 3, 1, 4, 2), expected (2, 3, 2, 4, 2)"),
        "points": (replace((value, shapes, starts, loc, attn), 4, attn[..., :1]), ValueError,
                   "attention_weights has shape"),
        "levels": (replace((value, shapes, starts, loc, attn), 3, loc[:, :, :, :3]), ValueError,
                   "sampling_locations has shape"),
        "xy": (replace((value, shapes, starts, loc, attn), 3, torch.cat([loc, loc[..., :1]], -1)), ValueError,
               "sampling_locations has shape"),
        "starts length": (replace((value, shapes, starts, loc, attn), 2, starts[:3]), ValueError,
                          "level_start_index has shape (3,), expected (4,)"),
        "S": (replace((value, shapes, starts, loc, attn), 0, value[:, :-1]), ValueError,
              "value has S=38 positions but spatial_shapes"),
        "start values": (replace((value, shapes, starts, loc, attn), 2, starts.flip(0)), ValueError,
                         "level_start_index[0] ="),
        "empty level": (replace((value, shapes, starts, loc, attn), 1, torch.tensor([[4, 6], [3, 2], [0, 5],
                                                                                    [4, 1]])),
                        ValueError, "spatial_shapes[2] = (0, 5)"),
        "value dtype": (replace((value, shapes, starts, loc, attn), 0, value.int()), TypeError,
                        "value dtype must be"),
        "location dtype": (replace((value, shapes, starts, loc, attn), 3, loc.double()), TypeError,
                           "sampling_locations dtype must be torch.float32 for torch.float32 value"),
        "weights dtype": (replace((value, shapes, starts, loc, attn), 4, attn.half()), TypeError,
                          "attention_weights dtype must be"),
        "shapes dtype": (replace((value, shapes, starts, loc, attn), 1, shapes.int()), TypeError,
                         "spatial_shapes must be int64"),
        "starts dtype": (replace((value, shapes, starts, loc, attn), 2, starts.float()), TypeError,
                         "level_start_index must be int64"),
        "not a tensor": (replace((value, shapes, starts, loc, attn), 1, FOUR_LEVELS), TypeError,
                         "spatial_shapes must be a torch.Tensor"),
        "device": (replace((value, shapes, starts, loc, attn), 4, attn.to("meta")), ValueError,
                   "attention_weights is on meta but value is on cpu"),
    }
    return cases


@pytest.mark.parametrize("case", sorted(_bad_inputs()))
@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_extension)])
def test_bad_input_raises_a_clear_error(case, backend):
    inputs, error, message = _bad_inputs()[case]
    with pytest.raises(error, match=re.escape(message)):
        ms_deform_attn(*inputs, backend=backend)


@needs_extension
def test_compiled_op_checks_inputs_itself():
    # A direct torch.ops call skips the Python checks; the C++ ones still refuse.
    value, shapes, starts, loc, attn = small_inputs()
    with pytest.raises(RuntimeError, match="spatial_shapes sum to"):
        torch.ops.detr_cuda.ms_deform_attn_forward(value[:, :-1].contiguous(), shapes, starts, loc, attn)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.detr_cuda.ms_deform_attn_forward(value.transpose(1, 2).contiguous().transpose(1, 2), shapes,
                                                   starts, loc, attn)


def test_geometry_check_sees_in_place_changes():
    value, shapes, starts, loc, attn = small_inputs()
    ms_deform_attn(value, shapes, starts, loc, attn, backend="reference")
    shapes[3, 0] = 5  # same tensor object, new version: must be re-checked
    with pytest.raises(ValueError, match="sum to"):
        ms_deform_attn(value, shapes, starts, loc, attn, backend="reference")


def _backends_here():
    return ["reference"] + (["cpu"] if functional.extension_available() else [])


@pytest.mark.parametrize("backend", _backends_here())
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_location_samples_nothing_on_every_backend(backend, bad):
    """One documented behaviour: a NaN or infinite location reads zeros (as a point far outside the
    maps) and gets a zero gradient; the other samples and gradients are untouched and finite."""
    value, shapes, starts, loc, attn = make_inputs(FOUR_LEVELS, 2, 3, 2, 4, 2, generator=fresh_generator())
    broken = loc.clone()
    broken[0, 1, 0, 2, 1, 0] = bad
    broken[1, 0, 1, 0, 0, 1] = bad
    outside = torch.where(torch.isfinite(broken), broken, torch.full_like(broken, -5.0))
    inputs = [tensor.clone().requires_grad_(tensor.is_floating_point()) for tensor in (value, shapes, starts, broken, attn)]
    output = ms_deform_attn(*inputs, backend=backend)
    assert torch.isfinite(output).all()
    torch.testing.assert_close(output, ms_deform_attn(value, shapes, starts, outside, attn, backend=backend))
    output.square().sum().backward()
    grad_locations = inputs[3].grad
    assert torch.isfinite(grad_locations).all() and torch.isfinite(inputs[0].grad).all()
    assert grad_locations[0, 1, 0, 2, 1].abs().max() == 0 and grad_locations[1, 0, 1, 0, 0].abs().max() == 0


# ---------------------------------------------------------- backend selection

@needs_extension
def test_default_backend_follows_the_device(monkeypatch):
    monkeypatch.delenv(functional.BACKEND_ENV_VAR, raising=False)
    assert functional.resolve_backend(None, torch.device("cpu")) == "cpu"


@needs_extension
def test_environment_variable_and_argument_force_a_backend(monkeypatch):
    monkeypatch.setenv(functional.BACKEND_ENV_VAR, "reference")
    assert functional.resolve_backend(None, torch.device("cpu")) == "reference"
    assert functional.resolve_backend("cpu", torch.device("cpu")) == "cpu"  # the argument wins
    monkeypatch.setenv(functional.BACKEND_ENV_VAR, "bogus")
    with pytest.raises(ValueError, match=r"unknown backend 'bogus' from the \$DETR_CUDA_MSDA_BACKEND"):
        functional.resolve_backend(None, torch.device("cpu"))


@needs_extension
def test_forcing_a_backend_for_the_wrong_device_raises():
    with pytest.raises(ValueError, match="backend 'cpu' needs tensors on cpu, but value is on meta"):
        functional.resolve_backend("cpu", torch.device("meta"))


def test_missing_extension_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(functional, "_C", None)
    monkeypatch.setattr(functional, "_EXTENSION_IMPORT_ERROR", ImportError("no module named detr_cuda._C"))
    monkeypatch.setattr(functional, "_fallback_warned", False)
    monkeypatch.delenv(functional.BACKEND_ENV_VAR, raising=False)
    inputs = small_inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = ms_deform_attn(*inputs)
        ms_deform_attn(*inputs)
    fallback = [w for w in caught if "reference backend" in str(w.message)]
    assert len(fallback) == 1
    assert "pip install -e . --no-build-isolation" in str(fallback[0].message)
    torch.testing.assert_close(first, ms_deform_attn_reference(*inputs))


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
def test_forcing_an_unbuilt_backend_says_how_to_build(monkeypatch, backend):
    monkeypatch.setattr(functional, "_C", None)
    with pytest.raises(RuntimeError, match=r"not available .*pip install -e \. --no-build-isolation.*make install"):
        ms_deform_attn(*small_inputs(), backend=backend)


@needs_extension
def test_forcing_cuda_on_a_cpu_only_build_says_how_to_build(monkeypatch):
    class CpuOnlyExtension:
        with_cuda = False
    monkeypatch.setattr(functional, "_C", CpuOnlyExtension)
    with pytest.raises(RuntimeError, match="built without CUDA"):
        functional.resolve_backend("cuda", torch.device("cuda"))


# ------------------------------------------------------------ compile, autocast

@needs_extension
def test_torch_compile_fullgraph_forward_and_backward():
    value, shapes, starts, loc, attn = make_inputs(FOUR_LEVELS, 2, 5, 2, 8, 4, dtype=torch.float32,
                                                   generator=fresh_generator())

    def attend(value, loc, attn):
        return (ms_deform_attn(value, shapes, starts, loc, attn) * 2.0).sum(-1)

    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in (value, loc, attn)]
    eager_leaves = [t.clone().requires_grad_() for t in (value, loc, attn)]
    out = compiled(*leaves)
    expected = attend(*eager_leaves)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    expected.sum().backward()
    for leaf, eager_leaf in zip(leaves, eager_leaves):
        torch.testing.assert_close(leaf.grad, eager_leaf.grad)


@needs_extension
def test_fake_implementation_passes_opcheck():
    value, shapes, starts, loc, attn = small_inputs()
    torch.library.opcheck(torch.ops.detr_cuda.ms_deform_attn_forward,
                          (value.requires_grad_(), shapes, starts, loc.requires_grad_(), attn.requires_grad_()))


@needs_extension
def test_autocast_bfloat16_runs_in_value_dtype():
    torch.manual_seed(0)
    layer = MSDeformAttn(d_model=32, n_levels=4, n_heads=4, n_points=2)
    spatial_shapes, level_start_index, num_values = level_geometry(FOUR_LEVELS)
    query = torch.randn(2, 6, 32)
    reference_points = torch.rand(2, 6, 4, 2)
    features = torch.randn(2, num_values, 32)
    expected = layer(query, reference_points, features, spatial_shapes, level_start_index)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = layer(query, reference_points, features, spatial_shapes, level_start_index)
    assert output.dtype == torch.bfloat16
    assert (output.float() - expected).abs().max() <= 0.05 * expected.abs().max()


# --------------------------------------------------------------------- layer

@needs_extension
@pytest.mark.parametrize("reference_dims", [2, 4])
def test_layer_cpu_matches_reference_with_padding_mask(reference_dims):
    generator = fresh_generator()
    torch.manual_seed(int(torch.randint(1 << 30, (1,), generator=generator)))
    # float64: the two backends sum in different orders, and float32 gradients
    # with cancellation (reference_points) differ by more than a fixed tolerance
    # now and then; in float64 any real difference still shows.
    layer = MSDeformAttn(d_model=64, n_levels=4, n_heads=8, n_points=4).double()
    # Random offsets and attention so the test does not depend on the init grid.
    with torch.no_grad():
        layer.sampling_offsets.weight.normal_(0, 0.5)
        layer.attention_weights.weight.normal_(0, 0.5)
    spatial_shapes, level_start_index, num_values = level_geometry(FOUR_LEVELS)
    query = torch.randn(2, 7, 64, generator=generator, dtype=torch.float64)
    features = torch.randn(2, num_values, 64, generator=generator, dtype=torch.float64)
    if reference_dims == 2:
        reference_points = torch.rand(2, 7, 4, 2, generator=generator, dtype=torch.float64)
    else:
        reference_points = torch.cat([torch.rand(2, 7, 4, 2, generator=generator, dtype=torch.float64) * 0.6 + 0.2,
                                      torch.rand(2, 7, 4, 2, generator=generator, dtype=torch.float64) * 0.3 + 0.05],
                                     -1)
    padding_mask = torch.zeros(2, num_values, dtype=torch.bool)
    padding_mask[1, 10:30] = True

    results = []
    for backend in ("cpu", "reference"):
        layer.backend = backend
        layer.zero_grad()
        inputs = [t.clone().requires_grad_() for t in (query, features, reference_points)]
        output = layer(inputs[0], inputs[2], inputs[1], spatial_shapes, level_start_index, padding_mask)
        output.square().sum().backward()
        results.append([output] + [t.grad for t in inputs] + [p.grad.clone() for p in layer.parameters()])
    for actual, expected in zip(*results):
        torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-12)

    # Padded positions carry no value: changing their features changes nothing.
    layer.backend = "cpu"
    changed = features.clone()
    changed[1, 10:30] += 100.0
    torch.testing.assert_close(layer(query, reference_points, changed, spatial_shapes, level_start_index,
                                     padding_mask), results[0][0].detach())


@pytest.mark.parametrize("reference_dims", [2, 4])
def test_sampling_locations_are_the_published_formula_bitwise(reference_dims):
    """The layer divides the offsets laid out flat (a speed-up); the values are the formula's."""
    generator = fresh_generator()
    layer = MSDeformAttn(d_model=64, n_levels=4, n_heads=8, n_points=4)
    with torch.no_grad():
        layer.sampling_offsets.weight.normal_(0, 3.0, generator=generator)
    spatial_shapes, _, _ = level_geometry(FOUR_LEVELS)
    query = torch.randn(2, 9, 64, generator=generator, requires_grad=True)
    reference_points = torch.rand(2, 9, 4, reference_dims, generator=generator, requires_grad=True)
    locations, weights = layer.sampling_locations(query, reference_points, spatial_shapes)
    offsets = layer.sampling_offsets(query).view(2, 9, 8, 4, 4, 2)
    if reference_dims == 2:
        normalizer = torch.stack([spatial_shapes[:, 1], spatial_shapes[:, 0]], -1).float()
        expected = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
    else:
        expected = (reference_points[:, :, None, :, None, :2]
                    + offsets / 4 * reference_points[:, :, None, :, None, 2:] * 0.5)
    assert torch.equal(locations, expected)
    assert weights.shape == (2, 9, 8, 4, 4)
    grad = torch.randn(expected.shape, generator=generator)
    for mine, theirs in zip(torch.autograd.grad(locations, (query, reference_points), grad),
                            torch.autograd.grad(expected, (query, reference_points), grad)):
        assert torch.equal(mine, theirs)


def test_sampling_locations_keep_the_promoted_dtype():
    """float16 offsets with float32 reference points give float32 locations, as the published sum
    does (half-precision locations move samples by up to ~0.3 px on large maps)."""
    generator = fresh_generator()
    layer = MSDeformAttn(d_model=32, n_levels=4, n_heads=4, n_points=2).half()
    spatial_shapes, _, _ = level_geometry(FOUR_LEVELS)
    query = torch.randn(1, 5, 32, generator=generator).half()
    reference_points = torch.rand(1, 5, 4, 2, generator=generator)
    locations, _ = layer.sampling_locations(query, reference_points, spatial_shapes)
    offsets = layer.sampling_offsets(query).view(1, 5, 4, 4, 2, 2)
    normalizer = torch.stack([spatial_shapes[:, 1], spatial_shapes[:, 0]], -1).half()
    expected = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
    assert locations.dtype == torch.float32
    assert torch.equal(locations, expected)
