"""The "Fine-tune" dock widget, loaded through the napari manifest (needs a display)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

pytestmark = pytest.mark.gui

TIMEOUT_MS = 120_000


@pytest.fixture
def finetune(viewer):
    _, w = viewer.window.add_plugin_dock_widget("napari-busseg", "Fine-tune")
    return w


def add_pairs(viewer, w, images, masks, prefix="case"):
    for i, (im, m) in enumerate(zip(images, masks, strict=True)):
        img = viewer.add_image(im, name=f"{prefix} {i}")
        lab = viewer.add_labels(m.astype(np.uint8), name=f"{prefix} {i} prediction")
        w._pair_image.value = img
        assert w._pair_labels.value is lab  # the image's prediction layer is pre-selected
        w._add_btn.native.click()


def start_run(viewer, w, images, masks, out, **settings):
    """Add the pairs, set the output folder and the settings (``amount=2`` sets
    ``w._amount.value``, in the order given), and click Start."""
    add_pairs(viewer, w, images, masks)
    w._out.value = out
    for name, value in settings.items():
        getattr(w, f"_{name}").value = value
    w._start_btn.native.click()


def _weights(path):
    from safetensors.numpy import load_file

    return load_file(str(path / "model.safetensors"))


def test_manifest_widget_defaults(finetune):
    from busseg._widgets.finetune import BASE_SEGMENT, FineTuneWidget
    from busseg.finetune import FINETUNE_DEFAULTS

    assert isinstance(finetune, FineTuneWidget)
    assert finetune._amount.value == FINETUNE_DEFAULTS["max_steps"]
    assert finetune._lr.value == pytest.approx(FINETUNE_DEFAULTS["lr"])
    assert finetune._batch.value == FINETUNE_DEFAULTS["batch_size"]
    assert finetune._val_fraction.value == pytest.approx(FINETUNE_DEFAULTS["val_fraction"])
    assert finetune._augment.value is FINETUNE_DEFAULTS["augment"]
    assert finetune._freeze.value is FINETUNE_DEFAULTS["freeze_encoder"] is False
    assert finetune._base.value == BASE_SEGMENT
    assert not finetune._out.value.exists()


def test_finetune_writes_checkpoint_and_switches_segment_widget(
    qtbot, viewer, segment, finetune, tiny_checkpoint, synthetic_pairs, tmp_path
):
    images, masks = synthetic_pairs(4, size=(40, 44), seed=3)
    add_pairs(viewer, finetune, images, masks)
    assert [p.name for p in finetune.pairs] == [f"case {i}" for i in range(4)]
    assert finetune.base_checkpoint() == tiny_checkpoint  # "same as the segment widget"
    out = tmp_path / "ft-run"
    finetune._out.value = out
    finetune._amount.value = 4
    finetune._batch.value = 2
    finetune._start_btn.native.click()
    qtbot.waitUntil(lambda: not finetune.running, timeout=TIMEOUT_MS)

    res = finetune.last_result
    assert res is not None, finetune._status.value
    assert res.checkpoint == out / "best" and res.fit.steps == 4
    assert res.n_train == 3 and res.n_val == 1
    cfg = json.loads((out / "best" / "config.json").read_text())
    lineage = cfg["lineage"]
    assert lineage["base_model"] == str(tiny_checkpoint.resolve())
    assert sorted(lineage["pairs"] + lineage["heldout_pairs"]) == [f"case {i}" for i in range(4)]
    assert cfg["metrics"]["heldout_dice_before"] == pytest.approx(res.dice_before)
    # the weights changed
    before, after = _weights(tiny_checkpoint), _weights(out / "best")
    assert before.keys() == after.keys()
    assert any(not np.array_equal(before[k], after[k]) for k in before)
    # the segment widget now uses the new checkpoint, and the widget shows the result
    assert segment.current_checkpoint() == out / "best"
    assert str(out / "best") in finetune._result.value
    assert "held-out Dice" in finetune._result.value
    assert finetune._progress.value == 4
    # the next run goes into a new folder
    assert finetune._out.value != out and not finetune._out.value.exists()
    assert cfg["training"]["hyperparameters"]["freeze_encoder"] is False


def test_frozen_encoder_option_reaches_the_run(
    qtbot, viewer, segment, finetune, tiny_checkpoint, synthetic_pairs, tmp_path
):
    images, masks = synthetic_pairs(3, size=(40, 44), seed=4)
    start_run(viewer, finetune, images, masks, tmp_path / "frozen-run", amount=2, batch=2,
              freeze=True)
    qtbot.waitUntil(lambda: not finetune.running, timeout=TIMEOUT_MS)
    assert finetune.last_result is not None, finetune._status.value
    cfg = json.loads((tmp_path / "frozen-run" / "best" / "config.json").read_text())
    assert cfg["training"]["hyperparameters"]["freeze_encoder"] is True


def test_stack_pairs_current_slice_and_labelled_slices(viewer, finetune):
    stack = np.random.default_rng(0).integers(0, 255, (5, 24, 28), dtype=np.uint8)
    labels = np.zeros((5, 24, 28), np.uint8)
    labels[1, 5:10, 5:10] = 1
    labels[3, 2:6, 2:6] = 2
    viewer.add_image(stack, name="vol")
    viewer.add_labels(labels, name="vol prediction")
    finetune._pair_image.value = viewer.layers["vol"]
    viewer.dims.set_current_step(0, 3)
    finetune._add_btn.native.click()
    assert [p.name for p in finetune.pairs] == ["vol [3]"]
    np.testing.assert_array_equal(finetune.pairs[0].image, stack[3])
    np.testing.assert_array_equal(finetune.pairs[0].mask, labels[3] > 0)

    finetune._scope.value = "all labelled slices"
    finetune._add_btn.native.click()
    assert [p.name for p in finetune.pairs] == ["vol [1]", "vol [3]"] or sorted(
        p.name for p in finetune.pairs
    ) == ["vol [1]", "vol [3]"]
    assert len(finetune.pairs) == 2  # re-adding slice 3 replaced it

    finetune._pair_list.value = [0]
    finetune._remove_btn.native.click()
    assert len(finetune.pairs) == 1


def test_add_pair_refuses_a_mask_of_another_size(viewer, finetune):
    viewer.add_image(np.zeros((20, 20), np.uint8), name="a")
    viewer.add_labels(np.zeros((10, 10), np.uint8), name="other")
    finetune._pair_image.value = viewer.layers["a"]
    finetune._pair_labels.value = viewer.layers["other"]
    finetune._add_btn.native.click()
    assert finetune.pairs == []
    assert "choose the mask that belongs to the image" in finetune._status.value


def test_start_without_pairs_says_what_to_do(finetune):
    finetune._start_btn.native.click()
    assert not finetune.running
    assert "Add pair" in finetune._status.value


def test_pairs_from_a_corrections_folder(
    qtbot, viewer, finetune, tiny_checkpoint, synthetic_pairs, tmp_path
):
    from busseg.corrections import CorrectionStore

    store = CorrectionStore(tmp_path / "corrections")
    images, masks = synthetic_pairs(3, size=(36, 40), seed=4)
    for i, (im, m) in enumerate(zip(images, masks, strict=True)):
        store.save(f"case {i}", "benign", im, m)
    finetune._folder.value = tmp_path / "corrections"
    finetune._base.value = "checkpoint folder"
    finetune._base_path.value = tiny_checkpoint / "config.json"  # a file inside is accepted
    assert finetune.base_checkpoint() == tiny_checkpoint
    finetune._out.value = tmp_path / "out"
    finetune._amount.value = 2
    finetune._start_btn.native.click()
    qtbot.waitUntil(lambda: not finetune.running, timeout=TIMEOUT_MS)
    res = finetune.last_result
    assert res is not None, finetune._status.value
    cfg = json.loads((res.checkpoint / "config.json").read_text())
    names = cfg["lineage"]["pairs"] + cfg["lineage"]["heldout_pairs"]
    assert sorted(names) == [f"corrections/benign/case {i}.png" for i in range(3)]


def test_existing_output_folder_is_never_reused(
    qtbot, viewer, finetune, tiny_checkpoint, synthetic_pairs, tmp_path
):
    images, masks = synthetic_pairs(2, size=(32, 32), seed=5)
    add_pairs(viewer, finetune, images, masks)
    finetune._base.value = "checkpoint folder"
    finetune._base_path.value = tiny_checkpoint
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    finetune._out.value = existing
    finetune._amount.value = 1
    finetune._start_btn.native.click()
    qtbot.waitUntil(lambda: not finetune.running, timeout=TIMEOUT_MS)
    res = finetune.last_result
    assert res is not None, finetune._status.value
    assert res.checkpoint.parent.parent == existing  # a new sub-folder of it
    assert res.checkpoint.parent.name.startswith("finetune-")
    assert sorted(p.name for p in existing.iterdir()) == sorted(
        ["keep.txt", res.checkpoint.parent.name]
    )


def test_stop_ends_training_and_keeps_the_viewer_responsive(
    qtbot, viewer, segment, finetune, tiny_checkpoint, synthetic_pairs, tmp_path
):
    images, masks = synthetic_pairs(3, size=(32, 32), seed=6)
    start_run(viewer, finetune, images, masks, tmp_path / "stopped", amount=100_000)
    # progress arrives through queued signals: the GUI thread is free while training runs
    qtbot.waitUntil(lambda: finetune._progress.value >= 2, timeout=TIMEOUT_MS)
    assert finetune.running
    viewer.add_points(np.zeros((1, 2)), name="still responsive")
    finetune._stop_btn.native.click()
    qtbot.waitUntil(lambda: not finetune.running, timeout=TIMEOUT_MS)

    res = finetune.last_result
    assert res is not None, finetune._status.value
    assert res.fit.stopped and 2 <= res.fit.steps < 100_000
    assert res.checkpoint == tmp_path / "stopped" / "best"  # the best weights so far
    assert (res.checkpoint / "model.safetensors").is_file()
    assert segment.current_checkpoint() == res.checkpoint
    assert finetune._start_btn.enabled and not finetune._stop_btn.enabled
    assert "stopped after" in finetune._result.value


def test_errors_are_shown_not_raised(qtbot, viewer, finetune, synthetic_pairs, tmp_path):
    images, masks = synthetic_pairs(1, size=(32, 32))
    start_run(viewer, finetune, images, masks, tmp_path / "out", base="checkpoint folder",
              base_path=tmp_path / "no-such-checkpoint")
    qtbot.waitUntil(lambda: not finetune.running, timeout=TIMEOUT_MS)
    assert finetune._status.value.startswith("error:")
    assert finetune.last_result is None


def test_finetune_job_drains_without_qt(tiny_checkpoint, synthetic_pairs, tmp_path):
    from busseg._widgets.finetune import finetune_job
    from busseg.engine import ProgressEvent, drain

    images, masks = synthetic_pairs(2, size=(32, 32))
    events = []
    res = drain(
        finetune_job(
            images,
            masks,
            ["a", "b"],
            base=tiny_checkpoint,
            overrides={"max_steps": 2},
            out_dir=tmp_path / "o",
            device="cpu",
        ),
        events.append,
    )
    assert isinstance(events[0], tuple)
    assert [e.kind for e in events if isinstance(e, ProgressEvent)][-1] == "end"
    assert res.fit.steps == 2 and res.checkpoint.is_dir()


def test_pairs_from_a_padded_folder_stack_are_cropped(viewer, finetune):
    data = np.zeros((2, 40, 44), np.uint8)
    data[0, :30, :36] = 100
    labels = np.zeros((2, 40, 44), np.uint8)
    labels[0, 5:10, 5:10] = 1
    meta = {"busseg": {"kind": "stack", "slices": [
        {"name": "benign (4)", "original_shape": [30, 36]},
        {"name": "benign (5)", "original_shape": [40, 44]}]}}
    viewer.add_image(data, name="BUSI", metadata=meta)
    viewer.add_labels(labels, name="BUSI prediction")
    finetune._pair_image.value = viewer.layers["BUSI"]
    finetune._scope.value = "all labelled slices"
    finetune._add_btn.native.click()
    (pair,) = finetune.pairs
    assert pair.name == "benign (4) [0]"
    assert pair.image.shape == pair.mask.shape == (30, 36)
    assert pair.mask.sum() == 25


def test_recipe_combo_fills_the_settings_and_reaches_the_run(
    qtbot, viewer, segment, finetune, synthetic_pairs, tmp_path
):
    """Issue 17: a named recipe (its replay pairs included) reaches the fine-tune."""
    from busseg.finetune import DEFAULT_RECIPE, FINETUNE_RECIPES

    assert finetune._recipe.value == DEFAULT_RECIPE
    finetune._recipe.value = "lr1e-4"
    assert finetune._lr.value == pytest.approx(FINETUNE_RECIPES["lr1e-4"]["lr"])
    finetune._recipe.value = "replay"
    assert finetune._lr.value == pytest.approx(FINETUNE_RECIPES["replay"]["lr"])
    images, masks = synthetic_pairs(3, size=(40, 44), seed=4)
    start_run(viewer, finetune, images, masks, tmp_path / "replay-run", amount=2, batch=2)
    qtbot.waitUntil(lambda: not finetune.running, timeout=TIMEOUT_MS)
    assert finetune.last_result is not None, finetune._status.value
    cfg = json.loads((tmp_path / "replay-run" / "best" / "config.json").read_text())
    assert cfg["training"]["recipe"] == "replay"
    assert cfg["training"]["n_replay"] == FINETUNE_RECIPES["replay"]["replay"]
    assert cfg["training"]["hyperparameters"]["max_steps"] == 2  # the widget's value wins
