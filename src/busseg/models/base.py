"""What every encoder provides, and the one U-Net built over any of them.

An encoder (:class:`Encoder`) turns an input (N, C, H, W) into a list of features, finest
first, with known channels and strides. :class:`EncoderUNet` adds to it the shared
:class:`~busseg.models.decoder.UNetDecoder`, a 1x1 segmentation head, optionally an
image-level :class:`~busseg.models.decoder.ClassHead`, and silent prompt-guidance input
channels; its ``forward`` is the same for every encoder.

A U-Net for an encoder ``XEncoder`` is the class ``XUNet(EncoderUNet, XEncoder)``: the
encoder's layers are attributes of the model itself (no ``encoder.`` prefix), so the
state-dict keys are exactly those of the checkpoints written before the encoder registry
existed (``encoders.0.0.weight``, ``stages.2.1.conv1.weight``, ``_blocks.3._bn1.weight``,
``decoders.0.up.weight``, ``head.weight``, ``class_head.3.weight``) and no key mapping is
needed at load time.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .decoder import ClassHead, UNetDecoder
from .layers import check_input, init_weights

__all__ = ["Encoder", "EncoderUNet"]


class Encoder(nn.Module):
    """Base class of the encoders in :data:`busseg.models.registry.ENCODERS`.

    A subclass builds its layers in ``__init__`` (after ``super().__init__()``), sets
    ``in_channels``, ``feature_channels`` and ``feature_strides``, and implements
    :meth:`features` and :meth:`input_convs`; :meth:`channels_and_strides` gives the same
    channels and strides from a model config without building anything.

    Attributes
    ----------
    in_channels : int
        Input channels: 1 (grey image) plus any prompt-guidance channels.
    feature_channels : tuple of int
        Channels of the features :meth:`features` returns, finest first.
    feature_strides : tuple of int
        Their strides relative to the input, finest first (increasing powers of two).
    """

    in_channels: int
    feature_channels: tuple[int, ...]
    feature_strides: tuple[int, ...]

    @classmethod
    def channels_and_strides(cls, config: Mapping[str, Any]
                             ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Return ``(feature_channels, feature_strides)`` for a normalised model config.

        Parameters
        ----------
        config : mapping
            A model config with every key (see :func:`busseg.models.normalize_model_config`).

        Returns
        -------
        tuple of (tuple of int, tuple of int)
            Channels and strides of the features, finest first.
        """
        raise NotImplementedError

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Compute the encoder features.

        Parameters
        ----------
        x : torch.Tensor
            (N, in_channels, H, W) float, H and W multiples of the deepest stride.

        Returns
        -------
        list of torch.Tensor
            Feature ``i`` has shape (N, feature_channels[i], H / feature_strides[i],
            W / feature_strides[i]), finest first.
        """
        raise NotImplementedError

    def input_convs(self) -> list[nn.Conv2d]:
        """Return the convolutions that see the input (whose weights guidance channels get)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Return :meth:`features` (an encoder used on its own)."""
        return self.features(x)


class EncoderUNet(Encoder):
    """A U-Net over an encoder: encoder features, the shared decoder, heads, one forward.

    Not used on its own: a model class inherits from it and from a concrete
    :class:`Encoder` (``class UNet(EncoderUNet, PlainEncoder)``), builds the encoder with
    the encoder's ``__init__`` and then calls :meth:`init_unet`.

    Attributes
    ----------
    in_channels, out_channels, num_classes : int
        Input channels, segmentation outputs and class-head outputs (0: no class head).
    required_multiple : int
        Input height and width must be multiples of this (the deepest stride).
    dropout : torch.nn.Module
        :class:`torch.nn.Dropout2d` on the deepest feature before decoding (or identity).
    decoders : UNetDecoder
        The decoder; ``head`` the 1x1 output convolution; ``class_head`` (only with
        ``num_classes`` > 0) the :class:`ClassHead` on the deepest feature.
    """

    out_channels: int
    num_classes: int
    required_multiple: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> EncoderUNet:
        """Build the model from a normalised model config.

        Parameters
        ----------
        config : mapping
            A model config with every key (see :func:`busseg.models.normalize_model_config`);
            keys that are not arguments of ``cls`` (``arch``, ``encoder``, and for example
            ``depth`` for the fixed-depth EfficientNet) are not passed.

        Returns
        -------
        EncoderUNet
            A freshly initialised model of class ``cls``.
        """
        params = inspect.signature(cls).parameters
        return cls(**{k: v for k, v in config.items() if k in params})

    def init_unet(
        self,
        out_channels: int,
        *,
        upsample: str = "transpose",
        norm: str = "batch",
        decoder_channels: Sequence[int] | None = None,
        num_classes: int = 0,
        feature_dropout: float = 0.0,
        class_dropout: float = 0.0,
    ) -> None:
        """Add the decoder and heads to a built encoder, then initialise all weights.

        Called once, at the end of a model class's ``__init__``. Weights: He (Kaiming)
        normal convolutions, unit/zero norms (:func:`~busseg.models.layers.init_weights`),
        class head N(0, 0.01); with ``in_channels`` > 1 the input convolutions' weights of
        channels 1: (the prompt guidance of :mod:`busseg.prompts`) start at zero, so the
        untrained or freshly loaded network sees exactly the image (as DeepEdit and RITM do
        with their guidance maps).

        Parameters
        ----------
        out_channels : int
            Segmentation output channels.
        upsample : {"transpose", "bilinear"}, optional
            Decoder upsampling.
        norm : {"batch", "instance", "none"}, optional
            Normalisation in the decoder.
        decoder_channels : sequence of int or None, optional
            Channels of each decoder step, deepest first (``None``: mirror the encoder; see
            :class:`UNetDecoder`).
        num_classes : int, optional
            Class-head outputs; 0 builds no class head.
        feature_dropout : float, optional
            :class:`torch.nn.Dropout2d` probability on the deepest feature, in [0, 1).
        class_dropout : float, optional
            Dropout probability before the class head's linear layer, in [0, 1).
        """
        self.out_channels = out_channels
        self.num_classes = num_classes
        self.required_multiple = max(self.feature_strides)
        self.dropout = nn.Dropout2d(feature_dropout) if feature_dropout > 0 else nn.Identity()
        self.decoders = UNetDecoder(self.feature_channels, self.feature_strides,
                                    decoder_channels, upsample, norm)
        self.head = nn.Conv2d(self.decoders.out_channels, out_channels, 1)
        if num_classes:
            self.class_head = ClassHead(self.feature_channels[-1], num_classes, class_dropout)
        init_weights(self)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        if self.in_channels > 1:
            with torch.no_grad():
                for conv in self.input_convs():
                    conv.weight[:, 1:].zero_()

    def forward(self, x: torch.Tensor, with_class: bool = False):
        """Compute segmentation logits, and class logits with ``with_class``.

        Parameters
        ----------
        x : torch.Tensor
            (N, in_channels, H, W) float, H and W multiples of ``required_multiple``;
            channel 0 a z-scored grey image, channels 1: prompt guidance.
        with_class : bool, optional
            Also return the class head's logits.

        Returns
        -------
        torch.Tensor or tuple of torch.Tensor
            Logits (N, out_channels, H, W) float (no sigmoid); with ``with_class``,
            ``(logits, class_logits)`` with class logits (N, num_classes).

        Raises
        ------
        ValueError
            If the shape is wrong (see :func:`busseg.models.layers.check_input`), or
            ``with_class`` is asked of a model without a class head.
        """
        check_input(x, self.in_channels, self.required_multiple)
        if with_class and not self.num_classes:
            raise ValueError("this model has no class head (num_classes = 0)")
        feats = self.features(x)
        deepest = feats[-1]
        feats[-1] = self.dropout(deepest)
        logits = self.head(self.decoders(feats))
        if with_class:
            return logits, self.class_head(deepest)
        return logits


class DepthEncoderUNet(EncoderUNet):
    """An :class:`EncoderUNet` over an encoder built from its width, depth and norm.

    The ``__init__`` shared by :class:`~busseg.models.unet.UNet` and
    :class:`~busseg.models.resnet.ResNetUNet`: it builds the encoder with
    ``(in_channels, base_channels, depth, norm)`` and then calls :meth:`init_unet`.

    A model class inherits from it and then from the encoder
    (``class UNet(DepthEncoderUNet, PlainEncoder)``); the encoder's ``__init__`` is the next
    one in the method resolution order. The parameters are documented on the model classes.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        base_channels: int = 16,
        depth: int = 4,
        norm: str = "batch",
        dropout: float = 0.0,
        upsample: str = "transpose",
    ) -> None:
        super().__init__(in_channels, base_channels, depth, norm)  # the encoder's __init__
        self.init_unet(out_channels, upsample=upsample, norm=norm, feature_dropout=dropout)
