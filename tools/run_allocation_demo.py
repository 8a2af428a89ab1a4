#!/usr/bin/env python
"""Detection-aware neuron allocation end to end on the built-in synthetic set, on a CPU.

    python tools/run_allocation_demo.py           # the demo (about 15-20 min on 2 cores)
    python tools/run_allocation_demo.py --quick   # smoke run: a few iterations on the tiny split

1. trains the over-complete seed of scalenet_tiny as a detector, with the L1 penalty on its SA
   norms' scales (configs/Synthetic/faster_rcnn_Sseed_FPN.yaml): OUTPUT/seed;
2. allocates its neurons at the FLOPs of scalenet_tiny (tools/allocate.py): the detection
   allocation, OUTPUT/detection_allocation.json, its inherited weights, and
   OUTPUT/allocations.png, the detection allocation beside scalenet_tiny's;
3. trains the three arms at the same FLOPs from scratch, with the same schedule and seeds, so
   that only the backbone differs (tools/study.py): the detection allocation, the ImageNet
   allocation (scalenet_tiny) and the ResNet twin: OUTPUT/study/comparison.md;
4. fine-tunes the detection allocation from its inherited weights with the same schedule,
   reported apart (it has had the seed's training too): OUTPUT/finetuned.

OUTPUT is output/demo_allocation (output/demo_allocation_quick with --quick), or -2, -3, ...;
OUTPUT/summary.md holds the tables. Overrides after the options apply to every training run.
"""

import argparse
import os
import re
import sys

from scalenet_d2.atomic import bytes_writer, write_atomically
from scalenet_d2.data.synthetic import ensure_split
from scalenet_d2.engine.run_record import load_run
from scalenet_d2.modeling.allocation import load_allocation
from scalenet_d2.neuron_allocation.pruning import count_flops
from scalenet_d2.utils.comparison import render
from scalenet_d2.utils.demo_runs import fresh_output_dir, run_logged, run_train_net

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNTHETIC = os.path.join(REPO_ROOT, "configs", "Synthetic")
ITERS = 500  # per arm and for the seed: the demo's recipe, shortened to fit 20 minutes on 2 cores
SCHEDULE = ["SOLVER.MAX_ITER", str(ITERS), "SOLVER.STEPS", f"({int(ITERS * 0.75)}, {int(ITERS * 0.94)})"]
QUICK = [
    "DATASETS.TRAIN",
    '("synthetic_shapes_tiny_train",)',
    "DATASETS.TEST",
    '("synthetic_shapes_tiny_val",)',
    "SOLVER.MAX_ITER",
    "16",  # fewer leave some arm without a detection, hence without an AP
    "SOLVER.WARMUP_ITERS",
    "2",
    "SOLVER.STEPS",
    "()",
    "SOLVER.IMS_PER_BATCH",
    "2",
    "SOLVER.CHECKPOINT_PERIOD",
    "8",
]
ARMS = ("detection_allocation", "imagenet_allocation", "resnet_twin")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", help="a new folder (default: output/demo_allocation[_quick], or -2, -3, ...)")
    parser.add_argument("--quick", action="store_true", help="a few iterations on the tiny split (smoke test)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="training seeds of every arm")
    parser.add_argument("--parallel", type=int, default=2, help="arm runs at a time")
    parser.add_argument(
        "--seed-processes", type=int, default=1, help="processes (gloo on a CPU) that train the seed detector"
    )
    parser.add_argument("--threads", type=int, default=1, help="PyTorch CPU threads per run")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for every training run")
    args = parser.parse_args(argv)
    if args.output_dir and os.path.exists(args.output_dir):
        parser.error(f"--output-dir {args.output_dir} exists: a run never replaces another's results")
    out = args.output_dir or fresh_output_dir(
        os.path.join(REPO_ROOT, "output", "demo_allocation_quick" if args.quick else "demo_allocation")
    )
    os.makedirs(out)
    print(f"output: {out}", flush=True)
    splits = (
        ("synthetic_shapes_tiny_train", "synthetic_shapes_tiny_val")
        if args.quick
        else ("synthetic_shapes_train", "synthetic_shapes_val")
    )
    for split in splits:  # generated on first use, then cached
        ensure_split(split)
    opts = (QUICK if args.quick else SCHEDULE) + list(args.opts)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    python = sys.executable

    # 1. the seed detector
    seed_dir = os.path.join(out, "seed")
    # a free port: detectron2's default one is the same for every run of this user on the machine
    launch = ["--num-gpus", str(args.seed_processes), "--dist-url", "auto"] if args.seed_processes > 1 else []
    seed_opts = ["MODEL.SCALENET.NORM", "naiveSyncBN"] if args.seed_processes > 1 else []
    config = os.path.join(SYNTHETIC, "faster_rcnn_Sseed_FPN.yaml")
    run_train_net("seed", config, seed_dir, opts + seed_opts, env, REPO_ROOT, launch_args=launch)

    # 2. its allocation at the FLOPs of scalenet_tiny (224x224, as ImageNet allocations are counted)
    allocation = os.path.join(out, "detection_allocation.json")
    init, chart = os.path.join(out, "detection_allocation_init.pth"), os.path.join(out, "allocations.png")
    target = count_flops(load_allocation("scalenet_tiny"), 224, 1000) / 1e9
    cmd = [python, os.path.join(REPO_ROOT, "tools", "allocate.py"), os.path.join(seed_dir, "model_final.pth")]
    cmd += ["--target-gflops", repr(target), "--output", allocation, "--inherit-weights", init]
    cmd += ["--chart", chart, "--chart-beside", "scalenet_tiny"]
    run_logged("allocate", cmd, os.path.join(out, "allocate.log"), env, REPO_ROOT, show=re.compile(""))

    # 3. the three arms at the same FLOPs: same recipe, schedule, seeds and start (from scratch)
    det_config = os.path.join(out, "faster_rcnn_Sdet_FPN.yaml")
    text = f'_BASE_: "{os.path.join(SYNTHETIC, "faster_rcnn_Stiny_FPN.yaml")}"\nMODEL:\n  SCALENET:\n'
    text += f'    ALLOCATION: "{allocation}"\n'
    write_atomically({det_config: bytes_writer(text.encode())})
    configs = [det_config] + [
        os.path.join(SYNTHETIC, f) for f in ("faster_rcnn_Stiny_FPN.yaml", "faster_rcnn_Rtiny_FPN.yaml")
    ]
    study = os.path.join(out, "study")
    cmd = [python, os.path.join(REPO_ROOT, "tools", "study.py"), "--output-dir", study, "--configs", *configs]
    cmd += ["--names", *ARMS, "--seeds", *map(str, args.seeds), "--parallel", str(args.parallel), "--", *opts]
    run_logged("study", cmd, os.path.join(out, "study.log"), env, REPO_ROOT)

    # 4. the detection allocation from its inherited weights: the seed's iterations plus these
    finetuned = os.path.join(out, "finetuned")
    run_train_net(
        "finetuned", det_config, finetuned, opts + ["MODEL.WEIGHTS", init, "SEED", str(args.seeds[0])], env, REPO_ROOT
    )

    seed_iters, tuned_iters = (load_run(d)["cfg"]["SOLVER.MAX_ITER"] for d in (seed_dir, finetuned))
    tuned = load_run(finetuned)
    with open(os.path.join(study, "comparison.md")) as f:
        table = f.read()
    apart = render(
        [tuned], [f"detection_allocation fine-tuned ({seed_iters + tuned_iters} iterations in all)"], markdown=True
    )
    summary = (
        f"# Detection-aware allocation on the synthetic shapes\n\nThree arms at the FLOPs of scalenet_tiny "
        f"({target:.4f} G at 224x224), trained from scratch with one schedule, seeds {args.seeds}:\n\n{table}\n"
        f"Reported apart (seed detector {seed_iters} iterations, then {tuned_iters} from its "
        f"inherited weights, seed {args.seeds[0]}):\n\n{apart}\n\nAllocations: {chart}\n"
    )
    write_atomically({os.path.join(out, "summary.md"): bytes_writer(summary.encode())})
    print("\n" + summary)
    print(f"(written to {os.path.join(out, 'summary.md')})")


if __name__ == "__main__":
    main()
