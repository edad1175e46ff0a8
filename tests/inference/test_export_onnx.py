"""ONNX export through the reference operator, run by onnxruntime on the CPU and compared with PyTorch."""
import pytest
import torch

from tests.support.configs import DINO, tiny_detector_config

from detr_cuda.inference.export import compare_onnx, export_onnx
from detr_cuda.models import build_model
from detr_cuda.ops import MSDeformAttn

onnx = pytest.importorskip("onnx", reason="onnx not installed (pip install onnx onnxruntime)")
pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install onnx onnxruntime)")

HEIGHT, WIDTH = 64, 96


VARIANTS = {"single_stage": [], "two_stage_refine": ["model.with_box_refine=true", "model.two_stage=true"],
            "dn_anchor_refine": ["model.with_box_refine=true", "model.query_type=anchor", "dn.enabled=true"],
            "dino": DINO}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def exported(tmp_path_factory, request):
    torch.manual_seed(0)
    model, _, _ = build_model(tiny_detector_config("model.msda_backend=null", *VARIANTS[request.param]), 4)
    model.eval()
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    export_onnx(model, path, HEIGHT, WIDTH)
    return model, path


def test_graph_uses_grid_sample_at_opset_16_or_more(exported):
    model, path = exported
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    opset = max(entry.version for entry in graph.opset_import if entry.domain in ("", "ai.onnx"))
    assert opset >= 16
    assert any(node.op_type == "GridSample" for node in graph.graph.node)
    assert [i.name for i in graph.graph.input] == ["images", "padding_mask"]
    assert [o.name for o in graph.graph.output] == ["pred_logits", "pred_boxes"]
    # Exporting switched to the reference backend only for the export.
    assert all(layer.backend is None for layer in model.modules() if isinstance(layer, MSDeformAttn))


@pytest.mark.parametrize("batch", [1, 3])
def test_onnxruntime_matches_pytorch(exported, batch):
    """The batch axis is dynamic; padded images (mask) give the same answer as in PyTorch."""
    model, path = exported
    generator = torch.Generator().manual_seed(batch)
    images = torch.randn(batch, 3, HEIGHT, WIDTH, generator=generator)
    padding_mask = torch.zeros(batch, HEIGHT, WIDTH, dtype=torch.bool)
    padding_mask[-1, :, WIDTH - 30:] = True
    padding_mask[-1, HEIGHT - 16:, :] = True
    images[padding_mask[:, None].expand_as(images)] = 0.0
    differences = compare_onnx(model, path, images, padding_mask)
    assert differences["pred_logits"] < 1e-4, differences
    assert differences["pred_boxes"] < 1e-5, differences


def test_opset_without_grid_sample_is_refused(tmp_path):
    model, _, _ = build_model(tiny_detector_config(), 4)
    with pytest.raises(ValueError, match="GridSample"):
        export_onnx(model.eval(), tmp_path / "x.onnx", HEIGHT, WIDTH, opset=15)
