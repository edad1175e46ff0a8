"""What benchmarks/bench_msda.py measures: the operator shapes (Deformable DETR's defaults), their
inputs with realistic or uniform sampling locations, and the modelled memory-traffic floors of
/work/shared/kernel_floors.py (rewritten here) that GPU times are compared with."""
import math

import torch


MAPS_800 = [(100, 167), (50, 84), (25, 42), (13, 21)]
MAPS_320 = [(40, 40), (20, 20), (10, 10), (5, 5)]
BATCH, HEADS, CHANNELS, POINTS = 2, 8, 32, 4
SHAPES = {
    "enc320": dict(levels=MAPS_320, queries=None, encoder=True, batch=BATCH),
    "enc800": dict(levels=MAPS_800, queries=None, encoder=True, batch=BATCH),
    "enc800b8": dict(levels=MAPS_800, queries=None, encoder=True, batch=8),
    "dec300": dict(levels=MAPS_800, queries=300, encoder=False, batch=BATCH),
    "dec900": dict(levels=MAPS_800, queries=900, encoder=False, batch=BATCH),
    "tiny": dict(levels=[(8, 8), (4, 4), (2, 2), (1, 1)], queries=None, encoder=True, batch=BATCH),
}
DEFAULT_SHAPES = {"cpu": ["enc320", "dec300", "dec900"], "cuda": ["enc800", "enc800b8", "dec300", "dec900"]}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}

# Machine numbers for the floors (kernel_floors.py): HBM bytes/s, SMs, clock.
GPU_SPECS = {"H100": dict(hbm=3.35e12, sms=132, clock=1.98e9), "H200": dict(hbm=4.8e12, sms=132, clock=1.98e9)}


# ------------------------------------------------------------------- inputs

def make_inputs(shape_name, dtype, device, distribution="realistic", seed=0):
    """(value, spatial_shapes, level_start_index, sampling_locations, attention_weights).

    value is in ``dtype``; locations and weights are float32 (float64 for a
    float64 value), the dtype contract the model uses.
    """
    spec = SHAPES[shape_name]
    generator = torch.Generator().manual_seed(seed)
    levels = spec["levels"]
    batch = spec["batch"]
    spatial_shapes = torch.tensor(levels, dtype=torch.int64)
    areas = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    num_values = int(areas.sum())
    queries = num_values if spec["encoder"] else spec["queries"]
    loc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    num_levels = len(levels)

    value = torch.randn(batch, num_values, HEADS, CHANNELS, generator=generator).to(dtype)
    if distribution == "uniform":
        locations = torch.rand(batch, queries, HEADS, num_levels, POINTS, 2, generator=generator)
    else:
        if spec["encoder"]:  # queries are the pixel centres of every level
            centres = []
            for height, width in levels:
                ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
                centres.append(torch.stack([(xs.flatten() + 0.5) / width, (ys.flatten() + 0.5) / height], -1))
            reference = torch.cat(centres)[None].expand(batch, -1, -1)
        else:
            reference = torch.rand(batch, queries, 2, generator=generator)
        thetas = torch.arange(HEADS) * (2 * math.pi / HEADS)
        directions = torch.stack([thetas.cos(), thetas.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True)[0]
        radius = torch.arange(1, POINTS + 1, dtype=torch.float32)
        pixel_offsets = directions[:, None, None, :] * radius[None, None, :, None]  # (H, 1, P, 2)
        locations = torch.randn(batch, queries, HEADS, num_levels, POINTS, 2, generator=generator).mul_(0.5)
        locations.add_(pixel_offsets)
        normaliser = torch.tensor([[w, h] for h, w in levels], dtype=torch.float32)  # (L, 2) as (W, H)
        locations.div_(normaliser[:, None, :]).add_(reference[:, :, None, None, None, :])
    logits = torch.randn(batch, queries, HEADS, num_levels * POINTS, generator=generator)
    attention = logits.softmax(-1).view(batch, queries, HEADS, num_levels, POINTS)
    return (value.to(device), spatial_shapes.to(device), level_start_index.to(device),
            locations.to(device=device, dtype=loc_dtype), attention.to(device=device, dtype=loc_dtype))


# ---------------------------------------------------------------- backends


def traffic_bytes(shape_name, value_bytes):
    """Compulsory memory traffic of one call (kernel_floors.py's model).

    Returns (forward bytes, backward bytes incl. the grad_value zero-fill,
    gathered corner bytes). Locations and weights are float32, grad_value
    accumulates in float32.
    """
    spec = SHAPES[shape_name]
    num_values = sum(h * w for h, w in spec["levels"])
    queries = num_values if spec["encoder"] else spec["queries"]
    levels = len(spec["levels"])
    batch = spec["batch"]
    samples = batch * queries * HEADS * levels * POINTS
    value = batch * num_values * HEADS * CHANNELS * value_bytes
    locations = samples * 2 * 4
    attention = samples * 4
    output = batch * queries * HEADS * CHANNELS * value_bytes
    gathered = samples * 4 * CHANNELS * value_bytes
    value_read = value if spec["encoder"] else min(value, gathered)
    grad_value = batch * num_values * HEADS * CHANNELS * 4
    grad_value_written = grad_value if spec["encoder"] else min(grad_value, samples * 4 * CHANNELS * 4)
    forward = value_read + locations + attention + output
    backward = value_read + output + locations + attention + grad_value_written + locations + attention
    return forward, backward + grad_value, gathered


def floor_ms(shape_name, value_bytes, gpu):
    forward, backward, gathered = traffic_bytes(shape_name, value_bytes)
    l1_bytes_per_s = gpu["sms"] * 128 * gpu["clock"]
    forward_floor = max(forward / gpu["hbm"], gathered / l1_bytes_per_s)
    backward_floor = max(backward / gpu["hbm"], gathered / l1_bytes_per_s)
    return forward_floor * 1e3, backward_floor * 1e3, forward, backward


# -------------------------------------------------------------------- main
