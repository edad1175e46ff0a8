"""Multi-scale deformable attention: the operator, its level geometry and the layer around it."""
from .functional import ms_deform_attn
from .geometry import level_geometry
from .module import MSDeformAttn, msda_backend
from .reference import ms_deform_attn_reference

__all__ = ["ms_deform_attn", "ms_deform_attn_reference", "level_geometry", "MSDeformAttn", "msda_backend"]
