"""benchmarks/gpu_suite.sh --dry-run: every step of the prepared GPU run, on the CPU at tiny sizes,
so that a typo in the suite or in a benchmark's options fails here and not in the GPU window."""
import json
import os
import re
import subprocess
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SUITE = os.path.join(ROOT, "benchmarks", "gpu_suite.sh")
FAKE_ORIGINAL = os.path.join(ROOT, "tests", "support", "fake_original_msda.py")
# What the device tool brings back: at most 8 files, named in letters, digits, '.', '_' and '-'.
OUTPUTS = {"summary.txt", "build.log", "cuda_tests.log", "bench_msda.txt", "bench_model.txt", "bench_model.json",
           "tests.log"}


def suite(*args, timeout=900):
    return subprocess.run(["bash", SUITE, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_dry_run_runs_every_step_and_writes_the_outputs(tmp_path):
    out = tmp_path / "out"
    completed = suite(str(out), "--dry-run", "--baseline", FAKE_ORIGINAL)
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-2000:]
    assert set(os.listdir(out)) == OUTPUTS
    assert len(OUTPUTS) < 8  # one left for the caller's baseline_build.log
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in OUTPUTS)
    summary = (out / "summary.txt").read_text()
    for name in ("build", "op-loaded", "cuda_tests", "bench_msda", "bench_model", "bench_model-syncs", "tests"):
        assert re.search(rf"^{name}: exit 0, \d+ s$", summary, re.M), (name, summary)
    assert f"baseline: {FAKE_ORIGINAL}" in summary
    assert re.search(r"^total: \d+ s, exit status 0$", summary, re.M)
    assert "commit: " in summary and "GPU before:" in summary and "GPU after:" in summary
    # The operator benchmark timed ours, the reference and the original (the stand-in) ...
    msda_rows = [line.split("|")[1:4] for line in (out / "bench_msda.txt").read_text().splitlines()
                 if line.startswith("| tiny")]
    assert sorted(row[1].strip() for row in msda_rows) == ["cpu", "original", "reference"]
    # ... and the model benchmark the original in the same model, in float32 and bf16 autocast,
    rows = json.loads((out / "bench_model.json").read_text())
    assert sorted((row["backend"], row["amp"]) for row in rows) == [
        ("original", "bf16"), ("original", "none"), ("reference", "bf16"), ("reference", "none")]
    # with the host-sync table after it.
    model_text = (out / "bench_model.txt").read_text()
    assert "speed vs original" in model_text and re.search(r"^deformable\s+train\s+all(\s+\d+){5}$", model_text, re.M)
    # The test steps collected the suite without running it.
    collected = {name: {line.split("::")[0] for line in (out / name).read_text().splitlines() if "::" in line}
                 for name in ("cuda_tests.log", "tests.log")}
    assert "tests/ops/test_ms_deform_attn_cuda.py" in collected["cuda_tests.log"]
    assert "tests/test_config.py" in collected["tests.log"]
    assert not collected["cuda_tests.log"] & collected["tests.log"]  # each test file in one step only


def test_bad_arguments_stop_before_any_work(tmp_path):
    for args, message in [((), "usage:"), ((str(tmp_path), "--steps", "build,bench"), "unknown step 'bench'"),
                          ((str(tmp_path), "--deadline", "9m"), "whole seconds"),
                          ((str(tmp_path), "--verbose"), "usage:")]:
        completed = suite(*args, timeout=60)
        assert completed.returncode == 2 and message in completed.stderr, (args, completed.stderr)
    assert not os.listdir(tmp_path)


def test_a_step_without_time_before_the_deadline_is_skipped_and_said_so(tmp_path):
    completed = suite(str(tmp_path), "--dry-run", "--steps", "tests", "--deadline", "1", timeout=300)
    summary = (tmp_path / "summary.txt").read_text()
    assert completed.returncode == 124, summary
    assert re.search(r"^tests: skipped, -?\d+ s left before the deadline$", summary, re.M)
    assert re.search(r"^total: \d+ s, exit status 124$", summary, re.M)
    assert not (tmp_path / "tests.log").exists()


def test_the_baseline_folder_is_waited_for_and_its_absence_is_a_failure(tmp_path):
    """The caller builds the original in the background: --baseline FOLDER --baseline-wait S takes the
    MultiScaleDeformableAttention*.so that appears there in time; none in time is exit status 3."""
    folder = tmp_path / "ops"
    folder.mkdir()
    built = folder / "MultiScaleDeformableAttention.cpython-3-x86_64-linux-gnu.so"
    timer = threading.Timer(8.0, built.write_bytes, [b"not an extension"])
    timer.start()
    try:
        completed = suite(str(tmp_path / "found"), "--dry-run", "--steps", "bench_msda", "--baseline", str(folder),
                          "--baseline-wait", "120", timeout=300)
    finally:
        timer.cancel()
    summary = (tmp_path / "found" / "summary.txt").read_text()
    assert f"baseline: {built}" in summary  # found after waiting (the header takes 2-4 s, not 8)
    assert completed.returncode != 0 and "bench_msda: exit 1" in summary

    completed = suite(str(tmp_path / "missing"), "--dry-run", "--steps", "bench_msda", "--baseline",
                      str(tmp_path / "empty"), "--baseline-wait", "0", timeout=300)
    summary = (tmp_path / "missing" / "summary.txt").read_text()
    assert "baseline: nothing at" in summary and "bench_msda: exit 0" in summary
    assert completed.returncode == 3 and re.search(r"^total: \d+ s, exit status 3$", summary, re.M)
