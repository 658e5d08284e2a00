"""Segmentation networks, built from a plain config dict, and self-describing checkpoints.

``build_model(config)`` is the only way the rest of busseg creates a network, so a
checkpoint's ``config.json`` (its ``"model"`` section) is enough to rebuild it. The config's
``"encoder"`` is looked up in the encoder registry (:mod:`busseg.models.registry`); every
encoder gets the same U-Net decoder and heads (:mod:`busseg.models.base`,
:mod:`busseg.models.decoder`).

Modules: ``layers`` (shared blocks), ``decoder`` (the U-Net decoder, the class head),
``base`` (the encoder interface and the U-Net over any encoder), one module per encoder
family (``unet``: plain, ``resnet``: resnet34, ``efficientnet``: efficientnet_lite0),
``registry`` (name -> encoder), ``checkpoint`` (save/load).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from .base import Encoder, EncoderUNet
from .checkpoint import (
    CheckpointError,
    default_checkpoint_path,
    load_checkpoint,
    read_checkpoint_config,
    save_checkpoint,
)
from .efficientnet import CLASS_NAMES, EfficientNetLite0UNet
from .layers import NORMS, UPSAMPLES
from .registry import ENCODERS, EncoderInfo, encoder_names, get_encoder, register_encoder
from .resnet import ResNetUNet
from .unet import UNet

__all__ = [
    "CLASS_NAMES",
    "ENCODERS",
    "CheckpointError",
    "EfficientNetLite0UNet",
    "Encoder",
    "EncoderInfo",
    "EncoderUNet",
    "ResNetUNet",
    "UNet",
    "build_model",
    "default_checkpoint_path",
    "default_model_config",
    "encoder_names",
    "get_encoder",
    "load_checkpoint",
    "normalize_model_config",
    "read_checkpoint_config",
    "register_encoder",
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
    "norm": NORMS,
    "upsample": UPSAMPLES,
}


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


def _lookup_encoder(name: Any) -> EncoderInfo:
    try:
        return get_encoder(name)
    except ValueError:
        raise ValueError(
            f"model config 'encoder' must be one of {', '.join(map(repr, encoder_names()))}, "
            f"got {name!r}"
        ) from None


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
    info = _lookup_encoder(cfg["encoder"])
    for key, fixed in info.fixed.items():
        if key not in config:
            cfg[key] = fixed
        elif config[key] != fixed:
            raise ValueError(f"model config {key!r} must be {fixed!r} for encoder "
                             f"{info.name!r}, got {config[key]!r}")
    for key, allowed in _CHOICES.items():
        if cfg[key] not in allowed:
            raise ValueError(
                f"model config {key!r} must be one of {', '.join(map(repr, allowed))}, "
                f"got {cfg[key]!r}"
            )
    for key in ("in_channels", "out_channels", "base_channels", "depth"):
        cfg[key] = _positive_int(key, cfg[key])
    max_depth = info.max_depth
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
        "resnet34" | "efficientnet_lite0": a name in the encoder registry,
        :func:`encoder_names`), ``in_channels`` (1), ``out_channels`` (1), ``base_channels`` (16),
        ``depth`` (4), ``norm`` ("batch" | "instance" | "none"), ``dropout`` (0.0),
        ``upsample`` ("transpose" | "bilinear"), ``num_classes`` (0). ``encoder="plain"``
        gives the classic U-Net of Ronneberger et al. (MICCAI 2015, arXiv:1505.04597);
        ``"resnet34"`` a U-Net with a ResNet-34 encoder (He et al., CVPR 2016) of stem width
        ``base_channels``; ``"efficientnet_lite0"`` a U-Net with an EfficientNet-Lite0
        encoder (Tan and Le, ICML 2019; :mod:`busseg.models.efficientnet`), fixed width
        (``base_channels`` unused), depth 5, and with ``num_classes`` > 0 an image-level
        class head (normal, benign, malignant for 3). The class head exists only for
        encoders registered with ``class_head=True`` (``efficientnet_lite0``). Every
        encoder gets the same U-Net decoder (:class:`busseg.models.decoder.UNetDecoder`);
        ``in_channels`` > 1 adds prompt-guidance channels whose input-convolution weights
        start at zero.

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
        If the config is invalid (see :func:`normalize_model_config`; an unknown encoder's
        message lists the registered ones), or asks for a class head of an encoder that has
        none.
    """
    cfg = normalize_model_config(config)
    info = get_encoder(cfg["encoder"])
    if cfg["num_classes"] and not info.class_head:
        able = " or ".join(repr(e.name) for e in ENCODERS.values() if e.class_head)
        raise ValueError(f"model config 'num_classes' > 0 (a class head) needs encoder {able}")
    model = info.model.from_config(cfg)
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
    cfg = normalize_model_config(config)
    return max(get_encoder(cfg["encoder"]).feature_strides(cfg))
