"""torchrun on CPU (gloo): two processes, two "nodes", a killed peer, and gradient normalisation."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.support.configs import RUN_TINY
from tests.support.launch import (REPO_ROOT, TRAIN, BASE_CONFIG, env, explain, free_port,
                                  read_log, tiny_args, torchrun, train, write_fixed_coco)


def test_two_process_torchrun_trains_and_rank0_writes(tmp_path):
    result = torchrun(2, tiny_args(tmp_path, extra=["train.max_steps=3"]), free_port())
    assert result.returncode == 0, explain(result)
    assert "find_unused_parameters" not in result.stderr  # DDP searched for none (engine/setup.py wrap_model)
    output = tmp_path / "run"
    assert sorted(p.name for p in output.glob("*.pth")) == ["checkpoint_last.pth"]
    assert len(list(output.glob("log*.jsonl"))) == 1
    intervals = read_log(output, "train_interval")
    assert [r["iteration"] for r in intervals] == [1, 2, 3]  # one line per step, written once (rank 0)
    assert "world size 2" in result.stdout
    assert len(list((output / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert (output / "config.yaml").read_text().count("world_size") == 0  # the resolved config, not run state
    checkpoint = torch.load(output / "checkpoint_last.pth", weights_only=True)
    assert checkpoint["step"] == 3 and checkpoint["world_size"] == 2 and len(checkpoint["rng"]) == 2

    # Continued by one process: the warning says what that changes (8 images: 2 -> 4 steps per epoch).
    alone = train(["--resume", "auto", *tiny_args(tmp_path, extra=["train.max_steps=4"])])
    assert alone.returncode == 0, explain(alone)
    assert "written by 2 processes, this run has 1" in alone.stdout
    assert "images per optimizer step: 4 -> 2" in alone.stdout
    assert "the 2 images between are trained on twice this epoch" in alone.stdout
    assert "keeps the stored 2 steps per epoch (this run has 4)" in alone.stdout


def test_two_processes_dn_two_stage_with_an_empty_image(tmp_path):
    """DN + two-stage + box refinement under DDP without the unused-parameter search: every step one
    rank's only image has no object (no DN query there), and the step still reduces every gradient."""
    overrides = write_fixed_coco(tmp_path / "fixed", num_images=2)
    annotations = tmp_path / "fixed" / "annotations.json"
    coco = json.loads(annotations.read_text())
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] == 1]
    annotations.write_text(json.dumps(coco))
    args = tiny_args(tmp_path, extra=[*overrides, "model.query_type=anchor", "dn.enabled=true", "train.batch_size=1",
                                      "train.max_steps=3", "data.val_images=null", "data.val_annotations=null"])
    result = torchrun(2, args, free_port())
    assert result.returncode == 0, explain(result)
    assert "find_unused_parameters" not in result.stderr and "Expected to have finished reduction" not in result.stderr
    assert [r["iteration"] for r in read_log(tmp_path / "run", "train_interval")] == [1, 2, 3]


def _launch_node(node_rank, nnodes, port, args, rdzv="static", log_dir=None):
    launch = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", "--nproc_per_node=1",
              f"--rdzv-endpoint=127.0.0.1:{port}"]
    if rdzv == "static":
        launch.append(f"--node-rank={node_rank}")
    else:
        launch += ["--rdzv-backend=c10d", "--rdzv-id=detr_cuda_test"]
    stdout = open(log_dir / f"node{node_rank}.out", "w")
    stderr = open(log_dir / f"node{node_rank}.err", "w")
    process = subprocess.Popen([*launch, TRAIN, *args], stdout=stdout, stderr=stderr, text=True, env=env(),
                               cwd=REPO_ROOT, start_new_session=True)
    process.log_files = (stdout, stderr)
    return process


def _finish(process, timeout):
    try:
        process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        for handle in process.log_files:
            handle.close()


def _node_output(tmp_path, node_rank):
    return ((tmp_path / f"node{node_rank}.out").read_text(), (tmp_path / f"node{node_rank}.err").read_text())


def test_two_nodes_form_one_job(tmp_path):
    port = free_port()
    args = tiny_args(tmp_path, extra=["train.max_steps=2"])
    nodes = [_launch_node(rank, 2, port, args, log_dir=tmp_path) for rank in (0, 1)]
    for node in nodes:
        _finish(node, timeout=240)
    for rank, node in enumerate(nodes):
        assert node.returncode == 0, (rank, _node_output(tmp_path, rank))
    stdout, _ = _node_output(tmp_path, 0)
    assert "world size 2" in stdout
    assert [r["iteration"] for r in read_log(tmp_path / "run", "train_interval")] == [1, 2]


def test_killed_rank_makes_the_other_exit_with_a_clear_error(tmp_path):
    port = free_port()
    args = tiny_args(tmp_path, extra=["train.max_steps=100000", "train.dist_timeout_s=30"])
    nodes = [_launch_node(rank, 2, port, args, rdzv="c10d", log_dir=tmp_path) for rank in (0, 1)]
    try:
        log = tmp_path / "run" / "log.jsonl"
        deadline = time.time() + 180
        while not (log.exists() and '"train_interval"' in log.read_text()):
            assert time.time() < deadline, ("training never started", _node_output(tmp_path, 0))
            assert all(node.poll() is None for node in nodes), ("a node exited early", _node_output(tmp_path, 0),
                                                                _node_output(tmp_path, 1))
            time.sleep(0.5)
        # Kill one worker process (the rank on node 1), as a crash or the OOM killer would.
        workers = subprocess.run(["pgrep", "-P", str(nodes[1].pid)], capture_output=True, text=True).stdout.split()
        assert workers, "no worker process found under the node-1 launcher"
        killed_at = time.time()
        for pid in workers:
            os.kill(int(pid), signal.SIGKILL)
        _finish(nodes[0], timeout=120)
        elapsed = time.time() - killed_at
    finally:
        for node in nodes:
            if node.poll() is None:
                _finish(node, timeout=1)
    stdout, stderr = _node_output(tmp_path, 0)
    assert nodes[0].returncode != 0, (stdout, stderr)
    assert "another process of the job died" in stderr, stderr[-3000:]
    assert elapsed < 120


def test_two_processes_batch_one_equal_one_process_batch_two(tmp_path):
    """Same two equal-size images, dropout 0: rank-averaged loss and DDP-averaged gradients match."""
    probe = os.path.join(REPO_ROOT, "tests", "support", "dist_probe.py")
    # The plain variant: the probe runs in float64 and two-stage keeps its proposals in float32.
    common = [*RUN_TINY, *write_fixed_coco(tmp_path / "fixed", num_images=2), "data.horizontal_flip=false",
              "model.two_stage=false", "model.with_box_refine=false"]
    single = subprocess.run([sys.executable, probe, str(tmp_path / "single.pth"), "--config", BASE_CONFIG,
                             *common, "train.batch_size=2", f"train.output_dir={tmp_path / 'a'}"],
                            capture_output=True, text=True, timeout=240, env=env(), cwd=REPO_ROOT)
    assert single.returncode == 0, explain(single)
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
                             "--master_addr=127.0.0.1", f"--master_port={free_port()}", probe,
                             str(tmp_path / "double.pth"), "--config", BASE_CONFIG, *common, "train.batch_size=1",
                             f"train.output_dir={tmp_path / 'b'}"],
                            capture_output=True, text=True, timeout=240, env=env(), cwd=REPO_ROOT)
    assert double.returncode == 0, explain(double)
    one, two = torch.load(tmp_path / "single.pth"), torch.load(tmp_path / "double.pth")
    assert sorted(sum(two["image_ids"], [])) == sorted(one["image_ids"][0])  # the same two images
    assert one["losses"].keys() == two["losses"].keys()
    loss_terms = {k: v for k, v in one["losses"].items() if k.startswith("loss")}  # not class_error (per-rank %)
    assert len(loss_terms) > 3
    for name, value in loss_terms.items():
        assert two["losses"][name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    assert one["grads"].keys() == two["grads"].keys() and len(one["grads"]) > 10
    for name, grad in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], grad, rtol=1e-3, atol=1e-6, msg=name)
