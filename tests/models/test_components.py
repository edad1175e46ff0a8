"""Formulas of the building blocks: position encoding, frozen BN, reference points, proposals."""
import math

import torch
from torch import nn

from detr_cuda.models.backbone import FrozenBatchNorm2d, ResNet
from detr_cuda.models.deformable_encoder import DeformableTransformerEncoder
from detr_cuda.models.deformable_transformer import DeformableTransformer, proposal_position_embedding, valid_ratios
from detr_cuda.models.position_encoding import PositionEmbeddingSine


def test_sine_encoding_uses_the_half_pixel_offset():
    mask = torch.zeros(1, 4, 6, dtype=torch.bool)
    mask[:, :, 4:] = True  # valid width 4, height 4
    pos = PositionEmbeddingSine(num_pos_feats=8)(mask)
    assert pos.shape == (1, 16, 4, 6)
    y, x = 2, 1
    y_embed = (y + 1 - 0.5) / (4 + 1e-6) * 2 * math.pi
    x_embed = (x + 1 - 0.5) / (4 + 1e-6) * 2 * math.pi
    for i in range(8):
        dim_t = 10000 ** (2 * (i // 2) / 8)
        fn = math.sin if i % 2 == 0 else math.cos
        assert abs(pos[0, i, y, x].item() - fn(y_embed / dim_t)) < 1e-5
        assert abs(pos[0, 8 + i, y, x].item() - fn(x_embed / dim_t)) < 1e-5


def test_frozen_batchnorm_equals_batchnorm_in_eval():
    bn = nn.BatchNorm2d(5).eval()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    frozen = FrozenBatchNorm2d(5)
    frozen.load_state_dict(bn.state_dict())  # num_batches_tracked is dropped
    x = torch.randn(2, 5, 3, 3)
    torch.testing.assert_close(frozen(x), bn(x), rtol=1e-5, atol=1e-5)
    assert set(frozen.state_dict()) == {"weight", "bias", "running_mean", "running_var"}
    assert list(frozen.parameters()) == []


def test_resnet_levels_and_strides():
    for name, channels in (("resnet18", [64, 128, 256, 512]), ("resnet50", [256, 512, 1024, 2048])):
        body = ResNet(name)
        outputs = body(torch.zeros(1, 3, 64, 96))
        assert [o.shape[1] for o in outputs] == channels == body.num_channels
        assert [tuple(o.shape[-2:]) for o in outputs] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    dilated = ResNet("resnet50", dilation=True)
    assert dilated(torch.zeros(1, 3, 64, 96))[-1].shape[-2:] == (4, 6)
    assert dilated.layer4[1].conv2.dilation == (2, 2) and dilated.layer4[0].conv2.stride == (1, 1)


def test_encoder_reference_points_follow_the_valid_area():
    shapes = torch.tensor([[4, 4], [2, 2]])
    valid_ratios = torch.tensor([[[0.5, 1.0], [0.5, 1.0]]])  # valid width is half the map
    refs = DeformableTransformerEncoder.get_reference_points(shapes, valid_ratios, "cpu")
    assert refs.shape == (1, 20, 2, 2)
    # Token (y=1, x=0) of level 0: centre (0.5, 1.5) over valid (2, 4) -> (0.25, 0.375) of the
    # valid area, i.e. (0.125, 0.375) of the padded canvas on every level.
    torch.testing.assert_close(refs[0, 4], torch.tensor([[0.125, 0.375], [0.125, 0.375]]))


def test_valid_ratio_counts_unpadded_rows_and_columns():
    mask = torch.ones(1, 4, 8, dtype=torch.bool)
    mask[:, :3, :2] = False
    torch.testing.assert_close(valid_ratios(mask), torch.tensor([[0.25, 0.75]]))


def test_two_stage_proposals_mask_padding_and_borders():
    transformer = DeformableTransformer(d_model=32, nhead=2, num_encoder_layers=1, num_decoder_layers=1,
                                        dim_feedforward=32, num_feature_levels=1, two_stage=True,
                                        two_stage_num_proposals=4)
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[:, :, 3] = True
    memory = torch.randn(1, 16, 32)
    output_memory, proposals = transformer.gen_encoder_output_proposals(memory, mask.flatten(1),
                                                                        torch.tensor([[4, 4]]))
    assert output_memory.shape == (1, 16, 32) and proposals.shape == (1, 16, 4)
    proposals = proposals.view(4, 4, 4)
    assert torch.isinf(proposals[:, 3]).all()  # padded column
    # Pixel (y=1, x=1): centre (1.5 / 3, 1.5 / 4), size 0.05, as logits.
    expected = torch.tensor([1.5 / 3, 1.5 / 4, 0.05, 0.05])
    torch.testing.assert_close(proposals[1, 1], torch.log(expected / (1 - expected)))
    # Padded tokens feed a zero vector into enc_output.
    zero_token = transformer.enc_output_norm(transformer.enc_output(torch.zeros(32)))
    torch.testing.assert_close(output_memory[0, 3], zero_token)


def test_proposal_position_embedding_layout():
    boxes = torch.zeros(1, 1, 4)  # sigmoid 0.5 -> pi
    embedding = proposal_position_embedding(boxes, num_pos_feats=4)
    assert embedding.shape == (1, 1, 16)
    expected = []
    for _ in range(4):
        for i in range(4):
            angle = math.pi / 10000 ** (2 * (i // 2) / 4)
            expected.append(math.sin(angle) if i % 2 == 0 else math.cos(angle))
    torch.testing.assert_close(embedding[0, 0], torch.tensor(expected), atol=1e-6, rtol=1e-6)
