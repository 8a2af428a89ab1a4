"""tools/study.py on a real SLURM (`make test-slurm`: tools/slurm/local_slurm.sh starts a
single-node slurmctld/slurmd with slurmdbd, MariaDB and munge): a fresh study, a rerun while its
jobs run (it waits, then writes the statistics) and once they have finished, scontrol requeue, the
preemption signal, scancel then a rerun, a timeout requeue, a job state sacct cannot give, and
sbatch refusing a partition or a GPU request. Skipped where no SLURM answers."""

import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest
from conftest import TINY_TRAIN

from scalenet_d2.engine.study import load_manifest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDY = os.path.join(REPO, "tools", "study.py")
CONFIGS = ["configs/Synthetic/faster_rcnn_Stiny_FPN.yaml", "configs/Synthetic/faster_rcnn_Rtiny_FPN.yaml"]
ARMS = ["faster_rcnn_Stiny_FPN", "faster_rcnn_Rtiny_FPN"]
JOB = ["--launcher", "slurm", "--num-gpus", "0", "--cpus-per-task", "1", "--partition", "debug"]


def _slurm_answers():
    if shutil.which("sbatch") is None or shutil.which("scontrol") is None:
        return False
    return subprocess.run(["scontrol", "ping"], capture_output=True, text=True).returncode == 0


pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(not _slurm_answers(), reason="needs a SLURM (make test-slurm starts one on this machine)"),
]


def study(env, folder, *args, timeout=600):
    cmd = [sys.executable, STUDY, "--output-dir", str(folder), *JOB, *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def new_study(env, folder, seeds=("1",), configs=CONFIGS[:1], iterations=16, minutes=10):
    """A study submitted without waiting: the manifest, with its job ids."""
    opts = ["--", *TINY_TRAIN, "SOLVER.MAX_ITER", str(iterations)]
    rc, out = study(env, folder, "--time", str(minutes), "--seeds", *seeds, "--configs", *configs, "--no-wait", *opts)
    assert rc == 0, out[-3000:]
    return load_manifest(str(folder))


def jobs(folder):
    return [[j["job_id"] for j in run["jobs"]] for run in load_manifest(str(folder))["runs"]]


def state(job_id):
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", job_id], capture_output=True, text=True)
    return out.stdout.strip().split(" ")[0]


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@contextlib.contextmanager
def requeued_jobs_start_at_once():
    """SLURM holds a requeued job back for a while (reason BeginTime); an admin releases it."""
    stop = threading.Event()

    def release():
        while not stop.wait(1.0):
            held = subprocess.run(["squeue", "-h", "-t", "PD", "-o", "%i %r"], capture_output=True, text=True)
            for line in held.stdout.splitlines():
                job_id, reason = line.split(" ", 1)
                if reason.strip() == "BeginTime":
                    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True)

    thread = threading.Thread(target=release, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def job_log(folder, job_id):
    return "".join(p.read_text() for p in sorted((folder / "submitit").glob(f"{job_id}_*_log.*")))


def starts(folder, job_id):
    text = job_log(folder, job_id)
    return [int(line.rsplit(" ", 1)[1]) for line in text.splitlines() if "Starting training from iteration" in line]


def test_a_rerun_while_jobs_run_waits_then_writes_the_statistics(env, tmp_path):
    folder = tmp_path / "study"
    new_study(env, folder, seeds=("1", "2"), configs=CONFIGS)
    submitted = jobs(folder)
    assert all(len(j) == 1 for j in submitted) and any(state(j[0]) in ("PENDING", "RUNNING") for j in submitted)
    rc, out = study(env, folder)  # the same study, its jobs in flight: wait for them
    assert rc == 0, out[-3000:]
    assert "4 runs: 0 finished, 4 in flight, 0 to launch" in out
    assert jobs(folder) == submitted  # nothing launched again
    assert (folder / "comparison.md").is_file() and "box AP: " in out
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file() and "submitit" not in p.parts}
    rc, out = study(env, folder)  # finished: nothing to do
    assert rc == 0 and "4 runs: 4 finished, 0 in flight, 0 to launch" in out
    assert jobs(folder) == submitted
    assert {p: p.stat().st_mtime_ns for p in before} == before


def _running_past_first_checkpoint(folder):
    run_dir = folder / ARMS[0] / "seed1"
    (job,) = jobs(folder)[0]
    wait_for(lambda: (run_dir / "model_0000001.pth").exists() and state(job) == "RUNNING", 300, "a checkpoint")
    return job, run_dir


def test_scontrol_requeue_is_not_a_failure(env, tmp_path):
    folder = tmp_path / "study"
    new_study(env, folder, iterations=40)
    job, run_dir = _running_past_first_checkpoint(folder)
    subprocess.run(["scontrol", "requeue", job], check=True)  # SIGTERM to every process of the job
    with requeued_jobs_start_at_once():
        rc, out = study(env, folder)
    assert rc == 0, out[-3000:]
    assert "failed" not in out and (run_dir / "model_final.pth").is_file()
    assert jobs(folder) == [[job]]  # SLURM ran the same job again; the study launched nothing
    found = starts(folder, job)
    assert len(found) == 2 and found[0] == 0 and found[1] >= 2, found


def test_the_preemption_signal_requeues_and_the_run_continues(env, tmp_path):
    folder = tmp_path / "study"
    new_study(env, folder, iterations=40)
    job, run_dir = _running_past_first_checkpoint(folder)
    # as submitit's own test of preemption does: SIGTERM, then the requeue signal
    subprocess.run(["scancel", job, "--signal", "SIGTERM"], check=True)
    subprocess.run(["scancel", job, "--signal", "USR2"], check=True)
    with requeued_jobs_start_at_once():
        rc, out = study(env, folder)
    assert rc == 0, out[-3000:]
    assert (run_dir / "model_final.pth").is_file() and jobs(folder) == [[job]]
    log = job_log(folder, job)
    assert "Requeued job" in log or "requeue" in log.lower()
    found = starts(folder, job)
    assert len(found) == 2 and found[1] >= 2, found


def test_scancel_then_a_rerun_continues_the_run(env, tmp_path):
    folder = tmp_path / "study"
    new_study(env, folder, iterations=40)
    job, run_dir = _running_past_first_checkpoint(folder)
    subprocess.run(["scancel", job], check=True)
    wait_for(lambda: state(job) == "CANCELLED", 120, "the cancellation")
    rc, out = study(env, folder)
    assert rc == 0, out[-3000:]
    ((first, second),) = jobs(folder)  # one new job
    assert first == job and (run_dir / "model_final.pth").is_file()
    assert starts(folder, second)[0] >= 2


def test_a_timeout_requeues_and_the_run_continues(env, tmp_path):
    folder = tmp_path / "study"
    # --time 2: warned 30 s before the limit; about 200 s of training needs a second attempt
    new_study(env, folder, iterations=1500, minutes=2)
    (job,) = jobs(folder)[0]
    with requeued_jobs_start_at_once():
        rc, out = study(env, folder, timeout=900)
    assert rc == 0, out[-3000:]
    found = starts(folder, job)
    assert len(found) >= 2 and found[0] == 0 and found[1] >= 2, found
    assert "timed-out" in job_log(folder, job).lower() or "timeout" in job_log(folder, job).lower()


def test_a_job_whose_state_sacct_cannot_give_is_not_launched_again(env, tmp_path):
    folder = tmp_path / "study"
    new_study(env, folder, iterations=40)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sacct").write_text("#!/bin/sh\necho 'sacct: error: Problem talking to the database' >&2\nexit 1\n")
    (bin_dir / "sacct").chmod(0o755)
    rc, out = study(dict(env, PATH=f"{bin_dir}:{env['PATH']}"), folder)
    assert rc == 1, out[-3000:]
    assert "unknown: the state of its SLURM job" in out and "--relaunch-unknown" in out
    assert len(jobs(folder)[0]) == 1
    rc, out = study(env, folder)  # sacct back: the job is waited for, not doubled
    assert rc == 0 and len(jobs(folder)[0]) == 1, out[-3000:]


@pytest.mark.parametrize(
    "options, named",
    [
        (["--partition", "nope"], "check --partition 'nope'"),
        (["--num-gpus", "1"], "check --num-gpus 1 (GPUs per node; 0 for nodes without GPUs)"),
    ],
)
def test_sbatch_refusals_are_clear_and_leave_no_study(env, tmp_path, options, named):
    folder = tmp_path / "study"
    rc, out = study(env, folder, *options, "--seeds", "1", "--configs", CONFIGS[0], "--", *TINY_TRAIN)
    assert rc == 2 and "Traceback" not in out, out[-3000:]
    assert "study.py: error: sbatch refused the job of" in out and named in out
    assert not folder.exists()
