"""Run records: what train_net.py leaves in OUTPUT_DIR besides detectron2's own files, and
what tools/compare.py reads back.

    eval_results.json  {"datasets": [...], "evaluation": {weights, datasets, images, test_size, machine},
                        "results": {dataset or task: {"bbox": {AP, AP50, ...}}}}
    run_info.json      config, backbone params and FLOPs, train s/iter, inference s/image,
                       peak memory, the machine; the "train_*" fields are those of the
                       training run, "eval_*" those of the last --eval-only run

Both are written atomically (a reader never sees half a file), run_info.json last: a run with a
run_info.json that records training has its final eval_results.json too.
"""

import json
import os
import statistics

import detectron2
import detectron2.utils.comm as comm
import torch
import yaml

from ..atomic import bytes_writer, write_atomically
from ..utils.profiling import FLOPS_NOTE, backbone_stats, machine_description, peak_memory

__all__ = [
    "RUN_INFO",
    "EVAL_RESULTS",
    "RunRecordError",
    "write_run_record",
    "load_run",
    "train_seconds_per_iter",
    "backbone_arch",
]

RUN_INFO = "run_info.json"
EVAL_RESULTS = "eval_results.json"


class RunRecordError(ValueError):
    """A folder that is not a readable run; the message names the file and what was expected."""


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode("utf-8")


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise RunRecordError(f"{path}: not valid JSON ({e}); expected a run record written by train_net.py") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RunRecordError(f"{path}: cannot be read ({e})") from None


def write_run_record(cfg, args, model, results, training, inference=(None, 0)):
    """eval_results.json and run_info.json in OUTPUT_DIR (call on the main process only).

    `inference`: (seconds per image, images timed) of the evaluation, if one ran.
    """
    out = cfg.OUTPUT_DIR
    info_path = os.path.join(out, RUN_INFO)
    # --eval-only into a training folder keeps the training fields
    info = _read_json(info_path) if os.path.isfile(info_path) else {}
    mem, mem_kind = peak_memory()  # before the FLOP count below runs the backbone again
    size = cfg.INPUT.MIN_SIZE_TEST
    prefix = "train" if training else "eval"
    info.update(
        {
            "meta_architecture": cfg.MODEL.META_ARCHITECTURE,
            "backbone": cfg.MODEL.BACKBONE.NAME,
            "backbone_arch": backbone_arch(cfg),
            "torch": torch.__version__,
            "detectron2": detectron2.__version__,
            "flops_note": FLOPS_NOTE,
            f"{prefix}_config_file": os.path.abspath(args.config_file),
            f"{prefix}_opts": list(args.opts),
            f"{prefix}_machine": machine_description(),
            f"{prefix}_weights": cfg.MODEL.WEIGHTS,
            f"{prefix}_num_processes": comm.get_world_size(),
            f"{prefix}_peak_memory_mb": mem,
            f"{prefix}_peak_memory_kind": mem_kind,
            "inference_s_per_image": inference[0],
            "inference_images_timed": inference[1],
        }
    )
    info.update(backbone_stats(model, [(224, 224), (size, size)]))
    if training:
        s_iter, windows = train_seconds_per_iter(out)
        info.update(
            {
                "train_s_per_iter": s_iter,
                "train_logged_windows": windows,
                "ims_per_batch": cfg.SOLVER.IMS_PER_BATCH,
                "max_iter": cfg.SOLVER.MAX_ITER,
            }
        )
    writers = {}
    if results is not None:
        evaluation = evaluation_record(cfg, training)
        writers[os.path.join(out, EVAL_RESULTS)] = bytes_writer(
            _json_bytes({"datasets": list(cfg.DATASETS.TEST), "evaluation": evaluation, "results": results})
        )
    writers[info_path] = bytes_writer(_json_bytes(info))  # renamed last: it marks the run finished
    write_atomically(writers)


def evaluation_record(cfg, training):
    """What an evaluation evaluated, for tools/compare.py to refuse results that are not alike:
    the weights (a training run's own final model "model_final.pth", or --eval-only's MODEL.WEIGHTS,
    relative to OUTPUT_DIR where it is in it), the test sets
    and their image counts, the test resize and the machine."""
    from detectron2.data import DatasetCatalog

    weights = "model_final.pth" if training else cfg.MODEL.WEIGHTS
    if not training and weights and "://" not in weights:
        # relative to the run's folder where it is inside it, so that the folder can move
        out, weights = os.path.realpath(cfg.OUTPUT_DIR), os.path.realpath(weights)
        if os.path.dirname(weights) == out:
            weights = os.path.basename(weights)
    return {
        "weights": weights,
        "datasets": list(cfg.DATASETS.TEST),
        "images": {name: len(DatasetCatalog.get(name)) for name in cfg.DATASETS.TEST},
        "test_size": f"{cfg.INPUT.MIN_SIZE_TEST}/{cfg.INPUT.MAX_SIZE_TEST}",
        "machine": machine_description(),
    }


def train_seconds_per_iter(output_dir):
    """Median of detectron2's per-iteration 'time' in metrics.json (first logged window dropped)."""
    path = os.path.join(output_dir, "metrics.json")
    times = []
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError as e:
                    raise RunRecordError(
                        f"{path}: line {number} is not valid JSON ({e}); expected detectron2's metrics"
                    ) from None
                if isinstance(entry, dict) and "time" in entry:
                    times.append(entry["time"])
    if len(times) > 1:
        times = times[1:]
    return (statistics.median(times) if times else None), len(times)


def backbone_arch(cfg):
    alloc = os.path.splitext(os.path.basename(cfg.MODEL.SCALENET.ALLOCATION))[0]
    if "scalenet" in cfg.MODEL.BACKBONE.NAME:
        return f"ScaleNet ({alloc})"
    if "resnet_twin" in cfg.MODEL.BACKBONE.NAME:
        return f"ResNet twin of {alloc}"
    if "resnet" in cfg.MODEL.BACKBONE.NAME:
        r = cfg.MODEL.RESNETS
        return f"ResNet-{r.DEPTH} (stem {r.STEM_OUT_CHANNELS}, res2 {r.RES2_OUT_CHANNELS})"
    return cfg.MODEL.BACKBONE.NAME


def _task_metrics(results, task="bbox"):
    """The metrics of `task` (bbox, segm) on the first test set; eval_results.json holds one set
    or several."""
    if task in results:
        return results[task]
    for value in results.values():
        if isinstance(value, dict) and task in value:
            return value[task]
    return {}


def load_run(run_dir):
    """Everything a comparison table needs from one OUTPUT_DIR, as a dict."""
    if not os.path.isdir(run_dir):
        raise RunRecordError(f"{run_dir}: not a directory (expected a train_net.py OUTPUT_DIR)")
    info_path = os.path.join(run_dir, RUN_INFO)
    eval_path = os.path.join(run_dir, EVAL_RESULTS)
    if not os.path.isfile(info_path) and not os.path.isfile(eval_path):
        raise RunRecordError(
            f"{run_dir}: has neither {RUN_INFO} nor {EVAL_RESULTS}; "
            "is it an OUTPUT_DIR of train_net.py (written when a run or --eval-only finishes)?"
        )
    info = _read_json(info_path) if os.path.isfile(info_path) else {}
    evals = _read_json(eval_path) if os.path.isfile(eval_path) else {}
    for path, value in ((info_path, info), (eval_path, evals)):
        if not isinstance(value, dict):
            raise RunRecordError(
                f"{path}: holds {type(value).__name__}; expected a JSON object written by train_net.py"
            )
    results = evals.get("results", {})
    if not isinstance(results, dict):
        raise RunRecordError(f'{eval_path}: "results" is {type(results).__name__}; expected an object of metrics')
    # the training run's fields where there was one, else those of --eval-only
    kind = "train" if "train_machine" in info else "eval"
    config = _read_config(run_dir)
    return {
        "dir": run_dir,
        "config": os.path.basename(info.get(f"{kind}_config_file", "")) or "?",
        "backbone": info.get("backbone_arch") or info.get("backbone", "?"),
        "box": _task_metrics(results, "bbox"),
        "mask": _task_metrics(results, "segm"),  # Mask R-CNN; empty for box-only detectors
        "datasets": evals.get("datasets", []),
        "evaluation": evals.get("evaluation"),  # None for records written before it was kept
        "params": info.get("backbone_params"),
        "flops": info.get("backbone_flops", {}),
        "train_s_per_iter": info.get("train_s_per_iter") or train_seconds_per_iter(run_dir)[0],
        "ims_per_batch": info.get("ims_per_batch"),
        "num_processes": info.get("train_num_processes"),
        "inference_s_per_image": info.get("inference_s_per_image"),
        "peak_memory_mb": info.get(f"{kind}_peak_memory_mb"),
        "peak_memory_kind": info.get(f"{kind}_peak_memory_kind"),
        "machine": info.get(f"{kind}_machine", "?"),
        # detectron2's merged config of the run (its config.yaml), flattened: "MODEL.WEIGHTS" -> value
        "cfg": config,
        "seed": config.get("SEED") if config is not None else None,
    }


def _read_config(run_dir):
    """The run's config.yaml (written by detectron2's default_setup), flattened; None where absent."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as e:
        raise RunRecordError(f"{path}: cannot be read as YAML ({e}); expected the config.yaml of a run") from None
    if not isinstance(data, dict):
        raise RunRecordError(f"{path}: holds {type(data).__name__}; expected detectron2's config (a mapping)")
    flat = {}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value

    walk(data, "")
    return flat
