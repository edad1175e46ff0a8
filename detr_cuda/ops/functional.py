"""The ms_deform_attn operator's Python face.

Provisional: calls the pure-PyTorch reference until the compiled backends
land (issue: MSDeformAttn operator).
"""
from .reference import ms_deform_attn_reference


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
                   attention_weights, backend=None):
    """Multi-scale deformable attention. Shapes as in ``ms_deform_attn_reference``."""
    return ms_deform_attn_reference(value, spatial_shapes, level_start_index,
                                    sampling_locations, attention_weights)
