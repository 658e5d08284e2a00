import csv
import importlib.util
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from busseg.data.busi import BusiRecord, discover_busi
from busseg.data.splits import (
    SPLIT_COLUMNS,
    SPLITS,
    duplicate_groups,
    make_split,
    read_split_csv,
    select_split,
    split_summary,
    thumbnail_features,
    write_split_csv,
)

REPO = Path(__file__).resolve().parents[1]
SPLIT_CSV = REPO / "training" / "splits" / "busi.csv"


def _load_script(name):
    path = REPO / "training" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_script_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _records(labels):
    return [
        BusiRecord(
            name=f"{lab} ({i})",
            label=lab,
            image_path=Path(f"{lab}/{lab} ({i}).png"),
            mask_paths=(),
            rel_path=f"{lab}/{lab} ({i}).png",
        )
        for i, lab in enumerate(labels)
    ]


def _groups_span_one_split(rows):
    seen = defaultdict(set)
    for r in rows:
        seen[r["group"]].add(r["split"])
    return {g: s for g, s in seen.items() if len(s) > 1}


# ---------------------------------------------------------------- the shipped split file


def test_shipped_split_file():
    rows = read_split_csv(SPLIT_CSV)
    with open(SPLIT_CSV, newline="") as fh:
        assert tuple(next(csv.reader(fh))) == SPLIT_COLUMNS
    assert len(rows) == 780
    assert len({r["image"] for r in rows}) == 780
    totals = Counter(r["label"] for r in rows)
    assert totals == {"benign": 437, "malignant": 210, "normal": 133}
    summary = split_summary(rows)
    for split, share in zip(SPLITS, (0.70, 0.15, 0.15), strict=True):
        for label, n in totals.items():
            frac = summary[split][label] / n
            assert abs(frac - share) < 0.03, (split, label, frac)
    assert _groups_span_one_split(rows) == {}
    by_image = {r["image"]: r for r in rows}
    a, b = by_image["benign/benign (433).png"], by_image["malignant/malignant (145).png"]
    assert a["group"] == b["group"]  # byte-identical files filed under two classes
    assert a["split"] == b["split"]
    assert all(r["label"] == r["image"].split("/")[0] for r in rows)


@pytest.mark.realdata
def test_shipped_split_matches_the_real_dataset(busi_index):
    rows = read_split_csv(SPLIT_CSV)
    parts = {s: select_split(busi_index, rows, s) for s in SPLITS}
    assert sum(len(p) for p in parts.values()) == 780
    assert len(parts["train"]) == 545 and len(parts["val"]) == 118
    names = [{r.rel_path for r in p} for p in parts.values()]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    both = select_split(busi_index, rows, ["train", "val"])
    assert len(both) == len(parts["train"]) + len(parts["val"])


@pytest.mark.slow
@pytest.mark.realdata
def test_make_split_script_reproduces_the_shipped_split(busi_root, tmp_path, capsys):
    out = tmp_path / "busi.csv"
    assert _load_script("make_split").main(["--data", str(busi_root), "--out", str(out)]) == 0
    assert out.read_bytes() == SPLIT_CSV.read_bytes()
    assert "590 groups" in capsys.readouterr().out


# ---------------------------------------------------------------- make_split


def test_make_split_is_deterministic_stratified_and_keeps_groups_whole():
    rng = np.random.default_rng(0)
    labels = ["benign"] * 120 + ["malignant"] * 60 + ["normal"] * 40
    records = _records(labels)
    groups = np.arange(len(records))
    for _ in range(30):  # merge random pairs of same-class images into groups
        i, j = rng.integers(0, len(records), 2)
        if labels[i] == labels[j]:
            groups[groups == groups[j]] = groups[i]
    rows = make_split(records, groups, seed=3)
    assert rows == make_split(records, groups, seed=3)
    assert rows != make_split(records, groups, seed=4)
    assert [r["image"] for r in rows] == [r.rel_path for r in records]
    assert _groups_span_one_split(rows) == {}
    summary = split_summary(rows)
    for split, share in zip(SPLITS, (0.70, 0.15, 0.15), strict=True):
        for label, n in Counter(labels).items():
            assert abs(summary[split][label] / n - share) < 0.06, (split, label)


def test_make_split_keeps_a_cross_class_group_whole():
    labels = ["benign"] * 20 + ["malignant"] * 10 + ["normal"] * 10
    groups = list(range(40))
    groups[20] = groups[30] = 0  # one frame filed as benign, malignant and normal
    for seed in range(20):
        rows = make_split(_records(labels), groups, seed=seed)
        assert rows[0]["split"] == rows[20]["split"] == rows[30]["split"]
        assert [r["label"] for r in rows] == labels  # each image keeps its own label


def test_make_split_validates_its_inputs():
    records = _records(["benign"] * 3)
    with pytest.raises(ValueError, match="group ids"):
        make_split(records, [0, 1])
    with pytest.raises(ValueError, match="sum"):
        make_split(records, [0, 1, 2], fractions=(0.5, 0.2, 0.2))


# ---------------------------------------------------------------- near-duplicate groups


def _speckle(rng, size=128):
    base = rng.gamma(2.0, 60.0, size=(size // 4, size // 4))
    img = np.kron(base, np.ones((4, 4))) * rng.gamma(6.0, 1 / 6.0, size=(size, size))
    return np.clip(img, 0, 255).astype(np.uint8)


def test_duplicate_groups_links_a_noised_copy_not_an_unrelated_image(tmp_path):
    rng = np.random.default_rng(7)
    a, unrelated = _speckle(rng), _speckle(rng)
    # a re-capture: other gain and offset, fresh noise
    noisy = np.clip(0.9 * a + 10 + rng.normal(0, 25, a.shape), 0, 255).astype(np.uint8)
    rgb_copy = np.repeat(a[..., None], 3, axis=-1)  # the same frame saved as RGB
    paths = []
    for name, arr in [("a", a), ("noisy", noisy), ("unrelated", unrelated), ("rgb", rgb_copy)]:
        paths.append(tmp_path / f"{name}.png")
        Image.fromarray(arr).save(paths[-1])
    feats = thumbnail_features(paths)
    assert feats.shape == (4, 64 * 64)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-6)
    corr = feats @ feats.T
    assert corr[0, 1] > 0.8 and corr[0, 3] > 0.999 and abs(corr[0, 2]) < 0.2
    groups = duplicate_groups(feats, threshold=0.4)
    assert groups.dtype == np.int64
    assert groups[0] == groups[1] == groups[3] != groups[2]


def test_duplicate_groups_are_connected_components():
    # a-b and b-c linked, c-d not: a, b, c form one group through b
    f = np.array([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.28, 0.96, 0.0], [0.0, 0.0, 1.0]])
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    g = duplicate_groups(f, threshold=0.5)
    assert g[0] == g[1] == g[2] != g[3]
    assert sorted(set(g.tolist())) == [0, 1]


# ---------------------------------------------------------------- CSV files and selection


def test_split_csv_round_trip_and_validation(tmp_path):
    rows = [{"image": "benign/benign (1).png", "label": "benign", "group": 4, "split": "val"}]
    p = write_split_csv(tmp_path / "s.csv", rows)
    assert read_split_csv(p) == rows
    (tmp_path / "bad.csv").write_text("image,label,group,split\nx.png,benign,0,holdout\n")
    with pytest.raises(ValueError, match="holdout"):
        read_split_csv(tmp_path / "bad.csv")
    (tmp_path / "cols.csv").write_text("image,label\nx.png,benign\n")
    with pytest.raises(ValueError, match="group"):
        read_split_csv(tmp_path / "cols.csv")


def test_select_split_checks_the_split_belongs_to_the_data(fake_busi, tmp_path):
    index = discover_busi(fake_busi)
    rows = make_split(index.records, list(range(len(index))), fractions=(0.5, 0.25, 0.25))
    chosen = select_split(index, rows, ["train", "val", "test"])
    assert len(chosen) == len(index)
    with pytest.raises(ValueError, match="not in the split file"):
        select_split(index, rows[1:], "train")
    extra = rows + [
        {"image": "benign/benign (99).png", "label": "benign", "group": 99, "split": "train"}
    ]
    with pytest.raises(ValueError, match="missing from"):
        select_split(index, extra, "train")


def test_select_split_skips_unusable_records(make_fake_busi):
    index = discover_busi(make_fake_busi(edge_cases=True))
    rows = make_split(index.records, list(range(len(index))), fractions=(1.0, 0.0, 0.0))
    chosen = select_split(index, rows, "train")
    assert len(chosen) == len(index.usable) == len(index) - 2


def test_make_split_script_on_a_fake_tree(fake_busi, tmp_path, capsys):
    out = tmp_path / "fake.csv"
    assert _load_script("make_split").main(["--data", str(fake_busi), "--out", str(out)]) == 0
    rows = read_split_csv(out)
    assert sorted(r["image"] for r in rows) == sorted(r.rel_path for r in discover_busi(fake_busi))
    assert f"wrote {out}" in capsys.readouterr().out
