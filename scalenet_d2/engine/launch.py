"""Several training processes on a machine without CUDA (to run distributed code paths on CPUs).

Needed only because detectron2's `launch()` assumes CUDA: v0.6 initialises NCCL, and
`create_ddp_model` passes `device_ids=[local_rank]`, which DDP refuses for CPU modules.
Where CUDA is present, or for one process, `launch_any` is detectron2's `launch` unchanged.
"""

import contextlib
import os
import socket
from datetime import timedelta

import detectron2.utils.comm as comm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import launch

__all__ = ["launch_any", "slurm_threads"]


@contextlib.contextmanager
def _cpu_ddp():
    # detectron2's create_ddp_model passes device_ids=[local_rank], which DDP rejects for CPU
    # modules; None is the CPU form. Patched only inside CPU workers started below.
    import detectron2.engine.defaults as d2_defaults

    original = d2_defaults.create_ddp_model

    def create_cpu_ddp_model(model, **kwargs):
        kwargs.setdefault("device_ids", None)
        return original(model, **kwargs)

    d2_defaults.create_ddp_model = create_cpu_ddp_model
    try:
        yield
    finally:
        d2_defaults.create_ddp_model = original


def _cpu_worker(local_rank, main_func, world_size, num_per_machine, machine_rank, dist_url, args):
    rank = machine_rank * num_per_machine + local_rank
    dist.init_process_group(
        "gloo", init_method=dist_url, world_size=world_size, rank=rank, timeout=timedelta(minutes=30)
    )
    if hasattr(comm, "create_local_process_group"):  # detectron2 after v0.6
        comm.create_local_process_group(num_per_machine)
    else:  # v0.6: the same groups, set the way its launch() does
        for i in range(world_size // num_per_machine):
            group = dist.new_group(list(range(i * num_per_machine, (i + 1) * num_per_machine)))
            if i == machine_rank:
                comm._LOCAL_PROCESS_GROUP = group
    # No oversubscription, and never more threads than OMP_NUM_THREADS (or torch's default) gives.
    torch.set_num_threads(max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) // num_per_machine)))
    comm.synchronize()
    try:
        with _cpu_ddp():
            main_func(*args)
        comm.synchronize()  # no rank leaves while another still talks to the store rank 0 hosts
    finally:
        # torch's teardown of a live gloo group at interpreter exit can abort a process
        # ("terminate called without an active exception"), failing a run that succeeded
        dist.destroy_process_group()


def slurm_threads(environ, processes: int):
    """Torch threads per process for a SLURM job step that did not set OMP_NUM_THREADS: the CPUs
    SLURM gave the task (SLURM_CPUS_PER_TASK) shared among the processes `launch` starts there.
    None outside SLURM or where OMP_NUM_THREADS says: torch's own default (every core of the node,
    whatever SLURM gave the job) made two 1-CPU jobs on a 2-core node 6x slower."""
    cpus = environ.get("SLURM_CPUS_PER_TASK")
    if "OMP_NUM_THREADS" in environ or not cpus or not cpus.isdigit():
        return None
    return max(1, int(cpus) // max(1, processes))


def launch_any(main_func, args):
    """detectron2's launch(); on a machine without CUDA and with --num-gpus > 1, the same
    process layout over gloo (one process per "GPU"), since launch() needs CUDA there. In a SLURM
    job, each process gets its share of the task's CPUs as torch threads (`slurm_threads`)."""
    threads = slurm_threads(os.environ, max(1, args.num_gpus))
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)  # for the processes launch starts, which read it
        torch.set_num_threads(threads)
    world_size = args.num_gpus * args.num_machines
    if world_size <= 1 or torch.cuda.is_available():
        return launch(
            main_func,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
        )
    dist_url = args.dist_url
    if dist_url == "auto":
        assert args.num_machines == 1, "--dist-url auto works on one machine only"
        with socket.socket() as s:
            s.bind(("", 0))
            dist_url = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    mp.spawn(
        _cpu_worker,
        nprocs=args.num_gpus,
        args=(main_func, world_size, args.num_gpus, args.machine_rank, dist_url, (args,)),
        daemon=False,
    )
