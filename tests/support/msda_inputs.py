"""Input makers shared by the ms_deform_attn tests.

Sampling points are placed by category, in pixel units of their level
(pixel x = loc_x * W - 0.5):
    inside    [0, W-1]: all four corners on the map
    border    (-1, 0) or (W-1, W): some corners off the map
    outside   beyond (-1, W): the sample reads nothing
Every pixel coordinate is kept >= 0.1 px from an integer, because the
bilinear location gradient jumps there (and -1, W are the window edges).
"""
import os

import torch

CATEGORIES = ("inside", "border", "outside")


def fresh_generator():
    """A generator with a fresh seed (printed, so a failure can be replayed)."""
    seed = int(os.environ.get("MSDA_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"ms_deform_attn test seed: {seed} (replay with MSDA_TEST_SEED={seed})")
    return torch.Generator().manual_seed(seed)


def level_geometry(shapes, device="cpu"):
    """(spatial_shapes (L, 2) int64, level_start_index (L,) int64, S)."""
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64, device=device)
    areas = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    return spatial_shapes, level_start_index, int(areas.sum())


def _pixel_coords(size, count, categories, generator):
    kind = torch.randint(len(categories), (count,), generator=generator)
    u = torch.rand(count, generator=generator, dtype=torch.float64)
    side = torch.rand(count, generator=generator) < 0.5
    ranges = {
        "inside": (torch.zeros(count), torch.full((count,), float(size - 1))),
        "border": (torch.where(side, torch.full((count,), -1.0), torch.full((count,), float(size - 1))),
                   torch.where(side, torch.zeros(count), torch.full((count,), float(size)))),
        "outside": (torch.where(side, torch.full((count,), -3.0), torch.full((count,), float(size))),
                    torch.where(side, torch.full((count,), -1.0), torch.full((count,), float(size + 2)))),
    }
    coords = torch.empty(count, dtype=torch.float64)
    for index, category in enumerate(categories):
        low, high = ranges[category]
        chosen = kind == index
        coords[chosen] = (low + u * (high - low)).double()[chosen]
    # Push each coordinate >= 0.1 px away from the integers, inside its cell.
    frac = coords - coords.floor()
    coords = torch.where(frac < 0.1, coords + 0.1, coords)
    coords = torch.where(frac > 0.9, coords - 0.1, coords)
    return coords


def make_inputs(shapes, batch, queries, heads, channels, points, dtype=torch.float64, device="cpu",
                categories=CATEGORIES, generator=None, loc_dtype=None):
    """Random (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)."""
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    spatial_shapes, level_start_index, num_values = level_geometry(shapes)
    levels = len(shapes)
    loc_dtype = loc_dtype or dtype
    value = torch.randn(batch, num_values, heads, channels, generator=generator, dtype=torch.float64)
    locations = torch.empty(batch, queries, heads, levels, points, 2, dtype=torch.float64)
    count = batch * queries * heads * points
    for level, (height, width) in enumerate(shapes):
        px = _pixel_coords(width, count, categories, generator)
        py = _pixel_coords(height, count, categories, generator)
        locations[:, :, :, level, :, 0] = ((px + 0.5) / width).view(batch, queries, heads, points)
        locations[:, :, :, level, :, 1] = ((py + 0.5) / height).view(batch, queries, heads, points)
    logits = torch.randn(batch, queries, heads, levels * points, generator=generator, dtype=torch.float64)
    attention = logits.softmax(-1).view(batch, queries, heads, levels, points)
    return (value.to(device=device, dtype=dtype), spatial_shapes.to(device), level_start_index.to(device),
            locations.to(device=device, dtype=loc_dtype), attention.to(device=device, dtype=loc_dtype))


def max_abs_error_ratio(actual, expected):
    """max |actual - expected| / max(max |expected|, tiny), in float64."""
    actual, expected = actual.double(), expected.double()
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, 1e-30)
    return (actual - expected).abs().max().item() / scale if expected.numel() else 0.0


# Shapes: 1 and 4 levels, non-square maps including 1xN and Nx1.
ONE_LEVEL = [(3, 5)]
FOUR_LEVELS = [(4, 6), (3, 2), (1, 5), (4, 1)]

# Tolerances against the float64 reference, relative to max |reference|
# (per output / gradient tensor). float64 is exact up to summation order;
# float32 sums ~100 terms per element; half-precision storage is bounded by
# the output's own rounding (fp16 2^-11, bf16 2^-8) times a small factor.
TOLERANCES = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def check_against_reference(op, device, dtype, shapes, batch, queries, heads, channels, points, generator,
                            loc_dtype=None):
    """Forward and all three gradients of ``op`` vs the float64 reference.

    The reference runs on the same inputs after they were rounded to
    ``dtype``, so only the kernel's own arithmetic is measured.
    """
    from detr_cuda.ops.reference import ms_deform_attn_reference

    loc_dtype = loc_dtype or (torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)
    inputs = make_inputs(shapes, batch, queries, heads, channels, points, dtype=dtype, device=device,
                         generator=generator, loc_dtype=loc_dtype)
    value, spatial_shapes, level_start_index, locations, attention = inputs
    grad_output = torch.randn(batch, queries, heads * channels, generator=generator, dtype=torch.float64)

    leaves = [t.detach().clone().requires_grad_() for t in (value, locations, attention)]
    output = op(leaves[0], spatial_shapes, level_start_index, leaves[1], leaves[2])
    assert output.dtype == dtype and output.shape == (batch, queries, heads * channels)
    output.backward(grad_output.to(device=device, dtype=dtype))

    ref_leaves = [t.detach().double().cpu().requires_grad_() for t in (value, locations, attention)]
    ref_output = ms_deform_attn_reference(ref_leaves[0], spatial_shapes.cpu(), level_start_index.cpu(),
                                          ref_leaves[1], ref_leaves[2])
    # The kernel's grad_output was rounded to dtype; use the same numbers.
    ref_output.backward(grad_output.to(dtype).double())

    tolerance = TOLERANCES[dtype]
    pairs = [("output", output, ref_output)] + [
        (f"grad of {name}", leaf.grad, ref_leaf.grad)
        for name, leaf, ref_leaf in zip(("value", "sampling_locations", "attention_weights"), leaves, ref_leaves)]
    for name, actual, expected in pairs:
        assert actual.dtype == (dtype if name in ("output", "grad of value") else loc_dtype), name
        error = max_abs_error_ratio(actual.cpu(), expected)
        assert error <= tolerance, f"{name}: max error {error:.3g} x max|ref| > {tolerance:g} ({dtype}, {device})"
