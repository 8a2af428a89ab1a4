#!/usr/bin/env python
"""Run a study: each config (a ScaleNet config and its ResNet twin, or any list) once per seed,
each run in its own OUTPUT_DIR under --output-dir, then the statistics of tools/compare.py.

    # on this machine, two runs at a time (the built-in synthetic pair, 2 seeds)
    python tools/study.py --output-dir output/study_tiny --parallel 2 --seeds 1 2 \\
        --configs configs/Synthetic/faster_rcnn_Stiny_FPN.yaml configs/Synthetic/faster_rcnn_Rtiny_FPN.yaml \
        -- SOLVER.MAX_ITER 400
    # on SLURM: one job of 8 GPUs per run, 24 h, requeued on preemption or timeout
    python tools/study.py --launcher slurm --partition PART --num-gpus 8 --time 1440 --seeds 1 2 3 \\
        --output-dir output/study_S50_R50 --configs configs/COCO-Detection/faster_rcnn_S50_FPN_1x.yaml \\
        configs/COCO-Detection/faster_rcnn_R50_FPN_1x.yaml
    # later, or after an interruption: continues unfinished runs, then writes the statistics
    python tools/study.py --output-dir output/study_S50_R50 [--launcher slurm ...]

KEY VALUE pairs after `--` are config overrides for every run (not SEED or OUTPUT_DIR, which
the study sets). Finished runs are never launched again; unfinished ones continue with --resume.
When every run has finished: OUTPUT/comparison.md and OUTPUT/ap_spread.png. Layout, manifest
and the submitit parameters: scalenet_d2/engine/study.py and docs/training.md. On SLURM the command waits
for every job (also those an earlier command launched) unless --no-wait.
"""

import argparse
import os
import shutil
import sys

from scalenet_d2.engine.run_record import RunRecordError
from scalenet_d2.engine.study import (
    MANIFEST,
    StudyError,
    SubmissionError,
    check_launcher,
    check_same_study,
    check_time_limit,
    launch_study,
    load_manifest,
    plan_study,
    write_manifest,
    write_statistics,
)
from scalenet_d2.utils.comparison import ComparisonError
from scalenet_d2.utils.pictures import PictureError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True, help="the study folder (continued if it holds a study)")
    parser.add_argument("--configs", nargs="+", default=[], metavar="CONFIG", help="config files, one arm each")
    parser.add_argument("--names", nargs="+", help="arm names (default: the config file names)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[], help="SEED of each run, the same in every arm")
    parser.add_argument("--launcher", choices=("local", "slurm"), default="local")
    parser.add_argument("--parallel", type=int, default=1, help="local: runs at a time (default 1)")
    parser.add_argument("--num-gpus", type=int, default=1, help="GPUs per node of each run (train_net --num-gpus)")
    parser.add_argument("--nodes", type=int, default=1, help="slurm: nodes per run")
    parser.add_argument("--time", type=int, default=72 * 60, help="minutes per job before it is requeued")
    parser.add_argument("--cpus-per-task", type=int, default=10, help="slurm: CPUs per node of each run")
    parser.add_argument("--mem-gb", type=int, help="slurm: memory per node")
    parser.add_argument("--partition", help="slurm partition")
    parser.add_argument("--account", help="slurm account")
    parser.add_argument("--qos", help="slurm QOS")
    parser.add_argument("--constraint", help="slurm constraint")
    parser.add_argument("--max-requeues", type=int, default=3, help="requeues after timeouts (preemption: any)")
    parser.add_argument("--no-wait", action="store_true", help="slurm: submit and return (default: wait for every job)")
    parser.add_argument(
        "--relaunch-unknown",
        action="store_true",
        help="slurm: launch again runs whose last job's state sacct cannot give (once you know it has ended)",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for every run")
    args = parser.parse_args(argv)
    if args.opts[:1] == ["--"]:
        args.opts = args.opts[1:]
    if args.launcher == "local" and args.nodes != 1:
        parser.error("--nodes: the local launcher runs on this machine; expected 1")
    if args.parallel < 1:
        parser.error(f"--parallel {args.parallel}: expected at least 1")

    folder = os.path.abspath(args.output_dir)
    created = False
    try:
        check_launcher(args.launcher)  # before a new study's folder is made
        check_time_limit(args.time)
        if os.path.isfile(os.path.join(folder, MANIFEST)):
            manifest = load_manifest(folder)
            if args.configs or args.seeds or args.opts or args.names:
                requested = plan_study(
                    os.path.join(REPO_ROOT, "train_net.py"), args.configs, args.seeds, args.opts, args.names
                )
                check_same_study(manifest, requested, folder)
            print(f"continuing the study in {folder}")
        else:
            if os.path.isdir(folder) and os.listdir(folder):
                parser.error(f"--output-dir {folder}: holds files but no {MANIFEST}; expected a new folder or a study")
            if not args.configs or not args.seeds:
                parser.error(f"--output-dir {folder} holds no study: a new study needs --configs and --seeds")
            manifest = plan_study(
                os.path.join(REPO_ROOT, "train_net.py"), args.configs, args.seeds, args.opts, args.names
            )
            created = not os.path.isdir(folder)
            os.makedirs(folder, exist_ok=True)
            write_manifest(folder, manifest)
            print(f"new study in {folder}: {len(manifest['runs'])} runs")
        params = {
            "num_gpus": args.num_gpus,
            "nodes": args.nodes,
            "timeout_min": args.time,
            "cpus_per_task": args.cpus_per_task,
            "mem_gb": args.mem_gb,
            "partition": args.partition,
            "account": args.account,
            "qos": args.qos,
            "constraint": args.constraint,
            "max_num_timeout": args.max_requeues,
        }
        try:
            status = launch_study(
                folder,
                manifest,
                args.launcher,
                params,
                args.parallel,
                wait=not args.no_wait,
                relaunch_unknown=args.relaunch_unknown,
            )
        except SubmissionError as e:
            if e.submitted == 0 and created:  # nothing of a study exists: the next command starts afresh
                shutil.rmtree(folder)
            raise
        unfinished = {d: s for d, s in status.items() if s != "finished"}
        if unfinished:
            print(f"\n{len(unfinished)} of {len(status)} runs not finished:")
            for d, s in unfinished.items():
                print(f"  {d}: {s}")
            print(f"run this command again to continue them: python {' '.join(sys.argv)}")
            return 1 if any(s.startswith(("failed", "unknown")) for s in unfinished.values()) else 0
        print()
        text, written = write_statistics(folder, manifest)
        print(text)
        print(f"\nWrote {' and '.join(written)}" if written else f"\n(comparison.md and ap_spread.png in {folder})")
        return 0
    except (StudyError, RunRecordError, ComparisonError, PictureError) as e:
        parser.exit(2, f"study.py: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
