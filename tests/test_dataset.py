import numpy as np
import pytest
import torch
from torch.utils.data import WeightedRandomSampler

from busseg.data.busi import discover_busi
from busseg.data.dataset import SegmentationDataset, load_records
from busseg.data.transforms import Augment, normalize, resize_image, resize_mask

ALL_ON = Augment(hflip=1.0, vflip=1.0, affine=1.0, intensity=1.0, speckle=1.0)
ALL_OFF = Augment(hflip=0.0, vflip=0.0, affine=0.0, intensity=0.0, speckle=0.0)


def test_dataset_shapes_dtypes_and_normalisation(synthetic_pairs):
    images, masks = synthetic_pairs(3, size=(40, 52))
    images[1] = np.repeat(images[1][..., None], 3, axis=-1)  # RGB
    images[2] = images[2].astype(np.uint16) * 257  # 16 bit
    ds = SegmentationDataset(images, masks, input_size=(32, 24), labels=["a", "b", "b"])
    assert len(ds) == 3
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (3, 32, 24)
    assert ds.masks.dtype == torch.bool and ds.masks.shape == (3, 32, 24)
    for i in range(3):
        x, y = ds[i]
        assert x.shape == (1, 32, 24) and y.shape == (1, 32, 24)
        assert x.dtype == torch.float32 and y.dtype == torch.float32
        assert set(torch.unique(y).tolist()) == {0.0, 1.0}
        assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3
    # without augmentation an item is the same every time; 8-bit and 16-bit inputs agree
    torch.testing.assert_close(ds[0][0], ds[0][0])
    ref = SegmentationDataset([(images[2] // 257).astype(np.uint8)], [masks[2]], (32, 24))
    torch.testing.assert_close(ds[2][0], ref[0][0])
    assert ds.names == ["pair 0", "pair 1", "pair 2"] and ds.labels == ["a", "b", "b"]


def test_dataset_resizes_masks_with_their_images(synthetic_pairs):
    images, masks = synthetic_pairs(1, size=(64, 64))
    ds = SegmentationDataset(images, masks, input_size=(32, 32))
    y = ds[0][1][0].numpy() > 0.5
    small = masks[0].reshape(32, 2, 32, 2).mean(axis=(1, 3)) >= 0.5
    assert (y != small).mean() < 0.03
    # the lesion is dark in the image, so the mean z-score inside the mask is negative
    x = ds[0][0][0].numpy()
    assert x[y].mean() < -0.5 < 0.2 < x[~y].mean()


def test_dataset_validates_inputs(synthetic_pairs):
    images, masks = synthetic_pairs(2)
    with pytest.raises(ValueError, match="2 images but 1 masks"):
        SegmentationDataset(images, masks[:1])
    with pytest.raises(ValueError, match="empty"):
        SegmentationDataset([], [])
    with pytest.raises(ValueError, match="case B.*its image's size"):
        SegmentationDataset(images, [masks[0], masks[1][:-1]], names=["case A", "case B"])


def test_augment_keeps_masks_binary_and_images_in_range(synthetic_pairs):
    images, masks = synthetic_pairs(1, size=(48, 40))
    image = torch.from_numpy(images[0])[None].float() / 255
    mask = torch.from_numpy(masks[0])[None].float()
    g = torch.Generator().manual_seed(0)
    changed = 0
    for _ in range(25):
        xi, yi = ALL_ON(image, mask, g)
        assert xi.shape == image.shape and yi.shape == mask.shape
        assert xi.dtype == torch.float32 and yi.dtype == torch.float32
        assert set(torch.unique(yi).tolist()) <= {0.0, 1.0}
        assert float(xi.min()) >= 0 and float(xi.max()) <= 1 and torch.isfinite(xi).all()
        changed += int(not torch.equal(yi, mask))
    assert changed >= 20  # the geometry really changes
    # the same seed gives the same augmentation
    a = ALL_ON(image, mask, torch.Generator().manual_seed(5))
    b = ALL_ON(image, mask, torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_augment_flips_image_and_mask_together(synthetic_pairs):
    images, masks = synthetic_pairs(1)
    image = torch.from_numpy(images[0])[None].float() / 255
    mask = torch.from_numpy(masks[0])[None].float()
    x, y = Augment(hflip=1.0, vflip=0.0, affine=0.0, intensity=0.0, speckle=0.0)(image, mask)
    assert torch.equal(x, image.flip(-1)) and torch.equal(y, mask.flip(-1))
    x, y = ALL_OFF(image, mask)
    assert torch.equal(x, image) and torch.equal(y, mask)
    assert Augment().vflip == 0.0  # the skin line stays on top by default
    assert Augment().to_dict()["hflip"] == 0.5


def test_dataset_with_augmentation_is_seeded(synthetic_pairs):
    images, masks = synthetic_pairs(2)
    a = SegmentationDataset(images, masks, (32, 32), augment=ALL_ON, seed=1)
    b = SegmentationDataset(images, masks, (32, 32), augment=ALL_ON, seed=1)
    xa, ya = a[0]
    xb, yb = b[0]
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a[0][0], xa)  # a new draw next time
    assert set(torch.unique(a[1][1]).tolist()) <= {0.0, 1.0}


def test_sample_weights_balance_the_classes(synthetic_pairs):
    labels = ["benign"] * 6 + ["malignant"] * 3 + ["normal"]
    images, masks = synthetic_pairs(len(labels), size=(16, 16))
    ds = SegmentationDataset(images, masks, (16, 16), labels=labels)
    w = ds.sample_weights()
    assert w.dtype == torch.float64 and w.shape == (10,)
    torch.testing.assert_close(w[:6], torch.full((6,), 1 / 6, dtype=torch.float64))
    per_class = {
        lab: float(w[[i for i, x in enumerate(labels) if x == lab]].sum()) for lab in set(labels)
    }
    assert all(abs(v - 1.0) < 1e-12 for v in per_class.values())
    draws = list(WeightedRandomSampler(w, 3000, generator=torch.Generator().manual_seed(0)))
    counts = np.bincount([["benign", "malignant", "normal"].index(labels[i]) for i in draws])
    assert np.all(np.abs(counts / 3000 - 1 / 3) < 0.05)


def test_resize_helpers():
    img = np.arange(64 * 48, dtype=np.uint32).reshape(64, 48) % 256
    out = resize_image(img.astype(np.uint8), (32, 24))
    assert out.shape == (32, 24) and out.dtype == np.uint8
    m = np.zeros((64, 48), np.uint8)
    m[10:40, 5:30] = 7
    rm = resize_mask(m, (16, 12))
    assert rm.dtype == bool and rm.shape == (16, 12)
    assert rm[5:10, 2:7].all() and not rm[12:, :].any()
    z = normalize(torch.rand(2, 1, 8, 8) * 50 + 3)
    torch.testing.assert_close(z.mean(dim=(-2, -1)), torch.zeros(2, 1), atol=1e-5, rtol=0)
    assert torch.equal(normalize(torch.full((1, 4, 4), 0.3)), torch.zeros(1, 4, 4))


def test_load_records_reads_the_union_of_masks(fake_busi):
    index = discover_busi(fake_busi)
    ds = load_records(index.usable, input_size=(40, 48))
    assert len(ds) == len(index.usable)
    assert ds.names == [r.rel_path for r in index.usable]
    assert ds.labels == [r.label for r in index.usable]
    i = ds.names.index("benign/benign (2).png")
    union = ds.masks[i].numpy()
    from busseg.data.io import read_mask

    first = read_mask(index.by_rel_path()["benign/benign (2).png"].mask_paths[0])
    assert union.sum() > first.sum() and (union | first).sum() == union.sum()
    normal = ds.names.index("normal/normal (1).png")
    assert not ds.masks[normal].any()
