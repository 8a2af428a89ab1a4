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
--resume: a preempted or timed-out job is requeued by submitit (or SLURM) and continues from the
run's newest intact checkpoint, and a run whose run_info.json records its training is finished and
never launched again. On SLURM a job is over when SLURM says it ended; the study waits for the
jobs in flight, also those an earlier command launched.
"""

import collections
import json
import os
import re
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
    "SubmissionError",
    "signal_delay_s",
    "check_time_limit",
    "slurm_states",
    "last_error",
]

MANIFEST = "study.json"
FORMAT = "scalenet_d2.study/1"
# the fields that make a study; a re-run must ask for the same ones
PLAN_FIELDS = ("configs", "names", "seeds", "opts")
# SLURM states in which a job still holds (or will hold) its OUTPUT_DIR
SLURM_ALIVE = (
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "REQUEUE_FED",
    "REQUEUE_HOLD",
    "CONFIGURING",
    "COMPLETING",
    "SUSPENDED",
    "RESIZING",
    "STOPPED",
)
# The time limit of a job, and the warning (SIGUSR2) before it: a tenth of the limit, from 30 s
# to 2 min, so that a short job still runs to a checkpoint before it is asked to stop.
MIN_TIME_MIN = 2
POLL_S = 5.0  # how often a waiting study asks for its jobs' states


def signal_delay_s(timeout_min: int) -> int:
    """Seconds before the time limit at which SLURM sends the requeue signal (SIGUSR2)."""
    return int(min(120, max(30, timeout_min * 60 // 10)))


def check_time_limit(timeout_min: int) -> None:
    if timeout_min < MIN_TIME_MIN:
        raise StudyError(
            f"--time {timeout_min}: a job is warned {signal_delay_s(timeout_min)} s before its limit to stop at a "
            f"checkpoint and be requeued; under {MIN_TIME_MIN} minutes it would be requeued before it trains; "
            f"expected --time >= {MIN_TIME_MIN} (minutes)"
        )


class StudyError(ValueError):
    """A study folder or request that cannot be run, named with its field and what was expected."""


class SubmissionError(StudyError):
    """The cluster refused a job; `submitted`: how many jobs this command had submitted before."""

    def __init__(self, message: str, submitted: int):
        super().__init__(message)
        self.submitted = submitted


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


_ERROR_LINE = re.compile(r"^(train_net\.py: error: .+|[\w.]*(Error|Exception|Interrupt)(: .+)?)$")


def last_error(*logs) -> Optional[str]:
    """The last error line in the tails of a job's logs: train_net.py's own ("train_net.py: error:
    ...") or a traceback's last line; None where there is none."""
    found = None
    for path in logs:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                lines = f.readlines()[-200:]
        except OSError:
            continue
        for line in lines:
            if _ERROR_LINE.match(line.strip()):
                found = line.strip()
    return found


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
        if rc == -signal.SIGTERM and "SLURM_JOB_ID" in os.environ:
            # SLURM stops the job (requeue, preemption, scancel, the time limit) and signalled every
            # process of it: the job is not over, so no result is written; SLURM ends this process.
            print(f"study run: train_net.py was stopped by SIGTERM (SLURM job {os.environ['SLURM_JOB_ID']})")
            time.sleep(3600)
        if rc != 0:
            reason = last_error(env.paths.stderr, env.paths.stdout)
            raise RuntimeError(
                f"train_net.py exited with {rc} for {self.output_dir}" + (f": {reason}" if reason else "")
            )
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
    Preemption (SIGUSR2 sent `signal_delay_s` before the time limit, or on preemption) requeues
    without limit, as submitit does."""
    import submitit

    check_launcher(launcher)
    check_time_limit(params["timeout_min"])
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
        "signal_delay_s": signal_delay_s(params["timeout_min"]),  # time to stop before the limit
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


def slurm_states(folder: str, job_ids: Sequence[str]) -> Dict[str, Optional[str]]:
    """The SLURM state of each job (its first word: RUNNING, PENDING, COMPLETED, CANCELLED, ...), from
    one sacct call; None where sacct gives none (not yet known to it, or accounting unreachable)."""
    import submitit

    watcher = submitit.SlurmJob.watcher
    for job_id in job_ids:
        watcher.register_job(str(job_id))
    watcher.update()  # one sacct call for all; on failure it logs and keeps what it had
    states = {}
    for job_id in job_ids:
        state = watcher.get_state(str(job_id), mode="cache").split(" ")[0]
        states[job_id] = None if state in ("", "UNKNOWN") else state
    return states


def _failure(job, run_dir: str, state: Optional[str]) -> str:
    """Why a run's job ended without finishing it: the job's error (train_net.py's own error line
    where there is one) or its SLURM state, and the log to read."""
    reason = None
    try:
        job.result()
    except Exception as e:  # submitit re-raises the job's error, whose text holds its traceback
        reason = last_error_in(str(e))
    except BaseException:
        reason = None
    if reason is None:
        reason = f"the job ended ({state or 'no result'}) before the run finished"
    elif state and state != "FAILED":
        reason += f" (SLURM state {state})"
    return f"failed: {reason}; log: {job.paths.stdout}"


def last_error_in(text: str) -> Optional[str]:
    lines = [line.strip() for line in text.splitlines() if _ERROR_LINE.match(line.strip())]
    return lines[-1] if lines else None


# words of sbatch's refusal -> the option of tools/study.py that it is about
_SBATCH_OPTIONS = (
    (("partition",), "--partition {partition!r}"),
    (("gres", "gpu"), "--num-gpus {num_gpus} (GPUs per node; 0 for nodes without GPUs)"),
    (("account",), "--account {account!r}"),
    (("qos",), "--qos {qos!r}"),
    (("memory", "mem"), "--mem-gb {mem_gb}"),
    (("time",), "--time {timeout_min}"),
)


def _sbatch_refusal(error: Exception, params: Dict, run_dir: str, submitted: int) -> SubmissionError:
    """A clear error for a job the cluster refused at submission, naming the option."""
    text = str(error)
    reason = next(
        (line.strip() for line in text.splitlines() if "error" in line.lower() and "sbatch" in line.lower()),
        text.strip().splitlines()[-1] if text.strip() else type(error).__name__,
    )
    values = collections.defaultdict(lambda: None, params)
    option = next(
        (form.format_map(values) for words, form in _SBATCH_OPTIONS if any(w in text.lower() for w in words)),
        "--partition, --account, --qos, --constraint, --nodes, --num-gpus, --cpus-per-task or --mem-gb",
    )
    return SubmissionError(f"sbatch refused the job of {run_dir}: {reason}; check {option}", submitted)


def launch_study(
    folder: str,
    manifest: dict,
    launcher: str,
    params: Dict,
    parallel: int = 1,
    wait=True,
    log=print,
    relaunch_unknown=False,
):
    """Launches every unfinished run that has no job in flight, then (with wait) waits for every
    job, also those launched by an earlier command. Local: up to `parallel` jobs at a time. SLURM:
    a job is over when SLURM says it ended (a requeued job is still in flight, whatever an earlier
    attempt of it left behind); a run whose last job's state cannot be read is not launched again
    (unless relaunch_unknown), since that job may still be writing to its folder.
    Returns {output_dir: "finished" | "failed: ..." | "submitted" | "in flight" | "unknown: ..."}."""
    import submitit

    executor = make_executor(launcher, folder, params)
    status: Dict[str, str] = {}
    todo, jobs = [], []  # jobs: (run, job, slot) to wait for
    earlier = [run["jobs"][-1]["job_id"] for run in manifest["runs"] if run["jobs"] and launcher == "slurm"]
    states = slurm_states(folder, earlier) if earlier else {}
    for run in manifest["runs"]:
        run_dir = os.path.join(folder, run["output_dir"])
        last = run["jobs"][-1] if run["jobs"] else None
        if run_finished(run_dir):
            status[run["output_dir"]] = "finished"
        elif launcher == "slurm" and last and last["launcher"] == "slurm" and states.get(last["job_id"]) in SLURM_ALIVE:
            jobs.append((run, submitit.SlurmJob(os.path.join(folder, "submitit"), last["job_id"]), None))
            status[run["output_dir"]] = "in flight"
        elif launcher == "slurm" and last and last["launcher"] == "slurm" and states.get(last["job_id"]) is None:
            if relaunch_unknown:
                todo.append(run)
                continue
            status[run["output_dir"]] = (
                f"unknown: the state of its SLURM job {last['job_id']} cannot be read (sacct), so it is not "
                "launched again: that job may still be writing to its folder. When you know it has ended "
                "(squeue -j), run this command again with --relaunch-unknown"
            )
        else:
            todo.append(run)
    log(
        f"study {folder}: {len(manifest['runs'])} runs: {sum(v == 'finished' for v in status.values())} finished, "
        f"{len(jobs)} in flight, {len(todo)} to launch"
    )

    gpus = params["num_gpus"] if launcher == "local" and _has_cuda() else 0
    if gpus and parallel * gpus > _cuda_device_count():
        raise StudyError(
            f"--parallel {parallel} x --num-gpus {gpus}: {parallel * gpus} GPUs at once; this machine has "
            f"{_cuda_device_count()}"
        )
    free_slots = list(range(parallel))  # local: each running job has GPUs of its own
    submitted = 0
    try:
        while todo or jobs:
            while todo and (launcher == "slurm" or free_slots):
                run = todo.pop(0)
                run_dir = os.path.join(folder, run["output_dir"])
                os.makedirs(run_dir, exist_ok=True)
                slot = free_slots.pop(0) if launcher == "local" else None
                if gpus:
                    executor.update_parameters(visible_gpus=list(range(slot * gpus, (slot + 1) * gpus)))
                train = TrainRun(
                    manifest["train_net"], run["config"], run_dir, run["seed"], manifest["opts"], params["num_gpus"]
                )
                try:
                    job = executor.submit(train)
                except Exception as e:  # sbatch's refusal, as submitit's error
                    if launcher == "slurm":
                        raise _sbatch_refusal(e, params, run["output_dir"], submitted) from None
                    raise
                submitted += 1
                run["jobs"].append({"launcher": launcher, "job_id": str(job.job_id)})
                write_manifest(folder, manifest)
                log(f"  {run['output_dir']}: job {job.job_id} ({launcher})")
                jobs.append((run, job, slot))
            if launcher == "slurm" and not wait:
                for run, _, _ in jobs:
                    status.setdefault(run["output_dir"], "submitted")
                return status
            ended = []
            if launcher == "slurm":
                now = slurm_states(folder, [job.job_id for _, job, _ in jobs])
                for entry in jobs:
                    state = now.get(entry[1].job_id)
                    if state is not None and state not in SLURM_ALIVE:
                        ended.append((entry, state))
            else:
                ended = [(entry, None) for entry in jobs if entry[1].done()]
            for (run, job, slot), state in ended:
                jobs.remove((run, job, slot))
                if slot is not None:
                    free_slots.append(slot)
                run_dir = os.path.join(folder, run["output_dir"])
                status[run["output_dir"]] = "finished" if run_finished(run_dir) else _failure(job, run_dir, state)
                log(f"  {run['output_dir']}: {status[run['output_dir']]}")
            if not ended:
                time.sleep(POLL_S if launcher == "slurm" else 1.0)
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
