"""bench_model.py --mode infer: one inference forward, batch 1, of a real image resized as evaluation
resizes it; ms/image and peak memory of one backend in this process (the parent runs each in its own)."""
import json
import os

import torch

from bench_setup import ROOT, build, device_name, operator_for, timed_runs
from detr_cuda.config import load_config


def coco128_dir():
    """The coco128 folder (env DETR_CUDA_COCO128, else ../shared/data/coco128 beside the checkout or
    one level up for a git worktree), or None."""
    candidates = [os.environ.get("DETR_CUDA_COCO128"), os.path.join(ROOT, "..", "shared", "data", "coco128"),
                  os.path.join(ROOT, "..", "..", "shared", "data", "coco128")]
    return next((os.path.abspath(p) for p in candidates
                 if p and os.path.isfile(os.path.join(p, "annotations.json"))), None)


def pick_image(args):
    """Path of the image to run: --image, else the coco128 image whose evaluation size comes
    closest to short_side x max_size (widest first), else None (random pixels)."""
    if args.image:
        return args.image
    folder = coco128_dir()
    if folder is None:
        return None
    from detr_cuda.data.transforms import resized_size
    with open(os.path.join(folder, "annotations.json")) as handle:
        images = json.load(handle)["images"]

    def distance(entry):
        height, width = resized_size((entry["width"], entry["height"]), args.short_side, args.max_size)
        return abs(height - args.short_side) + abs(width - args.max_size), entry["file_name"]
    path = os.path.join(folder, "images", min(images, key=distance)["file_name"])
    return path if os.path.isfile(path) else None


def load_image(args):
    """(images (1, 3, H, W), padding_mask (1, H, W), description)."""
    path = pick_image(args)
    if path is None:
        generator = torch.Generator().manual_seed(0)
        image = torch.randn(1, 3, args.short_side, args.max_size, generator=generator)
        return image, torch.zeros(1, args.short_side, args.max_size, dtype=torch.bool), \
            f"random {args.short_side}x{args.max_size} (no coco128 image found)"
    from PIL import Image, ImageOps
    from detr_cuda.data.transforms import build_transforms
    cfg = load_config(None, [f"data.val_short_side={args.short_side}", f"data.val_max_size={args.max_size}"])
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened).convert("RGB")
    target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
              "size": torch.tensor([image.height, image.width])}
    tensor, _ = build_transforms(cfg.data, train=False)(image, target)
    height, width = tensor.shape[-2:]
    return tensor[None], torch.zeros(1, height, width, dtype=torch.bool), \
        f"{os.path.basename(path)} {image.height}x{image.width} resized to {height}x{width}"


def export_onnx_model(args, folder):
    """Our ONNX export (reference op inside) of the model that measure_infer builds, into ``folder``;
    made by the parent process, so that the onnx row's process never holds the torch model."""
    from detr_cuda.inference.export import export_onnx
    images, _, _ = load_image(args)
    model, _ = build(args, args.variants[0], "reference", "cpu")
    model.eval()
    path = os.path.join(folder, "model.onnx")
    export_onnx(model, path, images.shape[-2], images.shape[-1])
    return path


def inference_function(args, backend, images, mask):
    """A function running one forward of ``backend``: our model on an MSDeformAttn backend, the same
    model under torch.compile ("compiled": inductor with frozen weights, cpu kernel, this image
    size only; the warm-up runs pay the compilation), or onnxruntime on args.onnx_model."""
    if backend == "onnx":
        import onnxruntime
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = onnxruntime.InferenceSession(args.onnx_model, options, providers=["CPUExecutionProvider"])
        feeds = {"images": images.numpy(), "padding_mask": mask.numpy()}
        return lambda: session.run(["pred_logits", "pred_boxes"], feeds)
    model, _ = build(args, args.variants[0], "cpu" if backend == "compiled" else backend, args.device)
    model.eval()
    if backend == "compiled":
        from torch._inductor import config as inductor_config
        inductor_config.freezing = True  # weights as constants: packed GEMM/conv weights, folded ops
        model = torch.compile(model, dynamic=False)

    def forward():
        with torch.no_grad():
            model(images, mask)
    return forward


def measure_infer(args, backend):
    device, variant = args.device, args.variants[0]
    images, mask, description = load_image(args)
    images, mask = images.to(device), mask.to(device)
    forward = inference_function(args, backend, images, mask)
    with operator_for(backend, args.baseline):
        times, peak, before = timed_runs(forward, device, args.warmup, args.iterations)
    return {"mode": "infer", "backend": backend, "device": device, "variant": variant, "preset": args.preset,
            "image": description, "height": int(images.shape[-2]), "width": int(images.shape[-1]),
            "ms_per_image": 1000 * times[len(times) // 2], "min_ms_per_image": 1000 * times[0],
            "peak_mib": peak, "working_mib": peak - before, "iterations": args.iterations,
            "threads": torch.get_num_threads()}


def print_infer_table(args, rows):
    print(f"inference, batch 1, {args.variants[0]}, device {args.device} ({device_name(args.device)}), preset "
          f"{args.preset}, extra overrides {list(args.set) or 'none'}, image {rows[0]['image']}, "
          f"{args.iterations} timed runs after {args.warmup}, torch {torch.__version__}, threads {rows[0]['threads']}")
    print(f"{'backend':<10} {'ms/image (median)':>18} {'ms/image (min)':>15} {'peak MiB':>9} {'working MiB':>12} "
          f"{'speed vs reference':>19}")
    reference = next((r for r in rows if r["backend"] == "reference"), None)
    for row in rows:
        speed = f"{reference['ms_per_image'] / row['ms_per_image']:.2f}x" if reference else "-"
        print(f"{row['backend']:<10} {row['ms_per_image']:>18.1f} {row['min_ms_per_image']:>15.1f} "
              f"{row['peak_mib']:>9.0f} {row['working_mib']:>12.0f} {speed:>19}")
