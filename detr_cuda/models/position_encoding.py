"""Sine encodings: of pixel positions (PositionEmbeddingSine) and of boxes (:func:`sine_features`)."""
import math

import torch
from torch import nn


def sine_features(values, num_pos_feats, temperature=10000):
    """(...) values, already scaled (e.g. by 2*pi) -> (..., num_pos_feats): values / temperature **
    (2 * (i // 2) / num_pos_feats), sine on even and cosine on odd features (interleaved)."""
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=values.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    scaled = values[..., None] / dim_t
    return torch.stack((scaled[..., 0::2].sin(), scaled[..., 1::2].cos()), dim=-1).flatten(-2)


class PositionEmbeddingSine(nn.Module):
    """Normalised 2-d sine/cosine encoding of the unpadded area.

    forward(mask (B, H, W) bool, True = padded) -> (B, 2 * num_pos_feats, H, W):
    channels are the y encoding then the x encoding, each interleaved
    (sin, cos, sin, cos, ...). Coordinates are the 1-based cumulative count of
    unpadded pixels minus 0.5 (Deformable DETR's offset; DETR has none),
    divided by the valid extent and multiplied by ``scale`` (2*pi). DINO uses offset 0 and
    temperature 20 (``model.position_offset``, ``model.position_temperature``).
    """

    def __init__(self, num_pos_feats=128, temperature=10000, normalize=True, scale=2 * math.pi, offset=-0.5):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale
        self.offset = offset

    def forward(self, mask):
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] + eps) * self.scale
        pos_x = sine_features(x_embed, self.num_pos_feats, self.temperature)
        pos_y = sine_features(y_embed, self.num_pos_feats, self.temperature)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def build_position_encoding(cfg):
    hidden_dim = cfg.model.hidden_dim
    if hidden_dim % 2 != 0:
        raise ValueError(f"model.hidden_dim must be even for the sine position encoding, got {hidden_dim}")
    return PositionEmbeddingSine(hidden_dim // 2, temperature=cfg.model.position_temperature, normalize=True,
                                 offset=cfg.model.position_offset)
