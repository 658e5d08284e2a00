"""Segmentation networks, built from a plain config dict, and self-describing checkpoints.

``build_model(config)`` is the only way the rest of busseg creates a network, so a
checkpoint's ``config.json`` (its ``"model"`` section) is enough to rebuild it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from .checkpoint import (
    CheckpointError,
    default_checkpoint_path,
    load_checkpoint,
    read_checkpoint_config,
    save_checkpoint,
)
from .efficientnet import CLASS_NAMES, EfficientNetLite0UNet
from .resnet import MAX_DEPTH as _RESNET_MAX_DEPTH
from .resnet import ResNetUNet
from .unet import NORMS, UPSAMPLES, UNet

__all__ = [
    "CLASS_NAMES",
    "CheckpointError",
    "EfficientNetLite0UNet",
    "ResNetUNet",
    "UNet",
    "build_model",
    "default_checkpoint_path",
    "default_model_config",
    "load_checkpoint",
    "normalize_model_config",
    "read_checkpoint_config",
    "required_multiple",
    "save_checkpoint",
]

_DEFAULTS: dict[str, Any] = {
    "arch": "unet",
    "encoder": "plain",
    "in_channels": 1,
    "out_channels": 1,
    "base_channels": 16,
    "depth": 4,
    "norm": "batch",
    "dropout": 0.0,
    "upsample": "transpose",
    "num_classes": 0,
}
_CHOICES: dict[str, tuple[str, ...]] = {
    "arch": ("unet",),
    "encoder": ("plain", "resnet34", "efficientnet_lite0"),
    "norm": NORMS,
    "upsample": UPSAMPLES,
}
_MAX_DEPTH = {"plain": 7, "resnet34": _RESNET_MAX_DEPTH, "efficientnet_lite0": 5}
#: EfficientNet-Lite0 has a fixed width and five down-sampling steps
_EFFICIENTNET_FIXED = {"depth": 5, "norm": "batch"}


def default_model_config() -> dict:
    """Return the default model config (a new dict each call).

    Returns
    -------
    dict
        ``{"arch": "unet", "encoder": "plain", "in_channels": 1, "out_channels": 1,
        "base_channels": 16, "depth": 4, "norm": "batch", "dropout": 0.0,
        "upsample": "transpose", "num_classes": 0}``.
    """
    return dict(_DEFAULTS)


def _positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"model config {key!r} must be a positive integer, got {value!r}")
    return int(value)


def normalize_model_config(config: Mapping[str, Any] | None = None) -> dict:
    """Validate a model config and fill in defaults.

    Parameters
    ----------
    config : mapping or None, optional
        Any subset of the keys of :func:`default_model_config`; ``None`` means all defaults.

    Returns
    -------
    dict
        A new dict with every key present, values validated (``dropout`` as float).

    Raises
    ------
    ValueError
        For unknown keys (the message lists the allowed keys), a value outside its allowed
        set (the message lists the allowed values), a non-positive or non-integer size,
        ``depth`` out of range for the encoder (1-7 plain, 1-5 resnet34, 5 for
        efficientnet_lite0, which also needs ``norm="batch"``), a negative ``num_classes``,
        or ``dropout`` outside [0, 1).
    """
    if config is None:
        config = {}
    if not isinstance(config, Mapping):
        raise ValueError(f"model config must be a dict, got {type(config).__name__}")
    unknown = sorted(set(config) - set(_DEFAULTS))
    if unknown:
        raise ValueError(
            f"unknown model config key(s) {', '.join(map(repr, unknown))}; "
            f"allowed keys: {', '.join(_DEFAULTS)}"
        )
    cfg = {**_DEFAULTS, **config}
    if cfg["encoder"] == "efficientnet_lite0":
        for key, fixed in _EFFICIENTNET_FIXED.items():
            if key not in config:
                cfg[key] = fixed
            elif config[key] != fixed:
                raise ValueError(f"model config {key!r} must be {fixed!r} for encoder "
                                 f"'efficientnet_lite0', got {config[key]!r}")
    for key, allowed in _CHOICES.items():
        if cfg[key] not in allowed:
            raise ValueError(
                f"model config {key!r} must be one of {', '.join(map(repr, allowed))}, "
                f"got {cfg[key]!r}"
            )
    for key in ("in_channels", "out_channels", "base_channels", "depth"):
        cfg[key] = _positive_int(key, cfg[key])
    max_depth = _MAX_DEPTH[cfg["encoder"]]
    if cfg["depth"] > max_depth:
        raise ValueError(
            f"model config 'depth' must be between 1 and {max_depth} for encoder "
            f"{cfg['encoder']!r}, got {cfg['depth']}"
        )
    nc = cfg["num_classes"]
    if isinstance(nc, bool) or not isinstance(nc, int) or nc < 0:
        raise ValueError(f"model config 'num_classes' must be an integer >= 0, got {nc!r}")
    dropout = cfg["dropout"]
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
        raise ValueError(f"model config 'dropout' must be a number in [0, 1), got {dropout!r}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"model config 'dropout' must be in [0, 1), got {dropout!r}")
    cfg["dropout"] = float(dropout)
    return cfg


def build_model(config: Mapping[str, Any] | None = None) -> nn.Module:
    """Build a segmentation network from a config dict.

    Parameters
    ----------
    config : mapping or None, optional
        Model config; keys (defaults): ``arch`` ("unet"), ``encoder`` ("plain" |
        "resnet34"), ``in_channels`` (1), ``out_channels`` (1), ``base_channels`` (16),
        ``depth`` (4), ``norm`` ("batch" | "instance" | "none"), ``dropout`` (0.0),
        ``upsample`` ("transpose" | "bilinear"), ``num_classes`` (0). ``encoder="plain"``
        gives the classic U-Net of Ronneberger et al. (MICCAI 2015, arXiv:1505.04597);
        ``"resnet34"`` a U-Net with a ResNet-34 encoder (He et al., CVPR 2016) of stem width
        ``base_channels``; ``"efficientnet_lite0"`` a U-Net with an EfficientNet-Lite0
        encoder (Tan and Le, ICML 2019; :mod:`busseg.models.efficientnet`), fixed width
        (``base_channels`` unused), depth 5, and with ``num_classes`` > 0 an image-level
        class head (normal, benign, malignant for 3). The class head exists only for
        ``efficientnet_lite0``.

    Returns
    -------
    torch.nn.Module
        A freshly initialised model in training mode on the CPU. It maps float input
        (N, in_channels, H, W), H and W multiples of ``required_multiple(config)``, to
        float logits (N, out_channels, H, W). The full config (defaults filled in) is
        attached as ``model.busseg_model_config``.

    Raises
    ------
    ValueError
        If the config is invalid (see :func:`normalize_model_config`).
    """
    cfg = normalize_model_config(config)
    if cfg["num_classes"] and cfg["encoder"] != "efficientnet_lite0":
        raise ValueError("model config 'num_classes' > 0 (a class head) needs encoder "
                         "'efficientnet_lite0'")
    if cfg["encoder"] == "efficientnet_lite0":
        model: nn.Module = EfficientNetLite0UNet(
            in_channels=cfg["in_channels"], out_channels=cfg["out_channels"],
            num_classes=cfg["num_classes"], dropout=cfg["dropout"], upsample=cfg["upsample"])
        model.busseg_model_config = cfg
        return model
    kwargs = {k: v for k, v in cfg.items() if k not in ("arch", "encoder", "num_classes")}
    if cfg["encoder"] == "plain":
        model = UNet(**kwargs)
    else:
        model = ResNetUNet(**kwargs)
    model.busseg_model_config = cfg
    return model


def required_multiple(config: Mapping[str, Any] | nn.Module | None = None) -> int:
    """Return the factor that input height and width must be multiples of.

    Parameters
    ----------
    config : mapping or torch.nn.Module or None, optional
        A model config (``None``: defaults), or a model built by :func:`build_model`.

    Returns
    -------
    int
        ``2 ** depth`` (16 for the default config).

    Raises
    ------
    ValueError
        If the config is invalid, or a model carries no ``required_multiple``.
    """
    if isinstance(config, nn.Module):
        multiple = getattr(config, "required_multiple", None)
        if multiple is None:
            raise ValueError(
                f"{type(config).__name__} was not built by busseg.models.build_model; "
                "pass its config dict instead"
            )
        return int(multiple)
    return 2 ** normalize_model_config(config)["depth"]
