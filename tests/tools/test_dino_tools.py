"""DINO through the tools: a two-process torchrun run with EMA and bf16 autocast, resumed by one process,
then inference and attention pictures from its checkpoint; an official-layout DINO file evaluated on
coco128's 80 categories and fine-tuned with --weights."""
import json
import os
import sys

import torch

from tests.support.configs import DINO, RUN_TINY
from tests.support.launch import EVAL, REPO_ROOT, explain, free_port, read_log, run, torchrun, train
from tests.support.official_layouts import official_dino_file
from tests.tools.test_eval_coco128 import _subset

from detr_cuda.config import load_config
from detr_cuda.models import build_model

sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
import infer as infer_tool  # noqa: E402
import visualize as visualize_tool  # noqa: E402

DINO_CONFIG = os.path.join(REPO_ROOT, "configs", "dino_demo.yaml")


def test_dino_trains_in_ddp_with_ema_and_amp_resumes_and_serves_the_tools(tmp_path):
    output = tmp_path / "run"
    args = ["--config", DINO_CONFIG, *RUN_TINY, *DINO, f"data.synthetic_dir={tmp_path / 'synthetic'}",
            f"train.output_dir={output}", "train.ema=true", "train.amp=bf16"]
    result = torchrun(2, [*args, "train.max_steps=2"], free_port())
    assert result.returncode == 0, explain(result)
    assert "world size 2" in result.stdout and "dn_ce" in result.stdout and "ce_interm" in result.stdout
    resumed = train(["--resume", "auto", *args, "train.max_steps=3"])
    assert resumed.returncode == 0, explain(resumed)
    assert [r["iteration"] for r in read_log(output, "train_interval")] == [1, 2, 3]
    checkpoint = str(output / "checkpoint_last.pth")
    assert torch.load(checkpoint, weights_only=True)["ema"] is not None

    images = tmp_path / "synthetic" / "train" / "images"
    assert infer_tool.main(["--checkpoint", checkpoint, "--input", str(images), "--output-dir",
                            str(tmp_path / "infer"), "--device", "cpu", "--no-draw"]) == 0
    detections = json.loads((tmp_path / "infer" / "results.json").read_text())
    assert len(detections) == 8 * 8 * 4  # 8 images, every (query, class) pair of 8 queries x 4 classes
    first = os.path.join(images, sorted(os.listdir(images))[0])
    assert visualize_tool.main(["attention", "--checkpoint", checkpoint, "--image", first, "--output-dir",
                                str(tmp_path / "vis"), "--device", "cpu"]) == 0
    assert len(os.listdir(tmp_path / "vis")) == 1


def test_an_official_layout_dino_file_evaluates_on_80_categories_and_fine_tunes(tmp_path):
    """IDEA-Research/DINO's layout (91-row heads by COCO id in three places, a 92-row label book, no
    category map, a pickled Namespace) at the tiny sizes: tools/eval.py --weights maps its rows by
    category; tools/train.py --weights starts from it."""
    model, _, _ = build_model(load_config(DINO_CONFIG, [*RUN_TINY, *DINO]), 80)
    official = official_dino_file(model, generator=torch.Generator().manual_seed(0), hidden=32, ffn=64,
                                  enc_layers=1, dec_layers=2, queries=8, levels=3, heads=2, points=4,
                                  backbone_channels=(16, 32, 64))
    torch.save(official, tmp_path / "checkpoint0011_like.pth")
    data = ["data.dataset=coco", *_subset(tmp_path), "data.train_short_sides=[96]", "data.train_max_size=128",
            "data.val_short_side=96", "data.val_max_size=128"]
    common = ["--config", DINO_CONFIG, *RUN_TINY, *DINO, *data, "--weights", str(tmp_path / "checkpoint0011_like.pth")]
    evaluated = run([sys.executable, EVAL, *common, "--no-plots", "--output-dir", str(tmp_path / "eval")], timeout=240)
    assert evaluated.returncode == 0, explain(evaluated)
    # class_embed.{0,1} and transformer.decoder.class_embed.{0,1} (weight, bias), the proposal head, label_enc
    assert "class rows matched by category name (91 rows in the file): 11 tensors" in evaluated.stdout
    assert "NOT" not in evaluated.stdout  # nothing missing, mismatched or unused
    assert (tmp_path / "eval" / "eval.json").exists()
    tuned = train([*common, f"train.output_dir={tmp_path / 'tuned'}", "train.max_steps=1"])
    assert tuned.returncode == 0, explain(tuned)
    assert "class rows matched by category name" in tuned.stdout and "NOT" not in tuned.stdout
