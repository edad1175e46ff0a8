"""The level geometry of multi-scale deformable attention: (spatial_shapes, level_start_index).

The operator needs both as int64 tensors on value's device, and must know that they agree with
value (S == sum of H_l * W_l, every level non-empty, level_start_index their prefix sums).
Reading a GPU tensor back to check it is a host sync, so the check is done once per tensor:

- :func:`level_geometry` makes the pair from level sizes given as Python ints (what a model has
  from its feature maps' shapes): they are checked on the host and remembered, so neither the
  operator nor the reference backend ever reads them back from the device;
- :func:`check_level_geometry` checks a pair that did not come from :func:`level_geometry`, reading
  it once and remembering it while the tensors are unchanged (their ``_version``).

:func:`level_shapes` gives the Python level sizes of a pair (from memory when known).
"""
import collections
import weakref

import torch

# The pairs known to be valid: id(spatial_shapes) -> (weak refs, versions, Python shapes, S).
_known = {}
_MAX_KNOWN = 8
# The pairs level_geometry made last: (shapes, device) -> (spatial_shapes, level_start_index).
_recent = collections.OrderedDict()


def _validate(shapes, starts):
    total = 0
    for level, ((height, width), start) in enumerate(zip(shapes, starts)):
        if height <= 0 or width <= 0:
            raise ValueError(f"ms_deform_attn: spatial_shapes[{level}] = ({height}, {width}); "
                             "every level needs a positive height and width")
        if start != total:
            raise ValueError(f"ms_deform_attn: level_start_index[{level}] = {start}, expected {total} "
                             f"(the sum of H_l*W_l over the levels before it; spatial_shapes "
                             f"{[list(shape) for shape in shapes]})")
        total += height * width
    return total


def _remember(spatial_shapes, level_start_index, shapes, total):
    if len(_known) >= _MAX_KNOWN:
        for key in [key for key, entry in _known.items() if entry[0]() is None] or list(_known)[:1]:
            del _known[key]
    _known[id(spatial_shapes)] = (weakref.ref(spatial_shapes), spatial_shapes._version,
                                  weakref.ref(level_start_index), level_start_index._version, shapes, total)


def _lookup(spatial_shapes, level_start_index=None):
    entry = _known.get(id(spatial_shapes))
    if entry is None or entry[0]() is not spatial_shapes or entry[1] != spatial_shapes._version:
        return None
    if level_start_index is not None and (entry[2]() is not level_start_index or entry[3] != level_start_index._version):
        return None
    return entry


def level_geometry(shapes, device):
    """(spatial_shapes (L, 2) int64, level_start_index (L,) int64) on ``device`` for level sizes
    ``shapes`` = [(H_l, W_l), ...] given as Python ints; known valid from then on (no host sync).
    The last few pairs are reused for the same sizes, so a run of same-size batches copies nothing
    to the device (do not modify them in place)."""
    shapes = [(int(height), int(width)) for height, width in shapes]
    key = (tuple(shapes), str(device))
    reused = None if torch.compiler.is_compiling() else _recent.get(key)
    if reused is not None and _lookup(reused[0], reused[1]) is not None:
        _recent.move_to_end(key)
        return reused
    starts, total = [], 0
    for height, width in shapes:
        starts.append(total)
        total += height * width
    _validate(shapes, starts)
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64, device=device).reshape(len(shapes), 2)
    level_start_index = torch.tensor(starts, dtype=torch.int64, device=device)
    if not torch.compiler.is_compiling():
        _remember(spatial_shapes, level_start_index, shapes, total)
        _recent[key] = (spatial_shapes, level_start_index)
        if len(_recent) > _MAX_KNOWN:
            _recent.popitem(last=False)
    return spatial_shapes, level_start_index


def check_level_geometry(spatial_shapes, level_start_index, num_values):
    """Raises ValueError unless S == sum(H_l * W_l), every level is non-empty and level_start_index
    holds the prefix sums. Reads the tensors (a host sync on a GPU) only the first time."""
    entry = _lookup(spatial_shapes, level_start_index)
    if entry is None:
        shapes = [tuple(shape) for shape in spatial_shapes.tolist()]
        total = _validate(shapes, level_start_index.tolist())
        _remember(spatial_shapes, level_start_index, shapes, total)
    else:
        shapes, total = entry[4], entry[5]
    if total != num_values:
        raise ValueError(f"ms_deform_attn: value has S={num_values} positions but spatial_shapes "
                         f"{[list(shape) for shape in shapes]} sum to {total}")


def level_shapes(spatial_shapes):
    """[(H_l, W_l), ...] as Python ints: remembered for known pairs, else read from the tensor."""
    entry = None if torch.compiler.is_compiling() else _lookup(spatial_shapes)
    if entry is not None:
        return entry[4]
    return [(int(height), int(width)) for height, width in spatial_shapes.tolist()]
