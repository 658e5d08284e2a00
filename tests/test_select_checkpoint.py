"""training/select_checkpoint.py: the rule (interactions first, Dice guards)."""

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def select():
    spec = importlib.util.spec_from_file_location(
        "busseg_select", REPO / "training/select_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(name, inter, busi=0.78, uclm=0.68, bra=0.77):
    return {"checkpoint": name, "val_interactions": inter, "val_interactions_busi": inter,
            "val_interactions_busuclm": inter, "val_never_converged": 0, "val_accepted": 1,
            "dice_busi_val": busi, "dice_busuclm_val": uclm, "dice_busbra": bra}


def test_fewest_interactions_among_those_that_pass_the_guards(select):
    base = _row("base", 3.8)
    rows = [_row("a", 3.0, bra=0.76),          # fewest, but below the BUS-BRA floor
            _row("b", 3.4, busi=0.76),         # BUSI val Dice drops 0.02 > 0.01
            _row("c", 3.6), _row("d", 3.5, uclm=0.675)]
    chosen = select.choose(rows, base, max_drop=0.01, busbra_floor=0.77)
    assert chosen["checkpoint"] == "d"
    assert [r["passes"] for r in rows] == [False, False, True, True]
    text = select.render(rows, base, chosen, type("A", (), {
        "run": "runs/x", "base": "base", "max_dice_drop": 0.01})(), 0.77)
    assert "| d **(chosen)** | 3.50" in text and "| a | 3.00" in text


def test_the_base_stays_when_nothing_is_cheaper_and_safe(select):
    base = _row("base", 3.0)
    rows = [_row("a", 3.2), _row("b", 2.5, bra=0.70)]
    assert select.choose(rows, base, 0.01, 0.77) is base
