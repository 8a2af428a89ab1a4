"""A study: configs (a ScaleNet config and its ResNet twin, or any list) times seeds, each a
train_net.py run in its own OUTPUT_DIR under one folder, launched through submitit on SLURM or
on this machine, and its statistics (utils/comparison.py's arms) once every run has finished.

The study folder:

    study.json              the manifest (format below; written and read only here)
    <arm>/seed<k>/          each run's OUTPUT_DIR (<arm>: the config's file name, or --names)
    submitit/               submitit's job scripts and logs (%j_0_log.out: the run's console)
    comparison.md           per arm mean ± sd (n), the difference's 95% interval (all finished)
    ap_spread.png           box AP per arm, each run's point and the interval

study.json: {"format": "scalenet_d2.study/1", "train_net": path, "configs": [...],
"names": [...], "seeds": [...], "opts": [...], "runs": [{"arm", "config", "seed", "output_dir"
(relative to the folder), "jobs": [{"launcher", "job_id"}, ...]}]}. Every run is launched with
--resume: a preempted or timed-out job is requeued by submitit and continues from the run's last
intact checkpoint (detectron2's last_checkpoint), and a run whose run_info.json records its
training is finished and never launched again.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

from scalenet_d2.atomic import bytes_writer, write_atomically

__all__ = [
    "MANIFEST",
    "StudyError",
    "TrainRun",
    "plan_study",
    "load_manifest",
    "write_manifest",
    "check_same_study",
    "run_finished",
    "check_launcher",
    "make_executor",
    "launch_study",
    "write_statistics",
]

MANIFEST = "study.json"
FORMAT = "scalenet_d2.study/1"
# the fields that make a study; a re-run must ask for the same ones
PLAN_FIELDS = ("configs", "names", "seeds", "opts")
# SLURM states in which a job still holds (or will hold) its OUTPUT_DIR
SLURM_ALIVE = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING")


class StudyError(ValueError):
    """A study folder or request that cannot be run, named with its field and what was expected."""


# -- the manifest -----------------------------------------------------------------------------


def plan_study(train_net: str, configs: Sequence[str], seeds: Sequence[int], opts: Sequence[str] = (), names=None):
    """The manifest of a new study: one run per (config, seed), none launched yet."""
    if not configs:
        raise StudyError("no configs: expected at least one config file (a ScaleNet config and its twin)")
    if not seeds:
        raise StudyError("no seeds: expected at least one seed (integers >= 0)")
    bad = [s for s in seeds if not isinstance(s, int) or s < 0]
    if bad or len(set(seeds)) < len(seeds):
        raise StudyError(f"seeds {list(seeds)}: expected distinct integers >= 0 (fixed seeds pair the arms)")
    if len(opts) % 2:
        raise StudyError(f"opts {list(opts)}: expected KEY VALUE pairs")
    for key in ("SEED", "OUTPUT_DIR"):
        if key in list(opts)[::2]:
            raise StudyError(f"opts set {key}: the study sets it for each run; expected neither SEED nor OUTPUT_DIR")
    for config in configs:
        if not os.path.isfile(config):
            raise StudyError(f"config {config}: no such file")
    names = list(names) if names else [os.path.splitext(os.path.basename(c))[0] for c in configs]
    if len(names) != len(configs):
        raise StudyError(f"names: {len(names)} names for {len(configs)} configs; expected one name per config")
    if len(set(names)) < len(names):
        raise StudyError(f"names {names}: two arms have the same name; pass --names")
    runs = [
        {"arm": name, "config": os.path.abspath(config), "seed": seed, "output_dir": f"{name}/seed{seed}", "jobs": []}
        for name, config in zip(names, configs)
        for seed in seeds
    ]
    return {
        "format": FORMAT,
        "train_net": os.path.abspath(train_net),
        "configs": [os.path.abspath(c) for c in configs],
        "names": names,
        "seeds": list(seeds),
        "opts": list(opts),
        "runs": runs,
    }


def write_manifest(folder: str, manifest: dict) -> None:
    data = (json.dumps(manifest, indent=2) + "\n").encode("utf-8")
    write_atomically({os.path.join(folder, MANIFEST): bytes_writer(data)})


def load_manifest(folder: str) -> dict:
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except json.JSONDecodeError as e:
        raise StudyError(f"{path}: not valid JSON ({e}); expected a study manifest written by tools/study.py") from None
    except OSError as e:
        raise StudyError(f"{path}: cannot be read ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise StudyError(f'{path}: field "format" is {found!r}; expected {FORMAT!r}')
    for field, kind in (("train_net", str), *((f, list) for f in PLAN_FIELDS), ("runs", list)):
        if not isinstance(manifest.get(field), kind):
            raise StudyError(f'{path}: field "{field}" is missing or not a {kind.__name__}')
    for i, run in enumerate(manifest["runs"]):
        missing = [k for k in ("arm", "config", "seed", "output_dir", "jobs") if k not in run]
        if missing:
            raise StudyError(f"{path}: runs[{i}] lacks {', '.join(missing)}")
        if os.path.isabs(run["output_dir"]) or ".." in run["output_dir"].split("/"):
            raise StudyError(f"{path}: runs[{i}].output_dir {run['output_dir']!r}; expected a folder inside the study")
    return manifest


def check_same_study(manifest: dict, requested: dict, folder: str) -> None:
    """A re-run continues the study only if it asks for the same configs, names, seeds and opts."""
    for field in PLAN_FIELDS:
        if requested[field] != manifest[field]:
            raise StudyError(
                f'{os.path.join(folder, MANIFEST)}: field "{field}" is {manifest[field]}, the command asks for '
                f"{requested[field]}; expected the same study (or a new --output-dir, or no configs to continue)"
            )


def run_finished(run_dir: str) -> bool:
    """train_net.py wrote the run record of a finished training (it writes it last)."""
    try:
        with open(os.path.join(run_dir, "run_info.json"), encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, json.JSONDecodeError):
        return False
    return (
        isinstance(info, dict) and "train_machine" in info and os.path.isfile(os.path.join(run_dir, "model_final.pth"))
    )


# -- one run as a submitit job ----------------------------------------------------------------


def _stop(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM to the run's process group (train_net.py and its workers), SIGKILL after grace_s."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:  # it ended meanwhile
        proc.wait()


class TrainRun:
    """One train_net.py run, always with --resume: the job submitit launches and, on preemption
    or timeout, checkpoints (stops the run; its last checkpoint is intact, being written
    atomically) and requeues, so the requeued job continues where the run stopped.

    On several nodes each node's task starts train_net.py for its GPUs with detectron2's
    --num-machines/--machine-rank/--dist-url, the first node hosting the rendezvous.
    """

    def __init__(self, train_net, config, output_dir, seed, opts=(), num_gpus=1, python=None):
        self.train_net, self.config, self.output_dir = train_net, config, output_dir
        self.seed, self.opts, self.num_gpus = seed, list(opts), num_gpus
        self.python = python or sys.executable
        self._proc: Optional[subprocess.Popen] = None

    def command(self, num_machines=1, machine_rank=0, dist_url="auto"):
        return [
            self.python,
            self.train_net,
            "--config-file",
            self.config,
            "--resume",
            "--num-gpus",
            str(self.num_gpus),
            "--num-machines",
            str(num_machines),
            "--machine-rank",
            str(machine_rank),
            "--dist-url",
            dist_url,
            *self.opts,
            "SEED",
            str(self.seed),
            "OUTPUT_DIR",
            self.output_dir,
        ]

    def __call__(self):
        import submitit

        env = submitit.JobEnvironment()
        dist_url = "auto"
        if env.num_nodes > 1:  # a port of this job's own on the first node, as every node computes it
            dist_url = f"tcp://{env.hostnames[0]}:{20000 + int(str(env.job_id).split('_')[0]) % 20000}"
        cmd = self.command(env.num_nodes, env.node, dist_url)
        print("study run:", " ".join(cmd), flush=True)
        # its own process group, so that stopping it stops its DataLoader workers and DDP processes
        self._proc = subprocess.Popen(cmd, cwd=os.path.dirname(self.train_net), start_new_session=True)
        try:
            # polled, not wait(): Popen.wait() holds a lock that checkpoint()'s own wait, run by
            # the signal handler in this thread, would then wait for forever
            while self._proc.poll() is None:
                time.sleep(0.5)
        finally:
            _stop(self._proc)
        rc = self._proc.returncode
        if rc != 0:
            raise RuntimeError(f"train_net.py exited with {rc} for {self.output_dir} (its log is this job's log)")
        return self.output_dir

    def checkpoint(self):
        import submitit

        if self._proc is not None:
            _stop(self._proc)
        return submitit.helpers.DelayedSubmission(TrainRun(**self._arguments()))

    def _arguments(self):
        keys = ("train_net", "config", "output_dir", "seed", "opts", "num_gpus", "python")
        return {k: getattr(self, k) for k in keys}

    def __getstate__(self):  # a running process does not travel with the pickled job
        return self._arguments()

    def __setstate__(self, state):
        self.__init__(**state)


# -- launching --------------------------------------------------------------------------------


def check_launcher(launcher: str) -> None:
    """Raises StudyError where `launcher` cannot submit from this machine."""
    if launcher not in ("local", "slurm"):
        raise StudyError(f"launcher {launcher!r}; expected 'slurm' or 'local'")
    if launcher == "slurm" and shutil.which("srun") is None:
        raise StudyError("launcher 'slurm': no srun on this machine; expected a SLURM login node (or --launcher local)")


def make_executor(launcher: str, folder: str, params: Dict):
    """A submitit executor. params: num_gpus, nodes, timeout_min, cpus_per_task, mem_gb, and
    for SLURM partition, account, qos, constraint, max_num_timeout (requeues on timeout).
    Preemption (SIGUSR2 sent signal_delay_s before the time limit or on preemption) requeues
    without limit, as submitit does."""
    import submitit

    check_launcher(launcher)
    logs = os.path.join(folder, "submitit")
    if launcher == "local":
        executor = submitit.LocalExecutor(logs, max_num_timeout=params.get("max_num_timeout", 3))
        executor.update_parameters(
            timeout_min=params["timeout_min"], gpus_per_node=params["num_gpus"] if _has_cuda() else 0
        )
        return executor
    executor = submitit.SlurmExecutor(logs, max_num_timeout=params.get("max_num_timeout", 3))
    slurm = {
        "job_name": params.get("job_name", "scalenet_d2_study"),
        "nodes": params["nodes"],
        "ntasks_per_node": 1,  # one train_net.py per node; detectron2's launch() starts a process per GPU
        "gpus_per_node": params["num_gpus"],
        "cpus_per_task": params["cpus_per_task"],
        "time": params["timeout_min"],
        "signal_delay_s": params.get("signal_delay_s", 120),  # time to stop before the limit
    }
    if params.get("mem_gb"):
        slurm["mem"] = f"{params['mem_gb']}GB"
    for key in ("partition", "account", "qos", "constraint"):
        if params.get(key):
            slurm[key] = params[key]
    executor.update_parameters(**slurm)
    return executor


def _has_cuda():
    import torch

    return torch.cuda.is_available()


def _cuda_device_count():
    import torch

    return torch.cuda.device_count()


def _alive_on_slurm(folder: str, job_id: str) -> bool:
    import submitit

    try:
        state = submitit.SlurmJob(os.path.join(folder, "submitit"), job_id).state
    except Exception:  # no sacct here, or the job is too old for it: treat it as gone
        return False
    return state.split(" ")[0] in SLURM_ALIVE


def launch_study(folder: str, manifest: dict, launcher: str, params: Dict, parallel: int = 1, wait=True, log=print):
    """Launches every unfinished run not still queued or running. Local: up to `parallel` jobs
    at a time, waiting for all. SLURM: submits them all; waits only with wait=True.
    Returns {output_dir: "finished" | "failed: ..." | "submitted" | "still queued/running"}."""
    executor = make_executor(launcher, folder, params)
    status: Dict[str, str] = {}
    todo = []
    for run in manifest["runs"]:
        run_dir = os.path.join(folder, run["output_dir"])
        if run_finished(run_dir):
            status[run["output_dir"]] = "finished"
        elif launcher == "slurm" and any(
            j["launcher"] == "slurm" and _alive_on_slurm(folder, j["job_id"]) for j in run["jobs"]
        ):
            status[run["output_dir"]] = "still queued/running"
        else:
            todo.append(run)
    log(f"study {folder}: {len(manifest['runs'])} runs, {len(status)} finished or in flight, {len(todo)} to launch")

    gpus = params["num_gpus"] if launcher == "local" and _has_cuda() else 0
    if gpus and parallel * gpus > _cuda_device_count():
        raise StudyError(
            f"--parallel {parallel} x --num-gpus {gpus}: {parallel * gpus} GPUs at once; this machine has "
            f"{_cuda_device_count()}"
        )
    free_slots = list(range(parallel))  # local: each running job has GPUs of its own
    jobs = []  # (run, job, slot)
    try:
        while todo or jobs:
            while todo and (launcher == "slurm" or free_slots):
                run = todo.pop(0)
                run_dir = os.path.join(folder, run["output_dir"])
                os.makedirs(run_dir, exist_ok=True)
                slot = free_slots.pop(0) if launcher == "local" else None
                if gpus:
                    executor.update_parameters(visible_gpus=list(range(slot * gpus, (slot + 1) * gpus)))
                job = executor.submit(
                    TrainRun(
                        manifest["train_net"], run["config"], run_dir, run["seed"], manifest["opts"], params["num_gpus"]
                    )
                )
                run["jobs"].append({"launcher": launcher, "job_id": str(job.job_id)})
                write_manifest(folder, manifest)
                log(f"  {run['output_dir']}: job {job.job_id} ({launcher})")
                jobs.append((run, job, slot))
            if launcher == "slurm" and not wait:
                for run, _, _ in jobs:
                    status[run["output_dir"]] = "submitted"
                return status
            done = [(run, job, slot) for run, job, slot in jobs if job.done()]
            for run, job, slot in done:
                jobs.remove((run, job, slot))
                if slot is not None:
                    free_slots.append(slot)
                try:
                    job.result()
                    status[run["output_dir"]] = "finished"
                except Exception as e:  # submitit re-raises the job's error with its traceback
                    status[run["output_dir"]] = f"failed: {str(e).strip().splitlines()[-1]} (log: {job.paths.stdout})"
                log(f"  {run['output_dir']}: {status[run['output_dir']]}")
            if not done:
                time.sleep(1.0)
    except BaseException:
        if launcher == "local":  # local jobs die with the study; SLURM jobs go on
            for _, job, _ in jobs:
                job.cancel()
        raise
    return status


# -- statistics ---------------------------------------------------------------------------------


def write_statistics(folder: str, manifest: dict):
    """comparison.md and ap_spread.png from the finished runs, unless an earlier call wrote them
    (finished runs never change, so neither do they). Returns (plain-text table, paths written)."""
    from scalenet_d2.engine.run_record import load_run
    from scalenet_d2.utils.comparison import render_arms
    from scalenet_d2.utils.pictures import plot_arm_spread

    arms: Dict[str, List[dict]] = {name: [] for name in manifest["names"]}
    for run in manifest["runs"]:
        arms[run["arm"]].append(load_run(os.path.join(folder, run["output_dir"])))
    text = render_arms(arms)
    table, picture = os.path.join(folder, "comparison.md"), os.path.join(folder, "ap_spread.png")
    written = []
    if not os.path.exists(table):
        markdown = render_arms(arms, markdown=True)
        write_atomically({table: bytes_writer((markdown + "\n").encode("utf-8"))})
        written.append(table)
    if not os.path.exists(picture):
        written.append(plot_arm_spread(arms, picture))
    return text, written
