"""In-memory segmentation dataset built from arrays (BUSI files, napari layers or anything else)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from busseg.data.io import to_grey
from busseg.data.transforms import Augment, normalize, resize_image, resize_mask


class SegmentationDataset(Dataset):
    """Image/mask pairs resized once to the network input size and kept in memory.

    Decoding and resizing happen once, in the constructor, so an epoch costs only the
    augmentation and the network (about 64 KiB per 256x256 pair).

    Parameters
    ----------
    images : sequence of numpy.ndarray
        (H, W) grey or (H, W, 3|4) colour images, uint8 / uint16 / float (see
        :func:`busseg.data.io.to_grey`); sizes may differ.
    masks : sequence of numpy.ndarray
        (H, W) masks, > 0 = lesion, each the size of its image.
    input_size : tuple of int
        (height, width) the pairs are resized to, in pixels.
    augment : Augment or None
        Random augmentation applied in ``__getitem__`` (training); None for validation.
    labels : sequence of str, optional
        Class per pair (``benign``, ``malignant``, ``normal`` ...), for oversampling and
        per-class metrics.
    names : sequence of str, optional
        A name per pair, for reports.
    seed : int
        Seed of the augmentation generator.

    Raises
    ------
    ValueError
        If the lengths differ, or an image and its mask differ in size.
    """

    def __init__(
        self,
        images: Sequence[np.ndarray],
        masks: Sequence[np.ndarray],
        input_size: tuple[int, int] = (256, 256),
        augment: Augment | None = None,
        labels: Sequence[str] | None = None,
        names: Sequence[str] | None = None,
        seed: int = 0,
    ) -> None:
        if len(images) != len(masks):
            raise ValueError(f"{len(images)} images but {len(masks)} masks")
        if len(images) == 0:
            raise ValueError("the dataset is empty: give at least one image/mask pair")
        self.input_size = (int(input_size[0]), int(input_size[1]))
        imgs, msks = [], []
        for i, (im, m) in enumerate(zip(images, masks, strict=True)):
            g = to_grey(im)
            m = np.asarray(m)
            if m.shape != g.shape:
                name = names[i] if names is not None else f"pair {i}"
                raise ValueError(
                    f"{name}: image is {g.shape} (H, W) but its mask is {m.shape}; "
                    "a mask must have its image's size"
                )
            imgs.append(resize_image(g, self.input_size))
            msks.append(resize_mask(m, self.input_size))
        self.images = torch.from_numpy(np.stack(imgs))  # (N, h, w) uint8
        self.masks = torch.from_numpy(np.stack(msks))  # (N, h, w) bool
        self.labels = list(labels) if labels is not None else ["unknown"] * len(imgs)
        self.names = list(names) if names is not None else [f"pair {i}" for i in range(len(imgs))]
        self.augment = augment
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pair ``i`` as (image (1, h, w) float32 z-scored, mask (1, h, w) float32 in {0, 1})."""
        image = self.images[i][None].float() / 255.0
        mask = self.masks[i][None].float()
        if self.augment is not None:
            image, mask = self.augment(image, mask, self.generator)
        return normalize(image), mask

    def sample_weights(self) -> torch.Tensor:
        """Per-pair weights that balance the classes (for ``WeightedRandomSampler``).

        Returns
        -------
        torch.Tensor
            (N,) float64, 1 / (count of the pair's class); each class gets equal total weight.
        """
        labels = np.asarray(self.labels)
        _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
        return torch.from_numpy(1.0 / counts[inverse]).double()


def load_records(records, input_size=(256, 256), augment=None, seed=0) -> SegmentationDataset:
    """Read BUSI records (image + union of masks) into a :class:`SegmentationDataset`.

    Parameters
    ----------
    records : sequence of busseg.data.busi.BusiRecord
        Usable records (each with at least one mask).
    input_size : tuple of int
        (height, width) in pixels.
    augment : Augment or None
        Training augmentation.
    seed : int
        Augmentation seed.

    Returns
    -------
    SegmentationDataset
    """
    from busseg.data.io import read_image, read_mask

    images = [read_image(r.image_path) for r in records]
    masks = [read_mask(r.mask_paths) for r in records]
    return SegmentationDataset(
        images, masks, input_size, augment,
        labels=[r.label for r in records], names=[r.rel_path for r in records], seed=seed,
    )
