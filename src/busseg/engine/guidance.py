"""What the loop adds to a batch: guidance channels for prompt models, class targets and weights.

Models with guidance input channels (``in_channels`` > 1) take the image plus rendered prompts
(:mod:`busseg.prompts`); models with a class head (``num_classes`` > 0) are also trained on the
scan's class (normal / benign / malignant), weighted by inverse class frequency.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset


def with_guidance(images: torch.Tensor, guidance: torch.Tensor | None, model) -> torch.Tensor:
    """Append guidance channels (zeros for automatic mode) to a batch of images.

    Parameters
    ----------
    images : torch.Tensor
        (N, 1, h, w) float.
    guidance : torch.Tensor or None
        (N, C - 1, h, w) float, or None for all-zero guidance.
    model : torch.nn.Module
        The network; ``model.in_channels`` is C.

    Returns
    -------
    torch.Tensor
        (N, C, h, w); ``images`` itself when the model takes one channel.
    """
    c = int(getattr(model, "in_channels", 1))
    if c == 1:
        return images
    if guidance is None:
        guidance = images.new_zeros((images.shape[0], c - 1, *images.shape[-2:]))
    return torch.cat([images, guidance.to(images)], dim=1)


def tight_box_guidance(masks: torch.Tensor) -> torch.Tensor:
    """Render one tight box per lesion of each mask as guidance channels.

    Parameters
    ----------
    masks : torch.Tensor
        (N, 1, h, w) float, lesion where >= 0.5.

    Returns
    -------
    torch.Tensor
        (N, 4, h, w) float guidance (:func:`busseg.prompts.render_guidance`: boxes only, no
        clicks, no previous mask), on the masks' device.
    """
    from busseg.prompts import Prompts, mask_to_boxes, render_guidance

    out = []
    for m in masks[:, 0].cpu().numpy() >= 0.5:
        pr = Prompts(mask_to_boxes(m), np.zeros((0, 2)), np.zeros(0, np.int8), None)
        out.append(render_guidance(pr, m.shape, m.shape))
    return torch.stack(out).to(masks.device)


def prompt_simulator(model: torch.nn.Module, settings: dict | None):
    """Return the prompt simulator that trains a model with guidance channels, or None.

    Parameters
    ----------
    model : torch.nn.Module
        The network; guidance is simulated only when ``model.in_channels`` > 1.
    settings : dict or None
        Keyword arguments of :class:`busseg.prompts.PromptSimulator` (None: its defaults).

    Returns
    -------
    busseg.prompts.PromptSimulator or None
    """
    if int(getattr(model, "in_channels", 1)) <= 1:
        return None
    from busseg.prompts import PromptSimulator

    return PromptSimulator(**(settings or {}))


class WithClass(Dataset):
    """A dataset whose pairs carry their class index too.

    Parameters
    ----------
    dataset : Dataset
        Yields (image, mask, ...); its ``labels`` (one class name per pair, e.g.
        ``"benign"``) give the targets, "unknown" for all pairs if it has none.

    Attributes
    ----------
    targets : torch.Tensor
        (N,) int64 index into ``busseg.models.CLASS_NAMES``; -1 where the class is unknown.
    """

    def __init__(self, dataset: Dataset) -> None:
        from busseg.models import CLASS_NAMES

        self.dataset = dataset
        labels = getattr(dataset, "labels", None) or ["unknown"] * len(dataset)
        self.targets = torch.tensor(
            [CLASS_NAMES.index(lab) if lab in CLASS_NAMES else -1 for lab in labels])

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        """Pair ``i`` as (image, mask, class index as a 0-d int64 tensor)."""
        x, y = self.dataset[i][:2]
        return x, y, self.targets[i]

    def class_weights(self, k: int) -> torch.Tensor | None:
        """Return inverse-frequency class weights, normalised to mean 1 over present classes.

        Parameters
        ----------
        k : int
            Number of classes of the model's head.

        Returns
        -------
        torch.Tensor or None
            (k,) float32, 0 for classes absent from the training set; None when no pair has
            a known class.
        """
        t = self.targets[self.targets >= 0]
        if not len(t):
            return None
        counts = torch.bincount(t, minlength=k).double()
        w = torch.where(counts > 0, counts.sum() / counts.clamp_min(1), torch.zeros_like(counts))
        return (w / w[counts > 0].mean()).float()
