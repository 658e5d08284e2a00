"""The training curves of a run folder: ``curves.png`` drawn from the validation history."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

#: Least seconds between two redraws of a run's ``curves.png`` (it is always drawn at the end).
CURVES_EVERY_S = 60.0


def write_curves(rows: list[dict], path: Path) -> None:
    """Draw loss and Dice per epoch into a PNG, replacing ``path`` atomically.

    Parameters
    ----------
    rows : list of dict
        The validation history (``busseg.engine.LOG_COLUMNS``): ``epoch``, ``train_loss``,
        ``val_loss``, ``val_dice`` and ``val_dice_lesion`` are drawn. Nothing is written
        when it is empty.
    path : pathlib.Path
        The PNG to write (900 x 340 pixels); a reader never sees a half-written file.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if not rows:
        return
    ep = [r["epoch"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    a1.plot(ep, [r["train_loss"] for r in rows], label="train")
    if any(np.isfinite(r["val_loss"]) for r in rows):
        a1.plot(ep, [r["val_loss"] for r in rows], label="validation")
    a1.set_xlabel("epoch")
    a1.set_ylabel("loss")
    a1.legend()
    a2.plot(ep, [r["val_dice"] for r in rows], label="all validation images")
    a2.plot(ep, [r["val_dice_lesion"] for r in rows], label="images with a lesion")
    a2.set_xlabel("epoch")
    a2.set_ylabel("mean Dice")
    a2.set_ylim(0, 1)
    a2.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
