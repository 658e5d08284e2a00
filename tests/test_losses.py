import math

import pytest
import torch

from busseg.losses import (
    BCEDiceLoss,
    DiceLoss,
    FocalDiceLoss,
    build_loss,
    focal_loss,
    soft_dice_per_image,
)


def _target(n=2, size=32):
    t = torch.zeros(n, 1, size, size)
    t[:, :, 8:20, 10:24] = 1
    return t


def _logits_for(t, scale=30.0):
    return (t * 2 - 1) * scale


ALL = ["dice", "bce_dice", "focal_dice"]


def test_perfect_and_inverse_dice():
    t = _target()
    loss = DiceLoss()
    assert loss(_logits_for(t), t).item() < 1e-3
    assert loss(_logits_for(1 - t), t).item() > 0.99


@pytest.mark.parametrize("name", ALL)
def test_perfect_prediction_small(name):
    t = _target()
    fn = build_loss(name)
    good = fn(_logits_for(t), t).item()
    bad = fn(_logits_for(1 - t), t).item()
    assert good < 1e-3
    assert bad > good + 0.5


@pytest.mark.parametrize("name", ALL)
def test_empty_target_finite_and_sensible(name):
    fn = build_loss(name)
    t = torch.zeros(2, 1, 32, 32)
    empty_pred = fn(torch.full_like(t, -30.0), t)
    full_pred = fn(torch.full_like(t, 30.0), t)
    assert math.isfinite(empty_pred.item()) and math.isfinite(full_pred.item())
    assert empty_pred.item() < 1e-3
    assert full_pred.item() > 0.9


@pytest.mark.parametrize("name", ALL)
def test_gradients(name):
    fn = build_loss(name)
    t = _target()
    x = torch.randn(2, 1, 32, 32, requires_grad=True)
    loss = fn(x, t)
    loss.backward()
    assert loss.ndim == 0
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_dice_per_image_mean():
    t = _target(n=1)
    both = torch.cat([t, t])
    logits = torch.cat([_logits_for(t), _logits_for(1 - t)])
    d = soft_dice_per_image(logits, both)
    assert d.shape == (2,)
    assert DiceLoss()(logits, both).item() == pytest.approx(1 - d.mean().item())
    assert DiceLoss()(logits, both).item() == pytest.approx(0.5, abs=1e-2)


def test_targets_bool_and_half_logits():
    t = _target()
    assert DiceLoss()(_logits_for(t).half(), t.bool()).dtype == torch.float32


def test_focal_matches_bce_when_gamma0_no_alpha():
    t = _target()
    x = torch.randn_like(t)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(x, t)
    assert focal_loss(x, t, gamma=0.0, alpha=-1).item() == pytest.approx(bce.item(), rel=1e-5)
    assert focal_loss(x, t).item() < bce.item()


def test_weights():
    t = _target()
    x = torch.randn_like(t)
    dice = DiceLoss()(x, t)
    assert BCEDiceLoss(bce_weight=0.0)(x, t).item() == pytest.approx(dice.item())
    assert FocalDiceLoss(focal_weight=0.0, dice_weight=2.0)(x, t).item() == pytest.approx(
        2 * dice.item()
    )
    assert isinstance(build_loss("BCE-Dice", pos_weight=2.0), BCEDiceLoss)


def test_build_loss_errors():
    with pytest.raises(ValueError,
                       match="allowed: 'dice', 'bce_dice', 'bce_lesion_dice', 'focal_dice'"):
        build_loss("jaccard")
    with pytest.raises(ValueError, match="accepted keywords"):
        build_loss("dice", gamma=2)


def test_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        DiceLoss()(torch.zeros(1, 1, 8, 8), torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match="floating"):
        DiceLoss()(torch.zeros(1, 1, 8, 8, dtype=torch.long), torch.zeros(1, 1, 8, 8))


def test_bce_lesion_dice_ignores_dice_of_empty_targets():
    from busseg.losses import BCEDiceLoss, BCELesionDiceLoss, soft_dice_per_image

    torch.manual_seed(0)
    logits = torch.randn(3, 1, 16, 16)
    targets = torch.zeros(3, 1, 16, 16)
    targets[0, :, 4:10, 4:10] = 1  # only the first image has a lesion
    loss = BCELesionDiceLoss()(logits, targets)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
    dice0 = soft_dice_per_image(logits[:1], targets[:1]).mean()
    assert torch.isclose(loss, bce + 1 - dice0)
    # a right lesion and a 4-pixel false blob on each normal scan: per-image Dice of all
    # images (BCEDiceLoss) scores each blob ~0.8 of loss; here only BCE sees the blobs
    good = torch.full_like(logits, -8.0)
    good[0, :, 4:10, 4:10] = 8.0
    good[1:, :, 0:2, 0:2] = 8.0
    assert BCELesionDiceLoss()(good, targets) < 0.1  # BCE of the blobs: 8 px at logit 8
    assert BCEDiceLoss()(good, targets) > 0.5
    # a batch of normal scans only: BCE alone, still pulling predictions towards empty
    empty = BCELesionDiceLoss()(logits[1:], targets[1:])
    assert torch.isclose(empty, torch.nn.functional.binary_cross_entropy_with_logits(
        logits[1:], targets[1:]))
    assert BCELesionDiceLoss()(torch.full_like(logits[1:], -8.0), targets[1:]) < empty


def test_bce_lesion_dice_is_built_by_name_and_checks_arguments():
    from busseg.losses import BCELesionDiceLoss, build_loss

    assert isinstance(build_loss("bce-lesion-dice"), BCELesionDiceLoss)
    with pytest.raises(ValueError, match="smooth"):
        BCELesionDiceLoss(smooth=0)
