"""tools/train.py and tools/eval.py reject bad configs with a message naming the field."""
import sys

from train_helpers import BASE_CONFIG, EVAL, TRAIN, run


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
