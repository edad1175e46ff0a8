"""The tools reject bad configs, bad data and unsafe checkpoints with a one-line error (exit 2) naming
the field, the file or the offending pickled global."""
import json
import os
import sys

import pytest

from tests.support.pickles import Payload
from tests.support.paths import coco128_dir
from tests.support.configs import RUN_TINY
from tests.support.launch import BASE_CONFIG, EVAL, TRAIN, env, run
from tests.support.paths import REPO_ROOT


def test_unknown_key_is_named():
    result = run([sys.executable, TRAIN, "--config", BASE_CONFIG, "train.lrr=1e-4"], timeout=120)
    assert result.returncode == 2
    assert "config error: unknown config field 'train.lrr'" in result.stderr
    assert "Traceback" not in result.stderr


def test_wrong_type_is_named():
    result = run([sys.executable, TRAIN, "--config", BASE_CONFIG, "train.epochs=many"], timeout=120)
    assert result.returncode == 2
    assert "config error: train.epochs: expected an integer, got str 'many'" in result.stderr


def test_unknown_key_in_a_yaml_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"_base_: {BASE_CONFIG}\nmodel:\n  hiden_dim: 64\n")
    result = run([sys.executable, EVAL, "--config", str(bad), "--weights", "x.pth"], timeout=120)
    assert result.returncode == 2
    assert "bad.yaml: unknown config field 'model.hiden_dim'" in result.stderr


def test_legacy_local_rank_argument_is_accepted():
    # torch.distributed.launch passes --local-rank=N; it must not be an "unrecognized argument".
    result = run([sys.executable, TRAIN, "--local-rank=0", "--config", BASE_CONFIG, "train.lrr=1"], timeout=120)
    assert "unrecognized arguments" not in result.stderr
    assert "unknown config field 'train.lrr'" in result.stderr


def test_eval_help_names_the_file_it_writes():
    result = run([sys.executable, EVAL, "--help"], timeout=120)
    assert result.returncode == 0
    assert "detections.json" in result.stdout and "detections_" not in result.stdout


@pytest.mark.parametrize("override, message", [
    ("model.backbone=resnet99", "model.backbone: 'resnet99' is not one of resnet18"),
    ("train.device=tpu", "train.device: 'tpu' is not one of auto, cpu, cuda"),
    ("train.amp=fp8", "train.amp: 'fp8' is not one of none, bf16, fp16"),
])
def test_bad_choices_are_refused_at_config_load(override, message):
    result = run([sys.executable, TRAIN, "--config", BASE_CONFIG, override], timeout=120)
    assert result.returncode == 2 and f"config error: {message}" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_broken_annotations_json_is_a_clean_error(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [{"id": 1, "file_name": "a.jpg", "width": 4, "hei')  # cut mid-file
    result = run([sys.executable, TRAIN, "--config", BASE_CONFIG, *RUN_TINY, "data.dataset=coco",
                  f"data.train_images={tmp_path}", f"data.train_annotations={broken}",
                  f"train.output_dir={tmp_path / 'run'}"], timeout=120)
    assert result.returncode == 2, result.stderr
    assert f"{broken}: not valid JSON" in result.stderr and "Traceback" not in result.stderr


def _truncated_checkpoint(tmp_path):
    import torch
    whole = tmp_path / "whole.pth"
    torch.save({"model": {"w": torch.zeros(1000)}}, whole)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(whole.read_bytes()[:2000])
    return truncated


def test_truncated_checkpoint_is_a_clean_error_in_eval_and_resume(tmp_path):
    truncated = _truncated_checkpoint(tmp_path)
    root = coco128_dir()
    result = run([sys.executable, EVAL, "--config", BASE_CONFIG, *RUN_TINY, "data.dataset=coco", "data.check_images=none",
                  f"data.val_images={root}/images", f"data.val_annotations={root}/annotations.json",
                  "--weights", str(truncated), "--output-dir", str(tmp_path / "eval"), "--no-plots"], timeout=240)
    assert result.returncode == 2, result.stderr
    assert f"error: cannot read checkpoint {truncated}" in result.stderr and "Traceback" not in result.stderr
    resumed = run([sys.executable, TRAIN, "--resume", str(truncated)], timeout=120)
    assert resumed.returncode == 2 and f"cannot read checkpoint {truncated}" in resumed.stderr, resumed.stderr
    assert "Traceback" not in resumed.stderr


def test_an_output_folder_that_is_a_file_is_a_clean_error(tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("a file where the output folder should go")
    result = run([sys.executable, TRAIN, "--config", BASE_CONFIG, *RUN_TINY, f"data.synthetic_dir={tmp_path / 'data'}",
                  f"train.output_dir={taken / 'run'}", "train.max_steps=1"], timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Not a directory" in result.stderr and str(taken) in result.stderr and "Traceback" not in result.stderr


def test_world_size_without_a_rendezvous_address_says_to_use_torchrun(tmp_path):
    environment = {k: v for k, v in env().items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    environment.update(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0")
    result = run([sys.executable, TRAIN, "--config", BASE_CONFIG, *RUN_TINY, f"data.synthetic_dir={tmp_path / 'data'}",
                  f"train.output_dir={tmp_path / 'run'}", "train.max_steps=1"], timeout=120, env=environment)
    assert result.returncode == 2, result.stderr
    assert "MASTER_ADDR and MASTER_PORT are not set" in result.stderr and "torchrun" in result.stderr
    assert "Traceback" not in result.stderr


# Every numeric field has a range, checked when the config loads: exit 2, the field, the value, the range.
BAD_NUMBERS = [
    ("train.lr=-1", "train.lr must be in (0, 1], got -1.0"),
    ("train.lr=nan", "train.lr must be a finite number, got nan"),
    ("train.lr=1e39", "train.lr must be in (0, 1], got 1e+39"),
    ("train.batch_size=0", "train.batch_size must be >= 1, got 0"),
    ("eval.batch_size=0", "eval.batch_size must be >= 1, got 0"),
    ("data.num_workers=-1", "data.num_workers must be >= 0, got -1"),
    ("model.dropout=1.5", "model.dropout must be in [0, 1), got 1.5"),
    ("model.num_queries=0", "model.num_queries must be >= 1, got 0"),
    ("model.dec_layers=0", "model.dec_layers must be >= 1, got 0"),
    ("train.epochs=0", "train.epochs must be >= 1, got 0"),
    ("train.epochs=-1", "train.epochs must be >= 1, got -1"),
    ("train.accumulate_steps=0", "train.accumulate_steps must be >= 1, got 0"),
    ("train.log_interval=0", "train.log_interval must be >= 1, got 0"),
    ("train.checkpoint_every_steps=-5", "train.checkpoint_every_steps must be >= 0, got -5"),
    ("train.ema_decay=2.0", "train.ema_decay must be in [0, 1), got 2.0"),
    ("train.dist_timeout_s=0", "train.dist_timeout_s must be >= 1, got 0"),
    ("data.train_short_sides=[480,0]", "data.train_short_sides must be >= 1, got 0"),
    ("model.hidden_dim=48", "model.hidden_dim must be a multiple of 32"),
]


@pytest.mark.parametrize("override, message", BAD_NUMBERS)
def test_numbers_out_of_range_are_refused_at_config_load(override, message):
    from detr_cuda.config import ConfigError, load_config
    with pytest.raises(ConfigError) as error:
        load_config(BASE_CONFIG, [override])
    assert message in str(error.value)


def test_a_number_out_of_range_is_exit_2_in_each_tool(tmp_path):
    for tool, extra in ((TRAIN, []), (EVAL, ["--weights", str(tmp_path / "w.pth")])):
        result = run([sys.executable, tool, "--config", BASE_CONFIG, "train.lr=-1", *extra], timeout=120)
        assert result.returncode == 2 and "config error: train.lr must be in (0, 1], got -1.0" in result.stderr
        assert "Traceback" not in result.stderr


def _instances(path, images, categories):
    path.write_text(json.dumps({"images": images, "annotations": [], "categories": categories}))
    return path


@pytest.mark.parametrize("case, message", [
    ("empty", "no images"),
    ("bad_categories", "'categories' must be a non-empty list of entries with distinct integer ids"),
    ("all_missing", "none of the 3 images that"),
])
def test_dataset_problems_are_one_line_errors(tmp_path, case, message):
    images = [{"id": i, "file_name": f"{i}.png", "width": 10, "height": 10} for i in range(3)]
    categories = [{"id": 1, "name": "a"}]
    if case == "empty":
        images = []
    if case == "bad_categories":
        categories = [{"name": "a"}, {"id": 1}]
    annotations = _instances(tmp_path / "instances.json", images, categories)
    (tmp_path / "images").mkdir()
    result = run([sys.executable, TRAIN, "--config", BASE_CONFIG, *RUN_TINY, "data.dataset=coco",
                  f"data.train_images={tmp_path / 'images'}", f"data.train_annotations={annotations}",
                  "data.invalid_annotations=skip", f"train.output_dir={tmp_path / 'run'}"], timeout=120)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    if case == "all_missing":
        assert "the image folder is probably the wrong one" in result.stderr


def test_a_checkpoint_that_would_run_code_is_refused_by_every_tool(tmp_path):
    import torch
    marker = tmp_path / "payload_ran"
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "config": {}, "args": Payload(marker)}, evil)
    root = coco128_dir()
    data = ["data.dataset=coco", "data.check_images=none", f"data.val_images={root}/images",
            f"data.val_annotations={root}/annotations.json", f"data.train_images={root}/images",
            f"data.train_annotations={root}/annotations.json"]
    commands = [
        [EVAL, "--config", BASE_CONFIG, *RUN_TINY, *data, "--weights", str(evil), "--output-dir", str(tmp_path / "e")],
        [TRAIN, "--resume", str(evil)],
        [TRAIN, "--config", BASE_CONFIG, *RUN_TINY, *data, "--weights", str(evil), f"train.output_dir={tmp_path / 't'}"],
        [os.path.join(REPO_ROOT, "tools", "infer.py"), "--checkpoint", str(evil), "--input", f"{root}/images",
         "--output-dir", str(tmp_path / "i")],
        [os.path.join(REPO_ROOT, "tools", "export.py"), "--checkpoint", str(evil), "--output-dir", str(tmp_path / "x")],
        [os.path.join(REPO_ROOT, "tools", "visualize.py"), "attention", "--checkpoint", str(evil), "--image",
         f"{root}/images/000000000009.jpg", "--output-dir", str(tmp_path / "v")],
    ]
    for command in commands:
        result = run([sys.executable, *command], timeout=240)
        assert result.returncode == 2, (command, result.stderr[-2000:])
        assert "posix.system" in result.stderr and str(evil) in result.stderr, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
        assert not marker.exists(), command
