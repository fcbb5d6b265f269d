"""Full-resolution prediction over folders of drone photos, and its flood outputs.

Modules, from the model outward:

* :mod:`~segcore.predict.tiles`: sliding-window inference, blended on the model's device.
* :mod:`~segcore.predict.blocks`: a photo's class map in tile-aligned blocks that fit a
  memory budget (equal to one whole-image pass).
* :mod:`~segcore.predict.model`: a training checkpoint -> a model ready for inference.
* :mod:`~segcore.predict.figures`: overlays and the summary figure.
* :mod:`~segcore.predict.flood`: class map -> impervious fraction, runoff coefficient.
* :mod:`~segcore.predict.pipeline`: the reader thread ahead of the model, class counts
  on the device, the writer pool and the stage times.
* :mod:`~segcore.predict.folder`: the folder run that ties them together.

Georeferenced orthomosaics (GeoTIFF in, COG and per-zone statistics out) are
:mod:`segcore.gis`, built on the same blocks.

Photos and truth masks are read by :mod:`segcore.data.images`. The public names below
are re-exported lazily: importing this package loads neither torch, pandas nor
matplotlib.
"""

from __future__ import annotations

import importlib
from typing import Any


class PredictError(ValueError):
    """Bad input for prediction (checkpoint, folders, scheme mismatch); one-line message."""


_EXPORTS = {
    "tile_grid": "tiles", "window_2d": "tiles", "blend_tiles": "tiles",
    "predict_tiled": "tiles", "logits_to_classes": "tiles", "predict_image": "tiles",
    "Block": "blocks", "plan_blocks": "blocks", "predict_classes": "blocks",
    "predict_class_map": "blocks",
    "LoadedModel": "model", "load_model": "model", "resolve_device": "model",
    "overlay": "figures", "plot_summary": "figures",
    "PredictSettings": "folder", "Hooks": "folder", "FolderResult": "folder",
    "image_row": "folder", "predict_folder": "folder", "predict_checkpoint": "folder",
    "PropertyTable": "flood", "load_properties": "flood", "surface_stats": "flood",
    "aggregate": "flood", "stats_from_counts": "flood",
}

__all__ = ["PredictError", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'segcore.predict' has no attribute {name!r}")
    return getattr(importlib.import_module(f"segcore.predict.{module}"), name)


def __dir__() -> list[str]:
    return sorted(__all__)
