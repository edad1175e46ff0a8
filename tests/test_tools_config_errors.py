"""tools/train.py and tools/eval.py reject bad configs with a message naming the field."""
import sys

import pytest

from data_paths import coco128_dir
from train_helpers import BASE_CONFIG, EVAL, TINY, TRAIN, env, run


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
    result = run([sys.executable, TRAIN, "--config", BASE_CONFIG, *TINY, "data.dataset=coco",
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
    result = run([sys.executable, EVAL, "--config", BASE_CONFIG, *TINY, "data.dataset=coco", "data.check_images=none",
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
    result = run([sys.executable, TRAIN, "--config", BASE_CONFIG, *TINY, f"data.synthetic_dir={tmp_path / 'data'}",
                  f"train.output_dir={taken / 'run'}", "train.max_steps=1"], timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Not a directory" in result.stderr and str(taken) in result.stderr and "Traceback" not in result.stderr


def test_world_size_without_a_rendezvous_address_says_to_use_torchrun(tmp_path):
    environment = {k: v for k, v in env().items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    environment.update(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0")
    result = run([sys.executable, TRAIN, "--config", BASE_CONFIG, *TINY, f"data.synthetic_dir={tmp_path / 'data'}",
                  f"train.output_dir={tmp_path / 'run'}", "train.max_steps=1"], timeout=120, env=environment)
    assert result.returncode == 2, result.stderr
    assert "MASTER_ADDR and MASTER_PORT are not set" in result.stderr and "torchrun" in result.stderr
    assert "Traceback" not in result.stderr
