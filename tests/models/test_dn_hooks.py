"""Hooks the DN training builds on: prefix queries and the decoder self-attention mask."""
import pytest
import torch

from detr_cuda.models import build_model
from tests.support.configs import VARIANTS, tiny_model_config
from tests.support.models import padded_batch


@pytest.mark.parametrize("variant", ["box_refine", "two_stage"])
def test_blocked_prefix_queries_leave_matching_queries_unchanged(variant):
    torch.manual_seed(0)
    model, _, _ = build_model(tiny_model_config(*VARIANTS[variant]), 4)
    model.eval()
    images, mask = padded_batch([(64, 96), (80, 64)])
    srcs, masks, positions = model.multi_scale_features(images, mask)
    query_embed = None if model.two_stage else model.query_embed.weight
    plain = model.transformer(srcs, masks, positions, query_embed)

    batch, prefix, queries, dim = 2, 3, model.num_queries, model.transformer.d_model
    ref_dim = plain[1].shape[-1]
    prefix_queries = {"tgt": torch.randn(batch, prefix, dim), "query_pos": torch.randn(batch, prefix, dim),
                      "reference_points": torch.rand(batch, prefix, ref_dim) * 0.8 + 0.1}
    total = prefix + queries
    attn_mask = torch.zeros(total, total, dtype=torch.bool)
    attn_mask[prefix:, :prefix] = True  # matching queries may not see the prefix
    hs, init_reference, inter_references, _, _ = model.transformer(
        srcs, masks, positions, query_embed, prefix_queries=prefix_queries, self_attn_mask=attn_mask)
    assert hs.shape == (model.transformer.decoder.num_layers, batch, total, dim)
    torch.testing.assert_close(hs[:, :, prefix:], plain[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(init_reference[:, prefix:], plain[1])
    torch.testing.assert_close(inter_references[:, :, prefix:], plain[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(init_reference[:, :prefix], prefix_queries["reference_points"])

    # Without the mask the prefix does reach the matching queries.
    unmasked = model.transformer(srcs, masks, positions, query_embed, prefix_queries=prefix_queries)
    assert not torch.allclose(unmasked[0][:, :, prefix:], plain[0], atol=1e-4)

    # The heads apply to the concatenated queries unchanged.
    logits, boxes = model.predict(hs, init_reference, inter_references)
    assert logits.shape[:3] == boxes.shape[:3] == (model.transformer.decoder.num_layers, batch, total)


def test_prefix_reference_dimension_must_match():
    torch.manual_seed(0)
    model, _, _ = build_model(tiny_model_config(), 4)
    images, mask = padded_batch([(64, 64)])
    srcs, masks, positions = model.multi_scale_features(images, mask)
    prefix = {"tgt": torch.randn(1, 2, 64), "reference_points": torch.rand(1, 2, 4)}
    with pytest.raises(ValueError, match="prefix_queries reference_points end in 4"):
        model.transformer(srcs, masks, positions, model.query_embed.weight, prefix_queries=prefix)
