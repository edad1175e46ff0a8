#!/usr/bin/env python
"""Export a checkpoint for deployment: ONNX (checked with onnxruntime) and/or a torch.export program.

    python tools/export.py --checkpoint CKPT --output-dir exported/ --height 800 --width 1216
    python tools/export.py --checkpoint CKPT --output-dir exported/ --format torch-export --batch-size 1

Both take (images (B, 3, H, W) normalised as in evaluation, padding_mask (B, H, W) bool, True =
padded) and return (pred_logits (B, Q, K), pred_boxes (B, Q, 4) cxcywh normalised to each unpadded
image). Resize an image as evaluation does, pad it into the H x W canvas, and mark the padding.
The default canvas, data.val_short_side high x data.val_max_size wide (800 x 1333), is landscape:
a portrait image resized as evaluation does is up to val_max_size high and does not fit it, so
for portrait images give --height/--width (--height 1333 --width 1333 holds both orientations).

- model.onnx: opset >= 16 (GridSample); deformable attention runs through the reference
  operator. Batch size dynamic, H and W fixed. Checked against PyTorch with onnxruntime (CPU);
  needs `pip install onnx onnxruntime`.
- model.pt2: torch.export program (torch.export.load); the model's MSDeformAttn backend is
  kept, so with the compiled extension it calls torch.ops.detr_cuda.ms_deform_attn_forward
  (import detr_cuda.ops before running it). Batch size, H and W fixed.
Official Deformable DETR checkpoints need --config.

export.json: the canvas, the category map (model label -> dataset category id and name) and the
preprocessing a deployment must repeat (resize rule, RGB / 255, ImageNet mean and std, padding).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detr_cuda.config import ConfigError  # noqa: E402


def positive_int(text):
    """argparse type: an integer >= 1 (0 used to fall back silently to the default)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (pixels), got {value}")
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", "--weights", required=True)
    parser.add_argument("--config", help="YAML config (required when the checkpoint holds none)")
    parser.add_argument("--output-dir", "--output_dir", required=True)
    parser.add_argument("--format", choices=("onnx", "torch-export", "all"), default="all")
    parser.add_argument("--height", type=positive_int, default=None,
                        help="canvas height (default: data.val_short_side; the default canvas is landscape, "
                             "portrait images need --height/--width)")
    parser.add_argument("--width", type=positive_int, default=None,
                        help="canvas width (default: data.val_max_size)")
    parser.add_argument("--batch-size", type=positive_int, default=1, help="example batch (fixed for torch.export)")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--device", default="cpu", help="device the export traces on (torch-export keeps it)")
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime / reload comparison")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from detr_cuda import Detector
    from detr_cuda.data.transforms import describe_preprocessing
    from detr_cuda.inference import export as exporting
    try:
        detector = Detector.from_checkpoint(args.checkpoint, args.config, args.device, args.overrides)
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as error:  # CheckpointError included
        print(f"error: {error}", file=sys.stderr)
        return 2
    height = detector.config.data.val_short_side if args.height is None else args.height
    width = detector.config.data.val_max_size if args.width is None else args.width
    os.makedirs(args.output_dir, exist_ok=True)
    model = detector.model
    images, padding_mask = exporting.example_inputs(args.batch_size, height, width, detector.device, seed=1)
    summary = {"height": height, "width": width, "category_map": detector.category_map.to_dict(),
               "preprocessing": describe_preprocessing(detector.config.data, (height, width))}
    if args.format in ("onnx", "all"):
        path = os.path.join(args.output_dir, "model.onnx")
        try:
            exporting.export_onnx(model, path, height, width, args.batch_size, args.opset)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        summary["onnx"] = {"path": path, "opset": args.opset, "dynamic": ["batch"]}
        print(f"wrote {path}", file=sys.stderr)
        if not args.no_check:
            try:
                differences = exporting.compare_onnx(model, path, images, padding_mask)
            except ImportError as error:
                print(f"not checked: {error}", file=sys.stderr)
            else:
                summary["onnx"]["max_abs_difference"] = differences
                print(f"onnxruntime vs PyTorch, max abs difference: {differences}", file=sys.stderr)
    if args.format in ("torch-export", "all"):
        path = os.path.join(args.output_dir, "model.pt2")
        program = exporting.export_program(model, height, width, args.batch_size)
        exporting.save_program(program, path)
        summary["torch_export"] = {"path": path, "batch_size": args.batch_size,
                                   "custom_op": exporting.program_uses_custom_op(program)}
        print(f"wrote {path} (custom op: {summary['torch_export']['custom_op']})", file=sys.stderr)
        if not args.no_check:
            import torch
            loaded = exporting.load_program(path)
            with torch.no_grad():
                expected = exporting.InferenceModel(model)(images, padding_mask)
                got = loaded.module()(images, padding_mask)
            differences = {name: float((a - b).abs().max())
                           for name, a, b in zip(("pred_logits", "pred_boxes"), got, expected)}
            summary["torch_export"]["max_abs_difference"] = differences
            print(f"reloaded program vs PyTorch, max abs difference: {differences}", file=sys.stderr)
    with open(os.path.join(args.output_dir, "export.json"), "w") as handle:
        json.dump(summary, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
