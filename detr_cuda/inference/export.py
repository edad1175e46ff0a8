"""Shipping the detector: ONNX (through the reference operator) and torch.export programs.

Both export :class:`InferenceModel`: ``(images (B, 3, H, W) float normalised, padding_mask (B, H, W)
bool True = padded) -> (pred_logits (B, Q, K), pred_boxes (B, Q, 4) cxcywh normalised to each
unpadded image)``; top-k selection and scaling to pixels stay outside the graph
(:class:`detr_cuda.models.PostProcess`).

Shapes that may vary after export:

- ONNX (TorchScript exporter): the batch size is dynamic; H and W are fixed at
  export time, because the per-level feature sizes become constants of the
  graph. Serve other image sizes by padding them into the exported canvas with
  ``padding_mask`` (the model is exact under padding: it rescales reference
  points by the valid ratio of each level).
- torch.export: batch size, H and W are all fixed at export time. The model
  reads its level sizes with ``spatial_shapes.tolist()``, which torch.export
  sees as data-dependent values; :func:`export_program` therefore uses
  ``torch.export.draft_export``, which specialises them to the traced values
  and guards them at run time (a different input shape fails a guard with a
  clear message). A dynamic batch needs the model to keep its level sizes as
  Python ints next to the tensor; with the current model, draft_export
  specialises the batch too (and takes minutes trying).

The operator inside the graph: ONNX has no custom op for deformable attention,
so the ONNX path forces the pure-PyTorch reference backend (grid_sample,
opset >= 16). torch.export keeps the backend the model was built with; with
the compiled extension that is the registered custom op
``torch.ops.detr_cuda.ms_deform_attn_forward``, and a process that loads the
program must ``import detr_cuda.ops`` (which registers it) before running it.
"""
import contextlib
import logging

import numpy as np
import torch
from torch import nn

from ..ops import msda_backend

MIN_ONNX_OPSET = 16  # first opset with GridSample
DEFAULT_ONNX_OPSET = 17


class InferenceModel(nn.Module):
    """The detector without training outputs: forward(images, padding_mask) -> (pred_logits, pred_boxes)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images, padding_mask):
        outputs = self.model(images, padding_mask)
        return outputs["pred_logits"], outputs["pred_boxes"]


def example_inputs(batch_size, height, width, device="cpu", seed=0):
    """Random normalised images (B, 3, H, W) and an all-valid padding mask (B, H, W)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, height, width, generator=generator).to(device)
    return images, torch.zeros(batch_size, height, width, dtype=torch.bool, device=device)


def export_onnx(model, path, height, width, batch_size=1, opset=DEFAULT_ONNX_OPSET):
    """Writes the ONNX graph of ``model`` (a DeformableDETR) for (height, width) images to ``path``.

    Inputs ``images`` float32 (batch, 3, height, width) and ``padding_mask`` bool (batch, height,
    width); outputs ``pred_logits``, ``pred_boxes``; the batch axis is dynamic. Deformable attention
    runs through the reference backend (grid_sample).
    """
    if opset < MIN_ONNX_OPSET:
        raise ValueError(f"opset {opset} has no GridSample; use opset >= {MIN_ONNX_OPSET}")
    wrapper = InferenceModel(model).eval()
    inputs = example_inputs(batch_size, height, width, next(model.parameters()).device)
    batch_axis = {0: "batch"}
    with msda_backend(model, "reference"), torch.no_grad(), _quiet_tracer():
        torch.onnx.export(wrapper, inputs, str(path), dynamo=False, opset_version=opset,
                          input_names=["images", "padding_mask"], output_names=["pred_logits", "pred_boxes"],
                          dynamic_axes={"images": batch_axis, "padding_mask": batch_axis,
                                        "pred_logits": batch_axis, "pred_boxes": batch_axis})
    return path


@contextlib.contextmanager
def _quiet_tracer():
    """The tracer warns at every Python-level use of a tensor value (shape checks, .tolist() of the
    level sizes); they are the expected reason H and W are fixed, so they are silenced. The legacy
    (TorchScript) exporter is chosen on purpose: the torch.export-based one needs onnxscript and
    meets the same data-dependent level sizes as :func:`export_program`."""
    import warnings
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message="The feature will be removed", category=DeprecationWarning)
        yield


def run_onnx(path, images, padding_mask):
    """Runs the exported graph with onnxruntime on the CPU -> (pred_logits, pred_boxes) numpy arrays."""
    try:
        import onnxruntime
    except ImportError as error:
        raise ImportError("onnxruntime is not installed: pip install onnx onnxruntime") from error
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"images": images.detach().cpu().numpy().astype(np.float32),
             "padding_mask": padding_mask.detach().cpu().numpy().astype(bool)}
    return tuple(session.run(["pred_logits", "pred_boxes"], feeds))


@torch.no_grad()
def compare_onnx(model, path, images, padding_mask):
    """Max abs differences {pred_logits, pred_boxes} between onnxruntime and PyTorch (reference backend)."""
    wrapper = InferenceModel(model).eval()
    with msda_backend(model, "reference"):
        expected = wrapper(images, padding_mask)
    got = run_onnx(path, images, padding_mask)
    return {name: float(np.abs(out - ref.cpu().numpy()).max())
            for name, out, ref in zip(("pred_logits", "pred_boxes"), got, expected)}


def export_program(model, height, width, batch_size=1):
    """torch.export program of ``InferenceModel(model)`` for (batch_size, 3, height, width) images
    (all fixed, see the module docstring). The model's own MSDeformAttn backend is kept: the
    compiled custom op when the extension is built, the reference otherwise."""
    wrapper = InferenceModel(model).eval()
    inputs = example_inputs(batch_size, height, width, next(model.parameters()).device)
    with torch.no_grad(), _quiet_export_logs():
        return torch.export.draft_export(wrapper, inputs)


@contextlib.contextmanager
def _quiet_export_logs():
    """draft_export and the (de)serialiser log every specialised level size; keep them to errors."""
    names = ("torch._export.serde.serialize", "torch.export._draft_export", "torch._export.serde",
             "torch.fx.experimental.symbolic_shapes")
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def save_program(program, path):
    torch.export.save(program, str(path))
    return path


def load_program(path):
    """Loads a saved program; registers our operator first (a program exported with the compiled
    backend calls torch.ops.detr_cuda.ms_deform_attn_forward)."""
    import detr_cuda.ops.functional  # noqa: F401  (registers the op's fake and autograd)
    with _quiet_export_logs():
        return torch.export.load(str(path))


def program_uses_custom_op(program):
    """True when the program's graph calls our compiled deformable-attention op."""
    return any("ms_deform_attn" in str(node.target) for node in program.graph.nodes if node.op == "call_function")
