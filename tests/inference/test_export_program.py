"""torch.export of the detector: with the reference backend, and with our registered custom op;
saved with torch.export.save and loaded again (also in a fresh process, which must find the op)."""
import os
import subprocess
import sys

import pytest
import torch

from tests.support.paths import REPO_ROOT
from tests.support.configs import tiny_detector_config

from detr_cuda.inference.export import (InferenceModel, example_inputs, export_program, load_program,
                                        program_uses_custom_op, save_program)
from detr_cuda.models import build_model
from detr_cuda.ops.functional import extension_available

HEIGHT, WIDTH, BATCH = 64, 96, 2


def _tiny_model(backend):
    torch.manual_seed(0)
    model, _, _ = build_model(tiny_detector_config(f"model.msda_backend={backend}"), 4)
    return model.eval()


def _inputs():
    images, padding_mask = example_inputs(BATCH, HEIGHT, WIDTH, seed=5)
    padding_mask[1, :, WIDTH - 24:] = True
    images[1, :, :, WIDTH - 24:] = 0.0
    return images, padding_mask


def _round_trip(model, path):
    program = export_program(model, HEIGHT, WIDTH, batch_size=BATCH)
    save_program(program, path)
    loaded = load_program(path)
    images, padding_mask = _inputs()
    with torch.no_grad():
        expected = InferenceModel(model)(images, padding_mask)
        got = loaded.module()(images, padding_mask)
    for want, have in zip(expected, got):
        torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-5)
    return program, loaded


def test_export_reference_backend_round_trip(tmp_path):
    program, loaded = _round_trip(_tiny_model("reference"), tmp_path / "reference.pt2")
    assert not program_uses_custom_op(program)
    assert any("grid_sampler" in str(node.target) for node in loaded.graph.nodes)
    # Shapes are fixed at export: another batch size fails a guard instead of computing garbage.
    images, padding_mask = example_inputs(BATCH + 1, HEIGHT, WIDTH)
    with pytest.raises((AssertionError, RuntimeError)):
        loaded.module()(images, padding_mask)


@pytest.mark.skipif(not extension_available(),
                    reason="compiled extension not built (python setup.py build_ext --inplace)")
def test_export_custom_op_round_trip_in_fresh_process(tmp_path):
    model = _tiny_model("cpu")
    program, loaded = _round_trip(model, tmp_path / "custom_op.pt2")
    assert program_uses_custom_op(program) and program_uses_custom_op(loaded)
    images, padding_mask = _inputs()
    with torch.no_grad():
        expected = InferenceModel(model)(images, padding_mask)
    torch.save({"images": images, "padding_mask": padding_mask, "pred_logits": expected[0],
                "pred_boxes": expected[1]}, tmp_path / "io.pt")
    script = (
        "import sys, torch\n"
        "from detr_cuda.inference.export import load_program\n"
        f"program = load_program({str(tmp_path / 'custom_op.pt2')!r})\n"
        f"io = torch.load({str(tmp_path / 'io.pt')!r})\n"
        "logits, boxes = program.module()(io['images'], io['padding_mask'])\n"
        "torch.testing.assert_close(logits, io['pred_logits'], rtol=1e-5, atol=1e-5)\n"
        "torch.testing.assert_close(boxes, io['pred_boxes'], rtol=1e-5, atol=1e-5)\n"
        "print('fresh process ok')\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": REPO_ROOT})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fresh process ok" in done.stdout
