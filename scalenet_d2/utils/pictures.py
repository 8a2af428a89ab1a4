"""Pictures of runs: training-loss curves, the AP comparison, and detections drawn with
detectron2's Visualizer (tools/run_demo.py, tools/draw_detections.py). Every PNG is written
atomically and never over an existing file."""

import io
import json
import os
from typing import Dict, List, Sequence

import numpy as np

from ..atomic import bytes_writer, write_atomically
from .comparison import AP_KEYS

__all__ = [
    "PictureError",
    "loss_history",
    "plot_loss_curves",
    "plot_ap_comparison",
    "plot_arm_spread",
    "load_predictor",
    "draw_predictions",
    "draw_ground_truth",
    "side_by_side",
    "save_png",
    "image_png",
    "image_paths",
    "read_rgb",
    "IMAGE_EXTENSIONS",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class PictureError(ValueError):
    """Bad input to a picture: names the file and what was expected."""


def _figure():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    return plt


def save_png(path: str, data: bytes) -> str:
    if os.path.exists(path):
        raise PictureError(f"{path} exists: choose another output folder (pictures never replace files)")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomically({path: bytes_writer(data)})
    return path


def image_png(image_rgb: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image_rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def _figure_png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    _figure().close(fig)
    return buffer.getvalue()


def loss_history(run_dir: str, key: str = "total_loss") -> List[tuple]:
    """(iteration, value) of `key` in the run's metrics.json, in order, one per iteration."""
    path = os.path.join(run_dir, "metrics.json")
    if not os.path.isfile(path):
        raise PictureError(f"{path}: no such file; expected the metrics.json of a finished training run")
    points = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise PictureError(f"{path}, line {number}: not JSON ({e})") from None
            if key in record and "iteration" in record:
                points[record["iteration"]] = record[key]
    if not points:
        raise PictureError(f"{path}: no '{key}' values; expected the metrics of a training run")
    return sorted(points.items())


def plot_loss_curves(run_dirs: Sequence[str], names: Sequence[str], path: str, key: str = "total_loss") -> str:
    """One plot, one curve per run (detectron2's logged median over its window), log scale."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 4))
    for run_dir, name in zip(run_dirs, names):
        iterations, values = zip(*loss_history(run_dir, key))
        ax.plot(np.array(iterations) + 1, values, label=name, linewidth=1.5)
    ax.set_xlabel("iteration")
    ax.set_ylabel(key)
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title("Training loss")
    return save_png(path, _figure_png(fig))


def plot_ap_comparison(runs: Sequence[Dict], names: Sequence[str], path: str) -> str:
    """Grouped bars of box AP, AP50, AP75, APs, APm, APl (COCO, %) per run, values printed on top."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(runs)
    positions = np.arange(len(AP_KEYS))
    for i, (run, name) in enumerate(zip(runs, names)):
        values = [run["box"].get(key, float("nan")) for key in AP_KEYS]
        bars = ax.bar(positions + (i - (len(runs) - 1) / 2) * width, values, width, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(positions, AP_KEYS)
    ax.set_ylabel("box AP (%)")
    ax.set_ylim(0, 105)
    ax.legend()
    ax.set_title("COCO box AP on the test set")
    return save_png(path, _figure_png(fig))


def plot_arm_spread(arms: Dict[str, List[Dict]], path: str, key: str = "AP") -> str:
    """Box `key` per arm: each run a point, the arm's mean with its 95% interval (Student's t)."""
    from .statistics import finite_values, summarize, t_interval

    plt = _figure()
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(arms), 4))
    for position, (name, runs) in enumerate(arms.items()):
        values, non_finite = finite_values([r["box"].get(key) for r in runs])
        if not values:
            raise PictureError(
                f"arm {name}: no run has a finite box {key} (eval_results.json; {non_finite} not finite); "
                "expected evaluated runs"
            )
        ax.scatter([position] * len(values), values, s=24, alpha=0.7, zorder=3, label="runs" if position == 0 else None)
        summary = summarize(values)
        if summary.n > 1:
            low, high = t_interval(summary)
            ax.errorbar(
                position + 0.15,
                summary.mean,
                yerr=[[summary.mean - low], [high - summary.mean]],
                fmt="o",
                color="black",
                capsize=5,
                zorder=4,
                label="mean, 95% interval" if position == 0 else None,
            )
        else:
            ax.plot(position + 0.15, summary.mean, "o", color="black", zorder=4)
        ax.annotate(f"{summary.mean:.2f} (n={summary.n})", (position + 0.22, summary.mean), fontsize=8, va="center")
    ax.set_xticks(range(len(arms)), list(arms))
    ax.set_xlim(-0.5, len(arms) - 0.2)
    ax.set_ylabel(f"box {key} (%)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(f"COCO box {key} per run and arm")
    return save_png(path, _figure_png(fig))


def load_predictor(config_file: str, weights: str, opts: Sequence[str] = ()):
    """detectron2's DefaultPredictor for a config (yaml) and weights, the weights loaded by the
    strict ScaleNetCheckpointer (DefaultPredictor's own load only warns about what does not fit)."""
    from detectron2.config import get_cfg
    from detectron2.engine import DefaultPredictor

    from .. import add_scalenet_config
    from ..checkpoint import ScaleNetCheckpointer

    if not os.path.isfile(config_file):
        raise PictureError(f"{config_file}: no such config file; expected a yaml config (configs/...)")
    if not os.path.isfile(weights):
        raise PictureError(f"{weights}: no such weights file; expected a trained model (.pth or .pkl)")
    cfg = get_cfg()
    add_scalenet_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    cfg.MODEL.WEIGHTS = ""
    predictor = DefaultPredictor(cfg)
    ScaleNetCheckpointer(
        predictor.model, allow_partial=cfg.MODEL.SCALENET.ALLOW_PARTIAL_WEIGHTS, save_dir=os.path.dirname(weights)
    ).load(weights)
    return predictor


def _metadata(cfg):
    from detectron2.data import MetadataCatalog  # registers COCO and the other built-in datasets

    from .. import data  # noqa: F401  registers the synthetic splits

    return MetadataCatalog.get(cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "__unused")


def read_rgb(path: str) -> np.ndarray:
    from detectron2.data.detection_utils import read_image

    try:
        return read_image(path, format="RGB")
    except Exception as e:  # PIL's own errors do not say which file
        raise PictureError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None


def draw_predictions(predictor, image_rgb: np.ndarray, score_threshold: float = 0.5) -> np.ndarray:
    """The predictor's detections above `score_threshold` drawn on the image (RGB in, RGB out)."""
    from detectron2.utils.visualizer import Visualizer

    instances = predictor(image_rgb[:, :, ::-1].copy())["instances"].to("cpu")  # the predictor takes BGR
    instances = instances[instances.scores >= score_threshold]
    return (
        Visualizer(image_rgb, _metadata(predictor.cfg), scale=_scale(image_rgb))
        .draw_instance_predictions(instances)
        .get_image()
    )


def draw_ground_truth(dataset_dict: Dict, metadata) -> np.ndarray:
    from detectron2.utils.visualizer import Visualizer

    image = read_rgb(dataset_dict["file_name"])
    return Visualizer(image, metadata, scale=_scale(image)).draw_dataset_dict(dataset_dict).get_image()


def _scale(image: np.ndarray, short_side: int = 480) -> float:
    """Small images are drawn enlarged, so that labels do not hide the objects."""
    return max(1.0, short_side / min(image.shape[:2]))


def side_by_side(rows: Sequence[Sequence[np.ndarray]], titles: Sequence[str], path: str) -> str:
    """A grid PNG: one row per image, one titled column per source (ground truth, each model)."""
    plt = _figure()
    n_rows, n_cols = len(rows), len(titles)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(3.2 * n_cols, 3.2 * n_rows), squeeze=False)
    for r, row in enumerate(rows):
        for c, picture in enumerate(row):
            axes[r][c].imshow(picture)
            axes[r][c].axis("off")
            if r == 0:
                axes[r][c].set_title(titles[c])
    fig.tight_layout()
    return save_png(path, _figure_png(fig))


def image_paths(inputs: Sequence[str]) -> List[str]:
    """Image files named, or found (sorted, not recursively) in folders named."""
    found = []
    for item in inputs:
        if os.path.isdir(item):
            found += sorted(
                os.path.join(item, name) for name in os.listdir(item) if name.lower().endswith(IMAGE_EXTENSIONS)
            )
        elif os.path.isfile(item):
            found.append(item)
        else:
            raise PictureError(f"{item}: no such image file or folder")
    if not found:
        raise PictureError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {list(inputs)}")
    return found
