"""Pictures: decoder sampling points captured by a hook (and what they mean in pixels), ground truth
beside predictions."""
import itertools
import math
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tests.support.paths import REPO_ROOT
from tests.support.configs import tiny_detector_config

from detr_cuda.data.loader import collate_fn
from detr_cuda.inference import Detector, read_image
from detr_cuda.inference.drawing import LEVEL_COLOURS, colour_for, draw_sampling_points, shared_colour_indices
from detr_cuda.inference.attention import (SamplingRecorder, capture_decoder_sampling, last_decoder_cross_attention,
                                           query_points_in_image)
from detr_cuda.inference.visualize import render_attention, write_ground_truth_vs_predictions
from detr_cuda.models import build_model
from detr_cuda.ops import ms_deform_attn_reference

sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
import visualize as visualize_tool  # noqa: E402


def _first_image(shapes):
    return os.path.join(shapes["images"], sorted(os.listdir(shapes["images"]))[0])


def _recompute_layer_output(model, pixels, padding_mask):
    """(record, layer output, the output recomputed by the operator from the recorded locations)."""
    layer = last_decoder_cross_attention(model)
    seen = {}

    def keep_io(module, args, output):
        seen["args"], seen["output"] = args, output

    handle = layer.register_forward_hook(keep_io)
    try:
        _, record = capture_decoder_sampling(model, pixels, padding_mask)
    finally:
        handle.remove()
    _, _, input_flatten, spatial_shapes, level_start_index, input_padding_mask = seen["args"]
    with torch.no_grad():
        value = layer.value_proj(input_flatten).masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(*value.shape[:2], layer.n_heads, -1)
        again = layer.output_proj(ms_deform_attn_reference(value, spatial_shapes, level_start_index,
                                                           record["sampling_locations"],
                                                           record["attention_weights"]))
    return record, seen["output"], again


def test_recorded_locations_are_the_ones_the_layer_samples(tiny_trained):
    """Re-running the operator on the recorded locations and weights reproduces the layer's output,
    for a padded batch of two differently sized images (2-d reference points)."""
    checkpoint, shapes = tiny_trained
    detector = Detector.from_checkpoint(checkpoint, device="cpu")
    names = sorted(os.listdir(shapes["images"]))[:2]
    images = [read_image(os.path.join(shapes["images"], name)).resize(size)
              for name, size in zip(names, [(96, 96), (128, 96)])]
    pixels, padding_mask, _ = collate_fn([(detector.preprocess(image), {}) for image in images])
    assert padding_mask[0].any() and not padding_mask[1].any()   # 96 x 96 padded to 96 x 128
    record, output, again = _recompute_layer_output(detector.model, pixels, padding_mask)
    torch.testing.assert_close(again, output, rtol=1e-5, atol=1e-5)
    assert record["sampling_locations"].shape == (2, 10, 4, 4, 2, 2)
    assert record["reference_points"].shape[-1] == 2
    # The narrower image fills part of the padded canvas's width; the recorder knows how much.
    assert (record["valid_ratios"][1] == 1).all()
    # (The 2 x 2 stride-64 level rounds 1.5 valid columns up to all of them.)
    torch.testing.assert_close(record["valid_ratios"][0][:, 0], torch.tensor([0.75, 0.75, 0.75, 1.0]))
    assert (record["valid_ratios"][0][:, 1] == 1).all()


def test_recorded_locations_two_stage_box_references():
    """Two-stage + box refinement: 4-d reference boxes scale the offsets; same check."""
    torch.manual_seed(0)
    model, _, _ = build_model(tiny_detector_config("model.with_box_refine=true", "model.two_stage=true"), 3)
    model.eval()
    pixels = torch.randn(2, 3, 96, 128)
    padding_mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    padding_mask[1, 64:, :] = True
    record, output, again = _recompute_layer_output(model, pixels, padding_mask)
    torch.testing.assert_close(again, output, rtol=1e-5, atol=1e-5)
    assert record["reference_points"].shape[-1] == 4


def test_recorder_requires_msdeformattn():
    with pytest.raises(TypeError, match="MSDeformAttn"):
        SamplingRecorder(torch.nn.Linear(2, 2))


def test_points_in_image_undo_the_valid_ratio():
    """Canvas-normalised location -> pixel of the original image: divide by the level's valid
    ratio, scale by the original size."""
    locations = torch.zeros(1, 1, 1, 2, 1, 2)
    locations[0, 0, 0, 0, 0] = torch.tensor([0.25, 0.5])   # level 0
    locations[0, 0, 0, 1, 0] = torch.tensor([0.5, 0.2])    # level 1
    record = {"sampling_locations": locations, "attention_weights": torch.ones(1, 1, 1, 2, 1),
              "reference_points": torch.tensor([[[[0.25, 0.25], [0.25, 0.25]]]]),
              "valid_ratios": torch.tensor([[[0.5, 1.0], [0.5, 0.8]]])}
    found = query_points_in_image(record, 0, 0, (200, 300))   # (h, w)
    torch.testing.assert_close(found["points"][0], torch.tensor([[150.0, 100.0]]))
    torch.testing.assert_close(found["points"][1], torch.tensor([[300.0, 50.0]]))
    assert found["reference_point"] == pytest.approx((150.0, 50.0))


def test_attention_picture_of_trained_model(tiny_trained, tmp_path, capsys):
    checkpoint, shapes = tiny_trained
    detector = Detector.from_checkpoint(checkpoint, device="cpu")
    image = read_image(_first_image(shapes))
    picture, info = render_attention(detector, image)
    assert picture.width == image.width and picture.height > image.height  # the legend band below
    assert len(info["points"]) == 4                      # one list per level
    points = torch.cat(info["points"])
    assert points.shape == (4 * 4 * 2, 2)                # levels * heads * points
    assert torch.isfinite(points).all()
    inside = (points[:, 0] >= 0) & (points[:, 0] < image.width) & (points[:, 1] >= 0) & (points[:, 1] < image.height)
    # Offsets start at most n_points cells from the reference point and move little in training, so
    # the fine levels sample around the query's box; only the coarse ones (stride 32 and 64 on this
    # ~90-px image) reach far. Most points lie inside; level-0 points within two stride-8 cells of it.
    assert inside.float().mean() >= 0.5
    level0 = info["points"][0]
    margin = 2 * 8
    assert (level0 >= -margin).all()
    assert (level0[:, 0] < image.width + margin).all() and (level0[:, 1] < image.height + margin).all()
    ref_x, ref_y = info["reference_point"]
    assert 0 <= ref_x < image.width and 0 <= ref_y < image.height
    # Each drawn point changed the picture there (level colour or its black outline).
    drawn = [(x, y) for x, y in points[inside].floor().long().tolist()]
    assert drawn
    assert all(picture.getpixel(xy) != image.getpixel(xy) for xy in drawn)

    code = visualize_tool.main(["attention", "--checkpoint", checkpoint, "--image", _first_image(shapes),
                                "--output-dir", str(tmp_path), "--device", "cpu", "--query", "3"])
    assert code == 0
    assert "query 3" in capsys.readouterr().err
    (written,) = os.listdir(tmp_path)
    with Image.open(tmp_path / written) as saved:
        assert saved.width == image.width and saved.height > image.height
    with pytest.raises(ValueError, match="out of range"):
        render_attention(detector, image, query=10)


def test_attention_legend_never_covers_a_small_image():
    """The title and level legend used to cover about a third of a ~100-pixel image; they now sit in
    a band below it, wrapped to its width, and the image's pixels are only touched by the points."""
    image = Image.new("RGB", (96, 72), (128, 128, 128))
    points = [torch.tensor([[90.0, 66.0]]) for _ in range(4)]
    picture = draw_sampling_points(image, points, title="query 7: traffic light 0.42")
    assert picture.width == 96 and picture.height > 72
    untouched = picture.crop((0, 0, 80, 60))
    assert untouched.getcolors() == [(80 * 60, (128, 128, 128))]
    band = {tuple(pixel) for pixel in np.asarray(picture.crop((0, 72, 96, picture.height))).reshape(-1, 3).tolist()}
    assert set(LEVEL_COLOURS[:4]) <= band and min(map(sum, band)) < 60  # chips and dark title text


def test_palette_separates_80_classes():
    palette = [colour_for(index) for index in range(80)]
    distances = [math.dist(a, b) for a, b in itertools.combinations(palette, 2)]
    assert min(distances) >= 50                 # every pair differs visibly
    assert min(math.dist(a, b) for a, b in itertools.combinations(palette[:10], 2)) >= 100
    # compare pictures: a ground-truth name and the same model class share one colour; others differ
    colours = shared_colour_indices(["cat", "Traffic light"], ["traffic_light", "zebra"])
    assert colours == {"cat": 0, "Traffic light": 1, "traffic_light": 1, "zebra": 2}


def test_ground_truth_vs_predictions(tiny_trained, tmp_path):
    checkpoint, shapes = tiny_trained
    code = visualize_tool.main(["compare", "--checkpoint", checkpoint, "--images", shapes["images"],
                                "--annotations", shapes["annotations"], "--num-images", "2",
                                "--output-dir", str(tmp_path), "--device", "cpu"])
    assert code == 0
    written = sorted(os.listdir(tmp_path))
    assert written == ["compare_1.jpg", "compare_2.jpg"]
    with Image.open(os.path.join(shapes["images"], sorted(os.listdir(shapes["images"]))[0])) as original:
        width, height = original.size
    with Image.open(tmp_path / "compare_1.jpg") as picture:
        assert picture.width == 2 * width + 8
        assert picture.height > height
    code = visualize_tool.main(["compare", "--checkpoint", checkpoint, "--images", shapes["images"],
                                "--annotations", shapes["annotations"], "--image-ids", "3",
                                "--output-dir", str(tmp_path / "png"), "--device", "cpu", "--image-format", "png"])
    assert code == 0
    with Image.open(tmp_path / "png" / "compare_3.png") as picture:
        assert picture.format == "PNG"
    detector = Detector.from_checkpoint(checkpoint, device="cpu")
    with pytest.raises(ValueError, match="not in"):
        write_ground_truth_vs_predictions(detector, shapes["images"], shapes["annotations"], str(tmp_path),
                                          image_ids=[12345])
