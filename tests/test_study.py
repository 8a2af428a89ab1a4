"""tools/study.py: the synthetic tiny pair over 2 seeds through submitit's local executor, one
job preempted mid-run and requeued (ending with the weights of a run never stopped), re-runs
that launch nothing and change nothing, the manifest's errors, and the SLURM job it submits."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import TINY_TRAIN, train_net

from scalenet_d2.engine.study import (
    MANIFEST,
    StudyError,
    TrainRun,
    check_same_study,
    load_manifest,
    make_executor,
    plan_study,
    signal_delay_s,
    write_manifest,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDY = os.path.join(REPO, "tools", "study.py")
TRAIN_NET = os.path.join(REPO, "train_net.py")
CONFIGS = ["configs/Synthetic/faster_rcnn_Stiny_FPN.yaml", "configs/Synthetic/faster_rcnn_Rtiny_FPN.yaml"]
ARMS = ["faster_rcnn_Stiny_FPN", "faster_rcnn_Rtiny_FPN"]
TINY = TINY_TRAIN + ["SOLVER.MAX_ITER", "16"]


def study(env, folder, *args, timeout=600):
    cmd = [sys.executable, STUDY, "--output-dir", str(folder), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def _process_running(output_dir):
    """(pid, parent pid) of the train_net.py process writing output_dir, or None."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if any(a.endswith(b"train_net.py") for a in argv) and output_dir.encode() in argv:
            return int(pid), ppid
    return None


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


@pytest.fixture(scope="module")
def finished_study(env, tmp_path_factory):
    """The tiny pair, seeds 1 and 2, two jobs at a time; ScaleNet seed 1 preempted (SIGUSR2 to
    its submitit job, as SLURM sends before a time limit or on preemption) after its first
    checkpoint."""
    folder = tmp_path_factory.mktemp("study") / "tiny"
    cmd = [sys.executable, STUDY, "--output-dir", str(folder), "--parallel", "2", "--seeds", "1", "2"]
    cmd += ["--time", "20", "--configs", *CONFIGS, "--", *TINY]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    victim = str(folder / ARMS[0] / "seed1")
    preempted_at = None
    try:
        deadline = time.monotonic() + 300
        while preempted_at is None and time.monotonic() < deadline and proc.poll() is None:
            if os.path.exists(os.path.join(victim, "model_0000001.pth")):
                running = _process_running(victim)
                assert running and not os.path.exists(os.path.join(victim, "model_final.pth"))
                os.kill(running[1], signal.SIGUSR2)  # the submitit job, which runs train_net.py
                preempted_at = sorted(f for f in os.listdir(victim) if f.startswith("model_"))
            time.sleep(0.01)
        out, _ = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert preempted_at, f"the run never reached its first checkpoint:\n{out[-3000:]}"
    assert proc.returncode == 0, out[-3000:]
    return folder, victim, preempted_at, out


def test_study_runs_every_config_and_seed_and_writes_the_statistics(finished_study):
    folder, _, _, out = finished_study
    manifest = load_manifest(str(folder))
    assert [(r["arm"], r["seed"]) for r in manifest["runs"]] == [(a, s) for a in ARMS for s in (1, 2)]
    for run in manifest["runs"]:
        run_dir = folder / run["output_dir"]
        assert (run_dir / "model_final.pth").is_file() and (run_dir / "eval_results.json").is_file()
        with open(run_dir / "config.yaml") as f:
            assert f"SEED: {run['seed']}" in f.read()
        assert run["jobs"] and run["jobs"][0]["launcher"] == "local"
    comparison = (folder / "comparison.md").read_text()
    print(comparison)
    assert "mean ± sd (n)" in comparison and "paired t (2 seeds)" in comparison
    assert comparison.count("(n=2)") >= 2 * 6  # both arms, every AP metric
    assert "95% interval" in comparison and (folder / "ap_spread.png").stat().st_size > 0
    assert "box AP: " in out  # the sentences, printed


def test_preempted_job_is_requeued_and_ends_as_if_never_stopped(finished_study, env, tmp_path):
    folder, victim, preempted_at, _ = finished_study
    logs = {p: p.read_text() for p in (folder / "submitit").glob("*_log.*")}
    job = next(p.name.split("_")[0] for p, text in logs.items() if victim in text)
    log = "".join(text for p, text in sorted(logs.items()) if p.name.startswith(job + "_"))
    assert "this job is preempted" in log and "Requeued job" in log
    # the requeued job continued from a checkpoint, not from the start
    starts = [int(line.rsplit(" ", 1)[1]) for line in log.splitlines() if "Starting training from iteration" in line]
    assert len(starts) == 2 and starts[0] == 0 and starts[1] >= 2, (starts, preempted_at)

    # the same run, never stopped
    whole = str(tmp_path / "whole")
    rc, log = train_net(env, "--config-file", CONFIGS[0], *TINY, "SEED", "1", "OUTPUT_DIR", whole, timeout=600)
    assert rc == 0, log[-3000:]
    a, b = _weights(os.path.join(whole, "model_final.pth")), _weights(os.path.join(victim, "model_final.pth"))
    assert a.keys() == b.keys()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, f"{len(differing)} of {len(a)} tensors differ, first {differing[0]}"
    # and the other seed's run did differ from it: the seed reached the run
    other = _weights(str(folder / ARMS[0] / "seed2" / "model_final.pth"))
    assert any(not torch.equal(a[k], other[k]) for k in a)


def test_rerunning_a_finished_study_launches_nothing_and_changes_no_run(finished_study, env):
    folder, _, _, _ = finished_study
    finals = sorted(folder.glob("*/seed*/model_final.pth"))
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in finals}
    rc, out = study(env, folder)
    assert rc == 0, out[-3000:]
    assert "4 runs: 4 finished, 0 in flight, 0 to launch" in out and "paired t (2 seeds)" in out
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in finals} == before

    # asking for another study in the same folder is refused, naming the field
    rc, out = study(env, folder, "--configs", *CONFIGS, "--seeds", "1", "2", "3")
    assert rc == 2 and 'field "seeds" is [1, 2], the command asks for [1, 2, 3]' in out


def test_unfinished_runs_continue_and_a_failed_run_is_reported(env, tmp_path):
    folder = tmp_path / "study"
    os.makedirs(folder)
    manifest = plan_study(TRAIN_NET, CONFIGS[:1], [3], ["MODEL.SCALENET.ALLOCATION", "no_such_allocation"])
    write_manifest(str(folder), manifest)
    rc, out = study(env, folder, "--time", "5")
    assert rc == 1, out[-3000:]
    assert "run this command again to continue them" in out
    # the error itself, as train_net.py gave it, and the log to read
    failure = next(line for line in out.splitlines() if "failed: " in line)
    assert "train_net.py exited with 1" in failure and "'no_such_allocation' is neither a bundled allocation" in failure
    assert "; log: " in failure and failure.rstrip().endswith("_log.out")
    assert not (folder / "comparison.md").exists()
    assert load_manifest(str(folder))["runs"][0]["jobs"][0]["launcher"] == "local"


def test_plan_and_manifest_errors(tmp_path):
    with pytest.raises(StudyError, match=r"seeds \[1, 1\]: expected distinct integers >= 0"):
        plan_study(TRAIN_NET, CONFIGS, [1, 1])
    with pytest.raises(StudyError, match="opts set SEED: the study sets it"):
        plan_study(TRAIN_NET, CONFIGS, [1], ["SEED", "3"])
    with pytest.raises(StudyError, match="config nope.yaml: no such file"):
        plan_study(TRAIN_NET, ["nope.yaml"], [1])
    with pytest.raises(StudyError, match="two arms have the same name"):
        plan_study(TRAIN_NET, [CONFIGS[0], CONFIGS[0]], [1])
    manifest = plan_study(TRAIN_NET, CONFIGS, [1, 2], names=["S", "R"])
    assert [r["output_dir"] for r in manifest["runs"]] == ["S/seed1", "S/seed2", "R/seed1", "R/seed2"]
    with pytest.raises(StudyError, match='field "names" is'):
        check_same_study(manifest, plan_study(TRAIN_NET, CONFIGS, [1, 2]), str(tmp_path))

    write_manifest(str(tmp_path), manifest)
    assert load_manifest(str(tmp_path)) == manifest
    path = tmp_path / MANIFEST
    path.write_text(json.dumps(dict(manifest, format="something/2")))
    with pytest.raises(
        StudyError, match=r"study.json: field \"format\" is 'something/2'; expected 'scalenet_d2.study/1'"
    ):
        load_manifest(str(tmp_path))
    manifest["runs"][0]["output_dir"] = "../elsewhere"
    path.write_text(json.dumps(manifest))
    with pytest.raises(StudyError, match=r"runs\[0\].output_dir '../elsewhere'; expected a folder inside the study"):
        load_manifest(str(tmp_path))
    path.write_text("{")
    with pytest.raises(StudyError, match="not valid JSON"):
        load_manifest(str(tmp_path))


def test_slurm_job_script(tmp_path, monkeypatch):
    """What a SLURM study submits: one task per node for detectron2's launch(), GPUs, time, the
    USR2 signal before the time limit that triggers the checkpoint and requeue."""
    monkeypatch.setenv("PATH", str(tmp_path))  # no SLURM here
    with pytest.raises(StudyError, match="launcher 'slurm': no srun on this machine"):
        make_executor("slurm", str(tmp_path), {})
    srun = tmp_path / "srun"  # submitit looks for srun before it writes a job script
    srun.write_text("#!/bin/sh\nexit 1\n")
    srun.chmod(0o755)
    params = {
        "num_gpus": 8,
        "nodes": 2,
        "timeout_min": 1440,
        "cpus_per_task": 80,
        "mem_gb": 400,
        "partition": "gpu",
        "account": "vision",
        "qos": None,
        "constraint": "h100",
        "max_num_timeout": 5,
    }
    executor = make_executor("slurm", str(tmp_path), params)
    script = executor._make_submission_file_text("python -u -m submitit.core._submit", "UID")
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=80",
        "#SBATCH --mem=400GB",
        "#SBATCH --time=1440",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=vision",
        "#SBATCH --constraint=h100",
        "#SBATCH --signal=USR2@120",
        "#SBATCH --open-mode=append",
    ):
        assert line in script.splitlines(), (line, script)
    assert "qos" not in script and executor.max_num_timeout == 5
    # the warning before the limit scales with it: a short job still trains to a checkpoint first
    short = make_executor("slurm", str(tmp_path), dict(params, timeout_min=5))
    assert "#SBATCH --signal=USR2@30" in short._make_submission_file_text("python", "UID").splitlines()
    assert [signal_delay_s(m) for m in (2, 10, 15, 60, 1440)] == [30, 60, 90, 120, 120]
    with pytest.raises(StudyError, match=r"--time 1: a job is warned 30 s before its limit .* expected --time >= 2"):
        make_executor("slurm", str(tmp_path), dict(params, timeout_min=1))

    run = TrainRun(TRAIN_NET, CONFIGS[0], "/out/S/seed1", 1, ["SOLVER.MAX_ITER", "10"], num_gpus=8)
    cmd = run.command(num_machines=2, machine_rank=1, dist_url="tcp://node0:20042")
    assert cmd[1:] == [
        TRAIN_NET,
        "--config-file",
        CONFIGS[0],
        "--resume",
        "--num-gpus",
        "8",
        "--num-machines",
        "2",
        "--machine-rank",
        "1",
        "--dist-url",
        "tcp://node0:20042",
        "SOLVER.MAX_ITER",
        "10",
        "SEED",
        "1",
        "OUTPUT_DIR",
        "/out/S/seed1",
    ]


def test_local_jobs_at_once_must_fit_the_gpus(tmp_path, monkeypatch):
    import scalenet_d2.engine.study as study_module

    monkeypatch.setattr(study_module, "_has_cuda", lambda: True)
    monkeypatch.setattr(study_module, "_cuda_device_count", lambda: 4)
    manifest = plan_study(TRAIN_NET, CONFIGS, [1])
    params = {"num_gpus": 4, "timeout_min": 5}
    with pytest.raises(StudyError, match=r"--parallel 2 x --num-gpus 4: 8 GPUs at once; this machine has 4"):
        study_module.launch_study(str(tmp_path), manifest, "local", params, parallel=2, log=lambda *a: None)
    assert all(not run["jobs"] for run in manifest["runs"])  # nothing launched


@pytest.mark.parametrize(
    "refusal, options, named",
    [
        ("sbatch: error: invalid partition specified: nope", ["--partition", "nope"], "check --partition 'nope'"),
        (
            "sbatch: error: Invalid generic resource (gres) specification",
            ["--num-gpus", "1"],
            "check --num-gpus 1 (GPUs per node; 0 for nodes without GPUs)",
        ),
    ],
)
def test_a_refused_submission_is_a_clear_error_that_leaves_no_study(env, tmp_path, refusal, options, named):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", "exit 1"), ("sbatch", f"echo '{refusal}' >&2; exit 1")):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = dict(env, PATH=f"{bin_dir}:{env['PATH']}")
    folder = tmp_path / "study"
    rc, out = study(env, folder, "--launcher", "slurm", *options, "--seeds", "1", "--configs", CONFIGS[0])
    assert rc == 2 and "Traceback" not in out, out[-3000:]
    assert f"study.py: error: sbatch refused the job of {ARMS[0]}/seed1: {refusal}; {named}" in out
    assert not folder.exists()  # the next command starts a new study, not a broken one
