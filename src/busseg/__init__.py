"""napari-busseg: breast-ultrasound lesion segmentation with a U-Net.

The public API is small and imports nothing heavy until it is used::

    import busseg
    model = busseg.load_model()                 # the shipped default model
    prob = busseg.predict_proba(image, model)   # (H, W) float32 in [0, 1]
    mask = busseg.predict_mask(image, model)    # (H, W) bool
    mask = busseg.predict_mask(image, model, boxes=[(r0, c0, r1, c1)])  # box prompt
    mask = busseg.predict_mask(image, model, busseg.InferenceSettings(threshold=0.4))
    probs = busseg.classify(image, model)       # {"normal": p, "benign": p, "malignant": p}

``import busseg`` imports neither torch, Qt nor napari; they load on first use.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = [
    "InferenceSettings",
    "__version__",
    "classify",
    "load_model",
    "predict",
    "predict_mask",
    "predict_proba",
]

_LAZY = {
    "InferenceSettings": "busseg.settings",
    "classify": "busseg.inference",
    "predict": "busseg.inference",
    "load_model": "busseg.inference",
    "predict_mask": "busseg.inference",
    "predict_proba": "busseg.inference",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'busseg' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
