"""train_net.py end to end, in subprocesses, on the tiny built-in split.

A few iterations of the tiny ScaleNet-FPN: checkpoints, --resume continuing from the saved
iteration, --eval-only printing the COCO table, a 2-process CPU (gloo) run, and the
start-up errors for missing weights and datasets.
"""

import json
import os
import re
import shutil

import pytest
from conftest import TINY_TRAIN as TINY
from conftest import folder_snapshot, train_net

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/Synthetic/faster_rcnn_Stiny_FPN.yaml"


def metrics(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def trained(env, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run"))
    rc, log = train_net(env, "--config-file", CONFIG, *TINY, "SOLVER.MAX_ITER", "4", "OUTPUT_DIR", out)
    assert rc == 0, log[-3000:]
    return out, log


def test_train_writes_checkpoints_logs_and_results(trained):
    out, log = trained
    files = set(os.listdir(out))
    assert {"model_0000001.pth", "model_0000003.pth", "model_final.pth", "last_checkpoint", "metrics.json"} <= files
    assert any(f.startswith("events.out.tfevents") for f in files), files  # TensorBoard
    with open(os.path.join(out, "last_checkpoint")) as f:
        assert f.read().strip() == "model_final.pth"
    assert re.search(r"eta: \S+\s+iter: 3\b", log), "no ETA line in the log"
    assert max(m["iteration"] for m in metrics(out) if "total_loss" in m) == 3
    assert any("bbox/AP50" in m for m in metrics(out))  # the final evaluation, for TensorBoard too
    with open(os.path.join(out, "eval_results.json")) as f:
        box = json.load(f)["results"]["bbox"]
    assert set(box) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    with open(os.path.join(out, "run_info.json")) as f:
        info = json.load(f)
    assert info["backbone"] == "build_scalenet_fpn_backbone" and info["train_num_processes"] == 1
    assert info["backbone_params"] > 0 and info["backbone_flops"]["224x224"] > 0
    assert set(info["backbone_flops"]) == {"224x224", "160x160"}
    assert info["train_s_per_iter"] > 0 and info["inference_s_per_image"] > 0
    assert info["train_peak_memory_mb"] > 0 and "CPU" in info["train_peak_memory_kind"]
    assert "CPU" in info["train_machine"] and info["train_config_file"].endswith(CONFIG)
    with open(os.path.join(out, "eval_results.json")) as f:
        evaluation = json.load(f)["evaluation"]  # what was evaluated, for compare.py
    assert evaluation["weights"] == "model_final.pth" and evaluation["datasets"] == ["synthetic_shapes_tiny_val"]
    assert evaluation["images"]["synthetic_shapes_tiny_val"] > 0 and evaluation["test_size"] == "160/160"
    assert evaluation["machine"] == info["train_machine"]


def test_resume_continues_from_saved_iteration(trained, env):
    out, _ = trained
    rc, log = train_net(env, "--config-file", CONFIG, "--resume", *TINY, "SOLVER.MAX_ITER", "6", "OUTPUT_DIR", out)
    assert rc == 0, log[-3000:]
    assert f"Loading from {out}/model_final.pth" in log
    assert "Starting training from iteration 4" in log
    iterations = [m["iteration"] for m in metrics(out) if "total_loss" in m]
    assert iterations[-1] == 5 and 4 not in iterations[:-1]  # the new entries follow the old ones


def test_eval_only_prints_coco_table(trained, env):
    out, _ = trained
    eval_dir = os.path.join(out, "eval")
    ckpt = os.path.join(out, "model_0000003.pth")
    rc, log = train_net(
        env, "--config-file", CONFIG, "--eval-only", *TINY, "MODEL.WEIGHTS", ckpt, "OUTPUT_DIR", eval_dir
    )
    assert rc == 0, log[-3000:]
    assert f"Loading from {ckpt}" in log
    assert "Starting training" not in log
    assert "copypaste: AP,AP50,AP75,APs,APm,APl" in log
    assert re.search(r"copypaste: (nan|[0-9.]+)(,(nan|[0-9.]+)){5}", log)
    with open(os.path.join(eval_dir, "run_info.json")) as f:
        info = json.load(f)
    assert info["eval_weights"] == ckpt and info["inference_s_per_image"] > 0
    with open(os.path.join(eval_dir, "eval_results.json")) as f:
        assert json.load(f)["evaluation"]["weights"] == os.path.realpath(ckpt)  # not the folder's own final model
    assert info["eval_num_processes"] == 1 and "train_num_processes" not in info  # training fields only from training
    assert info["eval_peak_memory_mb"] > 0


def test_a_resumed_run_records_the_config_of_a_fresh_one(trained, env, tmp_path):
    """MODEL.WEIGHTS is resolved on --resume too, so that config.yaml (which compare.py checks to be
    one recipe across runs) does not change when a run is requeued."""
    import yaml

    out, _ = trained
    pretrained = tmp_path / "pretrained"
    pretrained.mkdir()
    shutil.copy(os.path.join(out, "model_final.pth"), pretrained / "tiny.pth")
    run = tmp_path / "run"
    env = dict(env, SCALENET_D2_PRETRAINED=str(pretrained))
    opts = (*TINY, "SOLVER.MAX_ITER", "2", "MODEL.WEIGHTS", "pretrained/tiny.pth", "OUTPUT_DIR", str(run))

    def recorded_weights():
        with open(run / "config.yaml") as f:
            return yaml.safe_load(f)["MODEL"]["WEIGHTS"]

    rc, log = train_net(env, "--config-file", CONFIG, *opts)
    assert rc == 0, log[-3000:]
    assert recorded_weights() == str(pretrained / "tiny.pth")
    rc, log = train_net(env, "--config-file", CONFIG, "--resume", *opts)
    assert rc == 0, log[-3000:]
    assert recorded_weights() == str(pretrained / "tiny.pth")


def test_two_processes_on_cpu_gloo_resume_exactly(env, tmp_path):
    """Two processes (gloo): each runs the job; a run stopped after its first checkpoint and resumed
    ends with the weights of one that never stopped, each process restoring its own RNG states."""
    import torch

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    two = ("--config-file", CONFIG, "--num-gpus", "2")
    opts = (*TINY, "SOLVER.MAX_ITER", "6", "OUTPUT_DIR")
    rc, log = train_net(env, *two, *opts, str(whole))
    assert rc == 0, log[-3000:]
    assert "Rank of current process: 0. World size: 2" in log
    with open(whole / "log.txt.rank1") as f:  # the second process ran the same job
        assert "Rank of current process: 1. World size: 2" in f.read()
    with open(whole / "run_info.json") as f:
        assert json.load(f)["train_num_processes"] == 2
    assert "copypaste: AP,AP50,AP75,APs,APm,APl" in log
    states = _weights(whole / "model_0000001.pth")["trainer"]["rng"]
    assert len(states) == 2 and not torch.equal(states[0]["torch"], states[1]["torch"])

    shutil.copytree(whole, cut)
    for name in ("model_0000003.pth", "model_0000005.pth", "model_final.pth"):
        os.remove(cut / name)
    (cut / "last_checkpoint").write_text("model_0000001.pth")
    rc, log = train_net(env, *two, "--resume", *opts, str(cut))
    assert rc == 0, log[-3000:]
    assert "Starting training from iteration 2" in log
    a, b = _weights(whole / "model_final.pth")["model"], _weights(cut / "model_final.pth")["model"]
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, f"{len(differing)} tensors differ, first {differing[0]}"


def test_missing_weights_fail_at_start_with_instruction(env, tmp_path):
    e = dict(env, SCALENET_D2_PRETRAINED=str(tmp_path))
    rc, log = train_net(
        e,
        "--config-file",
        "configs/COCO-Detection/faster_rcnn_S50_FPN_1x.yaml",
        "OUTPUT_DIR",
        str(tmp_path),
        timeout=120,
    )
    assert rc != 0
    assert "MODEL.WEIGHTS 'pretrained/ScaleNet-50.pkl'" in log
    assert os.path.join(str(tmp_path), "ScaleNet-50.pkl") in log  # every place it looked
    assert "python tools/convert_scalenet_to_d2.py" in log and "Traceback" not in log
    # where the weights are and what they are
    assert "github.com/Eli-YiLi/ScaleNet" in log and "extract code f1c5" in log and "120 epochs" in log
    assert "22.02/6.05 (published)" in log
    rc, log = train_net(
        e,
        "--config-file",
        "configs/COCO-Detection/faster_rcnn_R50_FPN_1x.yaml",
        "OUTPUT_DIR",
        str(tmp_path),
        timeout=120,
    )
    assert rc != 0 and "Traceback" not in log
    assert "ResNet50_Weights.IMAGENET1K_V1 (https://download.pytorch.org/models/resnet50-0676ba61.pth)" in log
    assert "top-1 accuracy 76.13%" in log
    assert "python tools/convert_scalenet_to_d2.py resnet50-0676ba61.pth pretrained/R-50-torchvision.pkl" in log


def test_missing_coco_fails_at_start_naming_path(env, tmp_path):
    e = dict(env, DETECTRON2_DATASETS=str(tmp_path / "nowhere"))
    weights = tmp_path / "model_final.pth"
    weights.write_bytes(b"")  # never read: the check comes first
    rc, log = train_net(
        e,
        "--config-file",
        "configs/COCO-Detection/faster_rcnn_S50_FPN_1x.yaml",
        "--eval-only",
        "MODEL.WEIGHTS",
        str(weights),
        "OUTPUT_DIR",
        str(tmp_path),
        timeout=120,
    )
    assert rc != 0 and "Traceback" not in log
    assert str(tmp_path / "nowhere" / "coco" / "annotations" / "instances_val2017.json") in log
    assert "DETECTRON2_DATASETS" in log


def test_a_finished_run_is_never_restarted_over(trained, env):
    out, _ = trained
    before = {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)}
    rc, log = train_net(env, "--config-file", CONFIG, *TINY, "SOLVER.MAX_ITER", "4", "OUTPUT_DIR", out, timeout=120)
    assert rc != 0 and "Traceback" not in log
    assert f"OUTPUT_DIR {out} holds another run's checkpoints" in log and "pass --resume" in log
    assert {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)} == before  # nothing touched


def test_eval_only_without_weights_is_refused(env, tmp_path):
    rc, log = train_net(
        env,
        "--config-file",
        CONFIG,
        "--eval-only",
        *TINY,
        "MODEL.WEIGHTS",
        "",
        "OUTPUT_DIR",
        str(tmp_path),
        timeout=120,
    )
    assert rc != 0 and "Traceback" not in log
    assert "--eval-only with MODEL.WEIGHTS" in log and "untrained model" in log


def _weights(path):
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def test_killed_and_resumed_run_ends_bit_identical(env, tmp_path):
    """A run stopped after its first checkpoint and resumed ends with exactly the weights,
    optimizer state and metrics of one that never stopped (CPU, fixed SEED, NUM_WORKERS 0)."""
    import torch

    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    rc, log = train_net(env, "--config-file", CONFIG, *TINY, "SOLVER.MAX_ITER", "6", "OUTPUT_DIR", whole)
    assert rc == 0, log[-3000:]
    # the state a kill -9 right after model_0000001.pth was written leaves behind: later
    # checkpoints never written, metrics.json and the TensorBoard events already ahead of it
    shutil.copytree(whole, cut)
    for name in ("model_0000003.pth", "model_0000005.pth", "model_final.pth"):
        os.remove(os.path.join(cut, name))
    with open(os.path.join(cut, "last_checkpoint"), "w") as f:
        f.write("model_0000001.pth")
    rc, log = train_net(env, "--config-file", CONFIG, "--resume", *TINY, "SOLVER.MAX_ITER", "6", "OUTPUT_DIR", cut)
    assert rc == 0, log[-3000:]
    assert "Starting training from iteration 2" in log

    a, b = _weights(os.path.join(whole, "model_final.pth")), _weights(os.path.join(cut, "model_final.pth"))
    assert a["model"].keys() == b["model"].keys()
    differing = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not differing, f"{len(differing)} tensors differ, first {differing[0]}"
    momentum_a = a["trainer"]["_trainer"]["optimizer"]["state"]
    momentum_b = b["trainer"]["_trainer"]["optimizer"]["state"]
    assert momentum_a.keys() == momentum_b.keys() and len(momentum_a) > 0
    assert all(torch.equal(momentum_a[i]["momentum_buffer"], momentum_b[i]["momentum_buffer"]) for i in momentum_a)
    assert a["trainer"]["hooks"]["LRScheduler"] == b["trainer"]["hooks"]["LRScheduler"]

    iterations = [m["iteration"] for m in metrics(cut) if "total_loss" in m]
    assert len(iterations) == len(set(iterations)), iterations  # each iteration once
    strip = [{k: v for k, v in m.items() if "time" not in k} for m in metrics(whole)]
    assert [{k: v for k, v in m.items() if "time" not in k} for m in metrics(cut)] == strip


def test_resume_skips_a_broken_newest_checkpoint(trained, env, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(trained[0], out)
    final = os.path.join(out, "model_final.pth")
    with open(final, "r+b") as f:  # what a kill -9 in the middle of a plain torch.save leaves
        f.truncate(os.path.getsize(final) // 2)
    newest = max(f for f in os.listdir(out) if re.fullmatch(r"model_\d+\.pth", f))
    rc, log = train_net(env, "--config-file", CONFIG, "--resume", *TINY, "SOLVER.MAX_ITER", "9", "OUTPUT_DIR", out)
    assert rc == 0, log[-3000:]
    assert re.search(
        r"Resume: skipping model_final\.pth: .*model_final\.pth \(\d+ bytes\) is a torch checkpoint that is truncated",
        log,
    )
    assert f"resuming from {out}/{newest}, the newest intact checkpoint" in log
    assert f"Starting training from iteration {int(newest[6:13]) + 1}" in log


def test_divergence_stops_before_a_non_finite_step_or_checkpoint(env, tmp_path):
    import torch

    rc, log = train_net(
        env, "--config-file", CONFIG, *TINY, "SOLVER.BASE_LR", "1e4", "SOLVER.WARMUP_ITERS", "0",
        "SOLVER.MAX_ITER", "20", "OUTPUT_DIR", str(tmp_path),
    )  # fmt: skip
    assert rc != 0
    match = re.search(r"train_net.py: error: training diverged at iteration (\d+): ", log)
    assert match, log[-3000:]
    assert int(match.group(1)) < 19
    assert f"the last good checkpoint is {tmp_path}/model_" in log
    for name in os.listdir(tmp_path):
        if name.endswith(".pth"):
            state = _weights(tmp_path / name)["model"]
            assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), name
    assert not (tmp_path / "model_final.pth").exists()


def test_resume_with_another_allocation_is_refused_and_changes_nothing(trained, env, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(trained[0], out)
    before = folder_snapshot(out)
    rc, log = train_net(
        env, "--config-file", CONFIG, "--resume", *TINY, "MODEL.SCALENET.ALLOCATION", "scalenet50_light",
        "SOLVER.MAX_ITER", "6", "OUTPUT_DIR", out,
    )  # fmt: skip
    assert rc != 0 and "train_net.py: error: " in log
    assert f"{out}/model_final.pth does not fit the model's backbone: " in log
    assert re.search(r"first 'backbone\.bottom_up\.\S+': shape \(\d+(, \d+)*\) in the checkpoint, \(\d+", log)
    assert "MODEL.SCALENET.ALLOW_PARTIAL_WEIGHTS" in log
    assert folder_snapshot(out) == before  # config.yaml and log.txt as they were


@pytest.mark.parametrize(
    "keep, tag, start",
    [
        # killed after model_0000001.pth was written, before last_checkpoint named it
        (("model_0000001.pth",), None, 2),
        # killed after model_0000003.pth was written, while the tag still named model_0000001.pth
        (("model_0000001.pth", "model_0000003.pth"), "model_0000001.pth", 4),
    ],
)
def test_resume_takes_the_newest_intact_checkpoint_whatever_the_tag_says(trained, env, tmp_path, keep, tag, start):
    out = tmp_path / "run"
    shutil.copytree(trained[0], out)
    for name in os.listdir(out):  # (other tests of this module train the fixture's run further)
        if name == "last_checkpoint" or (name.startswith("model_") and name not in keep):
            os.remove(out / name)
    if tag:
        (out / "last_checkpoint").write_text(tag)
    rc, log = train_net(env, "--config-file", CONFIG, "--resume", *TINY, "SOLVER.MAX_ITER", "4", "OUTPUT_DIR", str(out))
    assert rc == 0, log[-3000:]
    assert f"Starting training from iteration {start}" in log


def test_slurm_cpus_become_torch_threads(monkeypatch):
    from types import SimpleNamespace

    import torch

    from scalenet_d2.engine.launch import launch_any, slurm_threads

    assert slurm_threads({"SLURM_CPUS_PER_TASK": "8"}, 2) == 4
    assert slurm_threads({"SLURM_CPUS_PER_TASK": "1"}, 2) == 1
    assert slurm_threads({"SLURM_CPUS_PER_TASK": "8", "OMP_NUM_THREADS": "1"}, 1) is None  # the user's choice
    assert slurm_threads({}, 1) is None
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    saved = torch.get_num_threads()
    try:
        args = SimpleNamespace(num_gpus=1, num_machines=1, machine_rank=0, dist_url="auto")
        assert launch_any(lambda args: torch.get_num_threads(), args) is None  # launch returns nothing
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
    finally:
        torch.set_num_threads(saved)


def test_one_train_net_per_output_dir(env, tmp_path):
    import socket
    import subprocess

    out = tmp_path / "run"
    out.mkdir()
    lock = out / ".train_net.lock"
    args = ("--config-file", CONFIG, *TINY, "SOLVER.MAX_ITER", "2", "OUTPUT_DIR", str(out))
    host = socket.gethostname()
    # held by a live process of this host (this test's): refused, nothing written
    lock.write_text(json.dumps({"host": host, "pid": os.getpid(), "slurm_job_id": "77", "started": "then"}))
    rc, log = train_net(env, *args)
    assert rc == 1, log[-3000:]
    assert f"is in use by another train_net.py (host {host}, pid {os.getpid()}, SLURM job 77, since then)" in log
    assert os.listdir(out) == [".train_net.lock"]
    # another host's, with no way to ask whether it still runs: refused, saying how to remove it
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "slurm_job_id": None, "started": "then"}))
    rc, log = train_net(env, *args)
    assert rc == 1 and f"if it is not running any more, remove {lock}" in log
    # a stale lock (its process gone from this host) is taken over; the run's own lock goes at its end
    gone = subprocess.Popen(["true"])
    gone.wait()
    lock.write_text(json.dumps({"host": host, "pid": gone.pid, "slurm_job_id": None, "started": "then"}))
    rc, log = train_net(env, *args)
    assert rc == 0, log[-3000:]
    assert "taking over a stale lock" in log and (out / "model_final.pth").is_file() and not lock.exists()
