"""Multi-scale deformable attention: the operator and the layer around it."""
from .functional import ms_deform_attn
from .module import MSDeformAttn
from .reference import ms_deform_attn_reference

__all__ = ["ms_deform_attn", "ms_deform_attn_reference", "MSDeformAttn"]
