#!/usr/bin/env python
"""Train and evaluate detectors with ScaleNet or ResNet backbones, one recipe for both.

A detectron2 project entry point (like detectron2's tools/train_net.py):

    # 8 GPUs, one machine
    python train_net.py --config-file configs/COCO-Detection/faster_rcnn_S50_FPN_1x.yaml --num-gpus 8
    # evaluate a checkpoint
    python train_net.py --config-file configs/COCO-Detection/faster_rcnn_S50_FPN_1x.yaml \
        --eval-only MODEL.WEIGHTS output/model_final.pth
    # continue an interrupted run from OUTPUT_DIR/last_checkpoint
    python train_net.py --config-file ... --resume

Besides detectron2's usual outputs (checkpoints, last_checkpoint, metrics.json, TensorBoard
events, log.txt) each run writes to OUTPUT_DIR:
  eval_results.json  the final COCO metrics (AP, AP50, AP75, APs, APm, APl per dataset)
  run_info.json      config, backbone params and FLOPs, train s/iter, inference s/image,
                     peak memory and the machine; tools/compare.py tabulates these.
"""

import sys

import detectron2.utils.comm as comm
from detectron2.engine import default_argument_parser
from detectron2.evaluation import verify_results

from scalenet_d2.checkpoint import CheckpointMismatchError, ScaleNetCheckpointer
from scalenet_d2.data.resumable import DatasetError
from scalenet_d2.engine import (
    OutputDirGuard,
    OutputDirLock,
    StartupError,
    Trainer,
    TrainingDivergedError,
    build_config,
    check_inputs,
    check_output_dir,
    evaluate,
    launch_any,
    setup,
)
from scalenet_d2.engine.run_record import write_run_record


def main(args):
    cfg = build_config(args)
    guard = OutputDirGuard(cfg.OUTPUT_DIR)
    try:  # until the work starts, a failure leaves OUTPUT_DIR as it was
        cfg = setup(args)
        if args.eval_only:
            model = Trainer.build_model(cfg)
            ScaleNetCheckpointer(
                model, save_dir=cfg.OUTPUT_DIR, allow_partial=cfg.MODEL.SCALENET.ALLOW_PARTIAL_WEIGHTS
            ).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        else:
            trainer = Trainer(cfg)
            trainer.resume_or_load(resume=args.resume)
    except BaseException:
        guard.restore()
        raise

    if args.eval_only:
        if "config.yaml" in guard.saved:  # the config of the run that trained these weights stays
            guard.restore(files=("config.yaml",))
        results, inference = evaluate(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, results)
            write_run_record(cfg, args, model, results, training=False, inference=inference)
        return results

    trainer.train()
    if comm.is_main_process():
        write_run_record(cfg, args, trainer.model, trainer.results, training=True, inference=trainer.inference)
    return trainer.results


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    lock = None
    try:
        # Checked once here, before any worker starts, so a missing file is one clear message.
        cfg = build_config(args, announce=True)
        check_output_dir(cfg, args)
        check_inputs(cfg, args)
        if args.machine_rank == 0:  # the first machine's launcher holds OUTPUT_DIR for the whole run
            lock = OutputDirLock(cfg.OUTPUT_DIR).acquire()
    except StartupError as e:
        sys.exit(f"train_net.py: error: {e}")
    try:
        launch_any(main, args)
    except (CheckpointMismatchError, TrainingDivergedError, DatasetError) as e:
        sys.exit(f"train_net.py: error: {e}")
    finally:
        if lock is not None:
            lock.release()
