"""The configs of this project from the installed package, as `detectron2.model_zoo` gives
detectron2's: `get_config_file("COCO-Detection/faster_rcnn_S50_FPN_1x.yaml")`, `get_config(...)`."""

from .model_zoo import get_config, get_config_file

__all__ = ["get_config_file", "get_config"]
