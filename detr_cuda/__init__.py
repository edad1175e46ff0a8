"""detr_cuda: Deformable DETR with DN training on a custom MSDeformAttn operator."""

__version__ = "0.1.0"
