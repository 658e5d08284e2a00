"""busseg.uncertainty: the score, the cache, the ranking generator and ``busseg rank``."""

from __future__ import annotations

import csv
import math
import os
import threading
from pathlib import Path

import numpy as np
import pytest

import busseg
from busseg import inference
from busseg import uncertainty as U
from busseg.cli import main


def _logit(p):
    p = np.asarray(p, dtype=np.float64)
    return np.log(p / (1.0 - p))


def _h(p: float) -> float:
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


# --------------------------------------------------------------------------- the definition


def test_entropy_over_lesion_and_border_band_by_hand():
    p = np.full((20, 20), 0.05)
    p[8:12, 8:12] = 0.9  # the predicted lesion (threshold 0.5): 16 pixels
    p[7, 8:12] = 0.3  # just above it, inside a 1-pixel band
    views = np.stack([_logit(p), _logit(p)])
    out = U.scores_from_logits(views, 0.5, border=1)
    # band of 1 px (Euclidean): the 4 edge strips of 4 pixels each, no corners -> 16 pixels
    expected = (16 * _h(0.9) + 4 * _h(0.3) + 12 * _h(0.05)) / 32
    assert out["entropy"] == pytest.approx(expected, rel=1e-6)
    assert out["entropy_region"] == "lesion+border"
    assert out["region_fraction"] == pytest.approx(32 / 400)
    assert out["lesion_fraction"] == pytest.approx(16 / 400)
    assert out["flip_disagreement"] == 0.0  # identical views


def test_flip_disagreement_is_one_minus_dice_of_the_two_views():
    a = np.full((10, 10), 0.01)
    b = a.copy()
    a[2:6, 2:6] = 0.99  # 16 px
    b[2:6, 4:8] = 0.99  # 16 px, 8 shared
    out = U.scores_from_logits(np.stack([_logit(a), _logit(b)])[None], 0.5)
    assert out["flip_disagreement"] == pytest.approx(1 - 2 * 8 / 32)
    one_view = U.scores_from_logits(_logit(a)[None], 0.5)
    assert one_view["flip_disagreement"] is None


def test_empty_prediction_uses_half_seen_pixels_then_the_whole_image():
    p = np.full((10, 10), 0.02)
    p[0, :5] = 0.3  # above 0.1 but below the threshold: a half-seen lesion
    out = U.scores_from_logits(np.stack([_logit(p)] * 2), 0.5)
    assert out["entropy_region"] == "p>0.1"
    assert out["entropy"] == pytest.approx(_h(0.3))
    assert out["flip_disagreement"] == 0.0  # both empty
    p[0, :5] = 0.02
    out = U.scores_from_logits(np.stack([_logit(p)] * 2), 0.5)
    assert out["entropy_region"] == "image"
    assert out["entropy"] == pytest.approx(_h(0.02))


@pytest.mark.parametrize(
    "logits, threshold, match",
    [(np.zeros((3, 4, 4)), 0.5, "V 1 or 2"), (np.zeros((4, 4)), 0.5, "V 1 or 2"),
     (np.zeros((1, 4, 4)), 1.0, "threshold")],
)
def test_scores_from_logits_rejects_bad_input(logits, threshold, match):
    with pytest.raises(ValueError, match=match):
        U.scores_from_logits(logits, threshold)


def test_uncertainty_score_on_a_model(tiny_checkpoint, synthetic_pairs):
    model = inference.load_model(tiny_checkpoint, device="cpu")
    (image,), _ = synthetic_pairs(1, size=(40, 52))
    out = U.uncertainty_score(image, model)
    for key in ("score", "entropy", "flip_disagreement"):
        assert 0.0 <= out[key] <= 1.0
    assert out["class_entropy"] is None  # the tiny U-Net has no class head
    assert out["score"] == pytest.approx((out["entropy"] + out["flip_disagreement"]) / 2)
    # one forward pass gives both views: the same numbers as from predict_logits_batch
    x = inference.preprocess(image, model.busseg_config["preprocessing"])
    ref = U.scores_from_logits(inference.predict_logits_batch(x, model, tta=True), 0.5)
    assert out["entropy"] == pytest.approx(ref["entropy"])
    plain = U.uncertainty_score(image, model, tta=False)
    assert plain["flip_disagreement"] is None and plain["score"] == plain["entropy"]
    with pytest.raises(ValueError, match="NaN"):
        U.uncertainty_score(np.full((8, 8), np.nan), model)


def test_class_head_entropy_where_the_model_has_one(tiny_checkpoint, tiny_prompt_checkpoint):
    image = np.random.default_rng(0).integers(0, 255, (32, 32), dtype=np.uint8)
    plain = inference.load_model(tiny_checkpoint, device="cpu")
    assert U.uncertainty_score(image, plain)["class_entropy"] is None
    model = inference.load_model(tiny_prompt_checkpoint, device="cpu")
    out = U.uncertainty_score(image, model)
    probs = busseg.classify(image, model, tta=True)
    assert out["class_probabilities"] == pytest.approx(probs)
    assert out["class_entropy"] == pytest.approx(U.class_entropy(probs))
    assert out["score"] == pytest.approx(
        (out["entropy"] + out["flip_disagreement"] + out["class_entropy"]) / 3)
    assert U.class_entropy({"normal": 1 / 3, "benign": 1 / 3, "malignant": 1 / 3}) == \
        pytest.approx(1.0)  # uniform: maximal
    assert U.class_entropy({"normal": 0.0, "benign": 1.0, "malignant": 0.0}) == \
        pytest.approx(0.0, abs=1e-5)
    assert U.class_entropy(None) is None


# --------------------------------------------------------------------------- ranking and cache


@pytest.fixture
def image_files(tmp_path, synthetic_pairs):
    from PIL import Image

    images, _ = synthetic_pairs(4, size=(36, 44), seed=5)
    paths = []
    for i, im in enumerate(images):
        p = tmp_path / "imgs" / f"scan {i} é.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(im).save(p)
        paths.append(p)
    return paths


def _drain(gen):
    events = []
    while True:
        try:
            events.append(next(gen))
        except StopIteration as done:
            return events, done.value


def test_rank_iter_yields_progress_and_returns_the_ranking(image_files, tiny_checkpoint):
    cache = U.UncertaintyCache()
    events, ranking = _drain(U.rank_iter(image_files, tiny_checkpoint, cache=cache))
    assert events[0][0] == "status"
    progress = [e for e in events if e[0] == "progress"]
    assert [e[1] for e in progress] == [0, 1, 2, 3, 4] and {e[2] for e in progress} == {4}
    assert all(e[3].path == image_files[e[1] - 1] for e in progress[1:])
    scores = [e.score for e in ranking.entries]
    assert scores == sorted(scores, reverse=True) and len(set(ranking.order())) == 4
    from busseg.data.io import read_image

    model = inference.load_model(tiny_checkpoint)
    direct = {i: U.uncertainty_score(read_image(p), model)["score"]
              for i, p in enumerate(image_files)}
    assert {e.index: e.score for e in ranking.entries} == pytest.approx(direct)
    assert ranking.checkpoint == str(Path(tiny_checkpoint).resolve())
    assert ranking.complete and ranking.n_cached == 0 and len(cache) == 4


def test_cache_makes_reranking_free_and_follows_files(image_files, tiny_checkpoint,
                                                      tmp_path, monkeypatch):
    import torch

    from busseg.models import build_model, save_checkpoint

    cache = U.UncertaintyCache()
    first = U.rank(image_files, tiny_checkpoint, cache=cache)

    def boom(*a, **k):
        raise AssertionError("scored again although cached")

    monkeypatch.setattr(U, "uncertainty_score", boom)
    again = U.rank(image_files, tiny_checkpoint, cache=cache)
    assert again.n_cached == 4 and all(e.cached for e in again.entries)
    assert [e.score for e in again.entries] == [e.score for e in first.entries]
    monkeypatch.undo()

    # an image rewritten in place is scored again, the others come from the cache
    st = os.stat(image_files[1])
    os.utime(image_files[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert U.rank(image_files, tiny_checkpoint, cache=cache).n_cached == 3

    # another checkpoint: everything is scored again, with other numbers
    torch.manual_seed(1)
    other = save_checkpoint(
        tmp_path / "other", build_model({"base_channels": 4, "depth": 2}),
        {"preprocessing": {"input_size": [32, 32], "grey": True, "normalize": "zscore"}},
    )
    switched = U.rank(image_files, other, cache=cache)
    assert switched.n_cached == 0
    assert {e.index: e.score for e in switched.entries} != {
        e.index: e.score for e in first.entries
    }
    # the same checkpoint folder with rewritten weights counts as a new checkpoint
    w = Path(tiny_checkpoint) / "model.safetensors"
    st = os.stat(w)
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert U.rank(image_files, tiny_checkpoint, cache=cache).n_cached == 0
    # arrays are keyed by their content
    arr = U.image_key(np.zeros((3, 3), np.uint8))
    assert arr == U.image_key(np.zeros((3, 3), np.uint8)) != U.image_key(np.ones((3, 3), np.uint8))


def test_stop_returns_the_images_done(image_files, tiny_checkpoint):
    stop = threading.Event()
    gen = U.rank_iter(image_files, tiny_checkpoint, cache=False, stop=stop)
    while True:
        ev = next(gen)
        if ev[0] == "progress" and ev[1] == 2:
            stop.set()
            break
    with pytest.raises(StopIteration) as done:
        next(gen)
    ranking = done.value.value
    assert not ranking.complete and sorted(ranking.order()) == [0, 1]


def test_unreadable_image_is_listed_last_with_its_error(image_files, tiny_checkpoint, tmp_path):
    bad = tmp_path / "imgs" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    ranking = U.rank([bad, *image_files], tiny_checkpoint, cache=False)
    last = ranking.entries[-1]
    assert last.index == 0 and math.isnan(last.score) and "broken.png" in last.error
    out = U.write_ranking_csv(ranking, tmp_path / "r.csv")
    rows = list(csv.DictReader(out.open()))
    assert [r["rank"] for r in rows] == ["1", "2", "3", "4", ""]
    assert rows[-1]["error"] and rows[-1]["score"] == ""
    with pytest.raises(FileExistsError):
        U.write_ranking_csv(ranking, out)


def test_cache_file_round_trip_and_corrupt_file(image_files, tiny_checkpoint, tmp_path):
    path = tmp_path / "cache" / "u.json"
    cache = U.UncertaintyCache(path)
    U.rank(image_files, tiny_checkpoint, cache=cache)
    assert cache.save() == path
    reloaded = U.UncertaintyCache(path)
    assert len(reloaded) == 4
    assert U.rank(image_files, tiny_checkpoint, cache=reloaded).n_cached == 4
    path.write_text("{ not json")
    assert len(U.UncertaintyCache(path)) == 0  # a broken cache only costs time


def test_checkpoint_key_matches_load_model(tiny_checkpoint):
    model = inference.load_model(tiny_checkpoint)
    assert U.checkpoint_key(model) == U.checkpoint_key(tiny_checkpoint)
    assert U.checkpoint_key(Path(tiny_checkpoint) / "config.json") == U.checkpoint_key(
        tiny_checkpoint
    )
    from busseg.models import build_model

    assert U.checkpoint_key(build_model({"base_channels": 4, "depth": 2})) is None


# --------------------------------------------------------------------------- busseg rank


def test_cli_rank_busi_folder(fake_busi, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "ranking.csv"
    args = ["rank", str(fake_busi), "--out", str(out), "--checkpoint", str(tiny_checkpoint),
            "--cache", str(tmp_path / "c.json"), "--no-progress"]
    assert main(args) == 0
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["rank", "path", "score", "entropy", "flip_disagreement",
                             "class_entropy", "entropy_region", "cached", "error", "class"]
    assert len(rows) == 6 and [r["rank"] for r in rows] == ["1", "2", "3", "4", "5", "6"]
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert {Path(r["path"]).parent.name for r in rows} == {r["class"] for r in rows} == {
        "benign", "malignant", "normal"}
    assert not any("_mask" in r["path"] for r in rows)

    # never overwritten without --overwrite: exit 2, the file untouched
    before = (out.read_bytes(), out.stat().st_mtime_ns)
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out.read_bytes(), out.stat().st_mtime_ns) == before
    # with it: replaced, every score from the cache file
    assert main([*args, "--overwrite"]) == 0
    assert "6 from the cache" in capsys.readouterr().out
    assert [r["cached"] for r in csv.DictReader(out.open())] == ["1"] * 6


def test_cli_rank_plain_folder_files_and_errors(tmp_path, image_files, tiny_checkpoint, capsys):
    bad = image_files[0].parent / "broken.png"
    bad.write_bytes(b"")
    out = tmp_path / "r.csv"
    base = ["--checkpoint", str(tiny_checkpoint), "--no-cache", "--no-progress"]
    assert main(["rank", str(image_files[0].parent), str(image_files[1]), "--out", str(out),
                 *base]) == 1  # one unreadable image
    rows = list(csv.DictReader(out.open()))
    assert "class" not in rows[0]  # not a BUSI folder
    assert len(rows) == 5  # image_files[1] given twice, ranked once
    assert rows[-1]["path"].endswith("broken.png") and rows[-1]["rank"] == ""
    assert "broken.png" in capsys.readouterr().err
    assert main(["rank", str(tmp_path / "nope"), "--out", str(tmp_path / "x.csv"), *base]) == 2
    assert main(["rank", str(image_files[0]), "--out", str(tmp_path), *base]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main(["rank", str(image_files[0]), "--out", str(tmp_path / "y.csv"),
                 "--checkpoint", str(tmp_path / "no_ckpt"), "--no-cache"]) == 2
    assert not (tmp_path / "y.csv").exists()
