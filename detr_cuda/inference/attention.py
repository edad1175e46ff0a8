"""Where the decoder looks: sampling locations of a decoder layer's deformable cross-attention.

A forward hook on the layer's ``MSDeformAttn`` receives the layer's own inputs
(query, reference points, spatial shapes, padding mask) and recomputes the
sampling locations and attention weights from them with the layer's formula,
so neither the operator nor the model changes. Locations are normalised to the
padded canvas of each level (what the operator samples); :func:`query_points_in_image`
turns them into pixels of the original image.
"""
import torch

from ..models.deformable_transformer import valid_ratios
from ..ops import MSDeformAttn
from ..ops.geometry import level_shapes


def valid_ratios_from_padding(padding_mask, spatial_shapes, batch):
    """(B, S) bool padding mask of the flattened levels -> (B, L, 2) valid fraction (w, h) per level,
    as the transformer computes it (:func:`detr_cuda.models.deformable_transformer.valid_ratios`)."""
    if padding_mask is None:
        return torch.ones(batch, len(spatial_shapes), 2)
    ratios, start = [], 0
    for height, width in level_shapes(spatial_shapes):
        ratios.append(valid_ratios(padding_mask[:, start:start + height * width].view(batch, height, width).cpu()))
        start += height * width
    return torch.stack(ratios, 1)


class SamplingRecorder:
    """Context manager: records, at each call of ``layer`` (an MSDeformAttn), a dict with
    ``sampling_locations`` (B, Q, H, L, P, 2) on the padded canvas, ``attention_weights``
    (B, Q, H, L, P), ``reference_points`` (B, Q, L, 2|4), ``spatial_shapes`` (L, 2) and
    ``valid_ratios`` (B, L, 2) (all on the CPU). ``records`` keeps every call in order."""

    def __init__(self, layer):
        if not isinstance(layer, MSDeformAttn):
            raise TypeError(f"SamplingRecorder needs an MSDeformAttn layer, got {type(layer).__name__}")
        self.layer = layer
        self.records = []
        self._handle = None

    def _hook(self, module, args, kwargs, output):
        names = ("query", "reference_points", "input_flatten", "input_spatial_shapes", "input_level_start_index",
                 "input_padding_mask")
        inputs = dict(zip(names, args))
        inputs.update(kwargs)
        with torch.no_grad():
            locations, weights = module.sampling_locations(inputs["query"], inputs["reference_points"],
                                                           inputs["input_spatial_shapes"])
        spatial_shapes = inputs["input_spatial_shapes"]
        self.records.append({
            "sampling_locations": locations.detach().float().cpu(),
            "attention_weights": weights.detach().float().cpu(),
            "reference_points": inputs["reference_points"].detach().float().cpu(),
            "spatial_shapes": spatial_shapes.detach().cpu(),
            "valid_ratios": valid_ratios_from_padding(inputs.get("input_padding_mask"), spatial_shapes,
                                                      locations.shape[0]),
        })

    def __enter__(self):
        self._handle = self.layer.register_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        self._handle = None
        return False


def last_decoder_cross_attention(model):
    """The MSDeformAttn of the detector's last decoder layer."""
    return model.transformer.decoder.layers[-1].cross_attn


@torch.no_grad()
def capture_decoder_sampling(model, images, padding_mask, layer=None):
    """Runs ``model`` once and returns (outputs, record) where record is the
    :class:`SamplingRecorder` dict of ``layer`` (default: the last decoder layer's cross-attention)."""
    layer = layer if layer is not None else last_decoder_cross_attention(model)
    with SamplingRecorder(layer) as recorder:
        outputs = model(images, padding_mask)
    if len(recorder.records) != 1:
        raise RuntimeError(f"expected the attention layer to run once, it ran {len(recorder.records)} times")
    return outputs, recorder.records[0]


def query_points_in_image(record, batch_index, query_index, image_size):
    """One query's sampling points in pixels of the original image.

    image_size: (h, w) of the original image (the model saw it resized, maybe padded).
    Returns {"points": list over levels of (H*P, 2) pixel (x, y), "weights": list of (H*P,),
    "reference_point": (x, y) pixels of the query's reference point (its box centre when 4-d)}.
    A location normalised to level l's padded canvas maps to the unpadded image by dividing
    by that level's valid ratio, exactly undoing the model's scaling of its reference points.
    """
    height, width = image_size
    locations = record["sampling_locations"][batch_index, query_index]   # (H, L, P, 2)
    weights = record["attention_weights"][batch_index, query_index]       # (H, L, P)
    ratios = record["valid_ratios"][batch_index]                          # (L, 2)
    scale = torch.tensor([width, height], dtype=torch.float32)
    points, point_weights = [], []
    for level in range(locations.shape[1]):
        in_image = locations[:, level].reshape(-1, 2) / ratios[level] * scale
        points.append(in_image)
        point_weights.append(weights[:, level].reshape(-1))
    reference = record["reference_points"][batch_index, query_index, 0, :2] / ratios[0] * scale
    return {"points": points, "weights": point_weights, "reference_point": tuple(reference.tolist())}
