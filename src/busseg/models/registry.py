"""The encoder registry: encoder name -> encoder class, U-Net class and config limits.

Modelled on segmentation_models.pytorch's ``encoders/__init__.py``: every encoder a model
config can name (its ``"encoder"`` key) has one :class:`EncoderInfo` here, and
:func:`busseg.models.build_model` finds the encoder only through :func:`get_encoder`.

Adding an encoder: write ``XEncoder(Encoder)`` (layers, ``channels_and_strides``,
``features``, ``input_convs``; see :class:`busseg.models.base.Encoder`) and
``class XUNet(EncoderUNet, XEncoder)`` whose ``__init__`` builds the encoder and calls
``init_unet``, in a module of its own under ``busseg/models/``; then register it here with
:func:`register_encoder`. The decoder, heads, guidance channels, input checks and checkpoint
format come with :class:`~busseg.models.base.EncoderUNet`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .base import Encoder, EncoderUNet
from .efficientnet import EfficientNetLite0Encoder, EfficientNetLite0UNet
from .resnet import MAX_DEPTH as RESNET_MAX_DEPTH
from .resnet import ResNet34Encoder, ResNetUNet
from .unet import MAX_DEPTH as PLAIN_MAX_DEPTH
from .unet import PlainEncoder, UNet

__all__ = ["ENCODERS", "EncoderInfo", "encoder_names", "get_encoder", "register_encoder"]


@dataclass(frozen=True)
class EncoderInfo:
    """One registered encoder.

    Attributes
    ----------
    name : str
        The value of the model config's ``"encoder"`` key.
    encoder : type
        The :class:`~busseg.models.base.Encoder` subclass.
    model : type
        The U-Net class over it (an :class:`~busseg.models.base.EncoderUNet` and ``encoder``
        subclass) that :func:`busseg.models.build_model` builds.
    max_depth : int
        Largest allowed config ``depth`` (number of x2 down-sampling steps).
    fixed : mapping
        Config values the encoder cannot change (e.g. ``{"depth": 5, "norm": "batch"}``);
        filled in when absent, an error when given otherwise.
    class_head : bool
        Whether configs may ask for an image-level class head (``num_classes`` > 0).
    reference : str
        The paper the encoder comes from.
    """

    name: str
    encoder: type[Encoder]
    model: type[EncoderUNet]
    max_depth: int
    fixed: Mapping[str, Any] = field(default_factory=dict)
    class_head: bool = False
    reference: str = ""

    def feature_channels(self, config: Mapping[str, Any]) -> tuple[int, ...]:
        """Channels of the encoder's features, finest first, for a normalised config.

        Parameters
        ----------
        config : mapping
            A model config with every key (:func:`busseg.models.normalize_model_config`).

        Returns
        -------
        tuple of int
        """
        return self.encoder.channels_and_strides(config)[0]

    def feature_strides(self, config: Mapping[str, Any]) -> tuple[int, ...]:
        """Strides of the encoder's features relative to the input, finest first.

        Takes the ``config`` of :meth:`feature_channels`; returns a tuple of increasing
        powers of two, the last one the input size multiple the model needs.
        """
        return self.encoder.channels_and_strides(config)[1]


#: Registered encoders by name, in the order error messages list them.
ENCODERS: dict[str, EncoderInfo] = {}


def register_encoder(info: EncoderInfo) -> EncoderInfo:
    """Add an encoder to :data:`ENCODERS`.

    Parameters
    ----------
    info : EncoderInfo
        The encoder; ``info.name`` becomes a valid model config ``"encoder"``.

    Returns
    -------
    EncoderInfo
        ``info``.

    Raises
    ------
    ValueError
        If the name is taken, or ``info.model`` is not a U-Net over ``info.encoder``.
    """
    if info.name in ENCODERS:
        raise ValueError(f"encoder {info.name!r} is already registered")
    if not (issubclass(info.model, EncoderUNet) and issubclass(info.model, info.encoder)):
        raise ValueError(f"{info.model.__name__} must subclass EncoderUNet and "
                         f"{info.encoder.__name__}")
    ENCODERS[info.name] = info
    return info


def encoder_names() -> tuple[str, ...]:
    """Return the registered encoder names, in registration order.

    Returns
    -------
    tuple of str
        ``("plain", "resnet34", "efficientnet_lite0", ...)``.
    """
    return tuple(ENCODERS)


def get_encoder(name: str) -> EncoderInfo:
    """Look an encoder up by name.

    Parameters
    ----------
    name : str
        A model config's ``"encoder"`` value.

    Returns
    -------
    EncoderInfo

    Raises
    ------
    ValueError
        If no encoder of that name is registered; the message lists the known names.
    """
    try:
        return ENCODERS[name]
    except (KeyError, TypeError):
        known = ", ".join(map(repr, ENCODERS))
        raise ValueError(f"unknown encoder {name!r}; known encoders: {known}") from None


register_encoder(EncoderInfo(
    "plain", PlainEncoder, UNet, max_depth=PLAIN_MAX_DEPTH,
    reference="Ronneberger et al., U-Net, MICCAI 2015, arXiv:1505.04597"))
register_encoder(EncoderInfo(
    "resnet34", ResNet34Encoder, ResNetUNet, max_depth=RESNET_MAX_DEPTH,
    reference="He et al., Deep Residual Learning, CVPR 2016, arXiv:1512.03385"))
register_encoder(EncoderInfo(
    "efficientnet_lite0", EfficientNetLite0Encoder, EfficientNetLite0UNet, max_depth=5,
    fixed={"depth": 5, "norm": "batch"}, class_head=True,
    reference="Tan and Le, EfficientNet, ICML 2019, arXiv:1905.11946 (Lite form)"))
