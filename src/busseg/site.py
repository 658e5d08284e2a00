"""Site checkpoints: weights adapted to the annotator's hospital, prompts that never pay.

A fine-tune on the scans of one site (learning as you go, the Fine-tune widget) adapts a
whole network to that site. Used for everything, such a network tends to forget part of its
box-and-click skill, and at a site whose answers are mostly normal scans it learns timidity:
fewer lesion masks are accepted as they stand. A **site checkpoint** keeps both networks in
one folder, so that every API, the CLI and the widgets get the adapted behaviour without new
arguments:

``<checkpoint>/config.json``, ``model.safetensors``
    The adapted network (a complete checkpoint; :func:`busseg.models.load_checkpoint` loads
    it alone, e.g. to fine-tune it further). Its ``config.json`` has a ``"site"`` section.
``<checkpoint>/base/config.json``, ``base/model.safetensors``
    The network it was adapted from (a copy: the folder is self-contained).

The ``"site"`` section says which network does what:

``automatic``
    ``"vote"``: the base network draws the automatic mask and the adapted network decides
    which of its regions (8-connected components) stay: a region is kept when the adapted
    network's own automatic mask (its threshold and normal-scan gate) overlaps it. The
    site's normal scans lose their false regions while the lesion masks keep the base's
    outline. ``"adapted"``: the adapted network draws the automatic mask.
``prompts``
    ``"base"`` or ``"adapted"``: which network answers box and click prompts (chosen on the
    held-out recorded cases: the adapted one only when it costs no more interactions).

:func:`busseg.inference.load_model` returns a :class:`SiteModel` for such a folder: one
``torch.nn.Module`` that routes each image of a batch by whether it carries prompts (all-zero
guidance channels = automatic mode), so :func:`busseg.inference.predict`, the jobs, the
uncertainty ranking and the evaluation all see one model.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "AUTOMATIC_MODES",
    "BASE_DIRNAME",
    "PROMPT_SOURCES",
    "SITE_KEY",
    "SiteModel",
    "drawing_base",
    "is_site_checkpoint",
    "make_site_checkpoint",
    "site_settings",
]

#: Key of the site section in a checkpoint's ``config.json``.
SITE_KEY = "site"
#: Sub-folder holding the base network of a site checkpoint.
BASE_DIRNAME = "base"
#: Who draws the automatic mask.
AUTOMATIC_MODES = ("vote", "adapted")
#: Who answers box and click prompts.
PROMPT_SOURCES = ("base", "adapted")
#: Logit given to the pixels of a region the vote removes (probability ~1e-13).
_REMOVED_LOGIT = -30.0


def site_settings(config: Mapping[str, Any]) -> dict | None:
    """Return a checkpoint config's validated site section, or None for a plain checkpoint.

    Parameters
    ----------
    config : mapping
        A checkpoint's ``config.json`` as a dict.

    Returns
    -------
    dict or None
        ``{"automatic": "vote" | "adapted", "prompts": "base" | "adapted", ...}``.

    Raises
    ------
    ValueError
        If the section names an unknown mode (the message lists the known ones).
    """
    site = config.get(SITE_KEY)
    if not site:
        return None
    if not isinstance(site, Mapping):
        raise ValueError(f"the checkpoint's {SITE_KEY!r} section must be a JSON object, "
                         f"got {type(site).__name__}")
    automatic, prompts = site.get("automatic"), site.get("prompts")
    if automatic not in AUTOMATIC_MODES:
        raise ValueError(f"site checkpoint: 'automatic' must be one of {AUTOMATIC_MODES}, "
                         f"got {automatic!r}")
    if prompts not in PROMPT_SOURCES:
        raise ValueError(f"site checkpoint: 'prompts' must be one of {PROMPT_SOURCES}, "
                         f"got {prompts!r}")
    return dict(site)


def is_site_checkpoint(path: str | os.PathLike) -> bool:
    """Tell whether a checkpoint folder is a site checkpoint (torch-free; False if unreadable)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and bool(config.get(SITE_KEY))


def drawing_base(path: str | os.PathLike | None) -> Path | None:
    """Return the plain checkpoint a site checkpoint was adapted from (torch-free).

    Parameters
    ----------
    path : path or None
        A checkpoint folder; None is the shipped default model.

    Returns
    -------
    pathlib.Path or None
        ``path/base`` for a site checkpoint, ``path`` itself for a plain one, None for None.
        Site fine-tunes always start from this network, so adapting twice never stacks.
    """
    if path is None:
        return None
    p = Path(path)
    if p.is_file():
        p = p.parent
    return p / BASE_DIRNAME if is_site_checkpoint(p) else p


def _atomic_copy_dir(src: Path, dst: Path) -> None:
    """Copy the two checkpoint files of ``src`` into a new folder ``dst`` (whole or not at all)."""
    if dst.exists():
        raise FileExistsError(f"{dst} exists; a site checkpoint is written once")
    tmp = dst.with_name(f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        for name in ("config.json", "model.safetensors"):
            shutil.copyfile(src / name, tmp / name)
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def make_site_checkpoint(adapted: str | os.PathLike, base: str | os.PathLike | None, *,
                         automatic: str = "vote", prompts: str = "base",
                         info: Mapping[str, Any] | None = None) -> Path:
    """Turn a fine-tuned checkpoint folder into a site checkpoint (in place).

    The base network is copied into ``adapted/base`` first; the ``"site"`` section is then
    added to ``adapted/config.json`` atomically, so a crash leaves either the plain fine-tuned
    checkpoint or the complete site checkpoint, both loadable.

    Parameters
    ----------
    adapted : path
        The fine-tuned checkpoint folder (from :func:`busseg.finetune.finetune_iter`).
    base : path or None
        The checkpoint it was fine-tuned from (None: the shipped default model). For a site
        checkpoint its own base network is used (:func:`drawing_base`).
    automatic : {"vote", "adapted"}
        Who draws the automatic mask (module docstring).
    prompts : {"base", "adapted"}
        Who answers box and click prompts.
    info : mapping, optional
        Extra JSON-serialisable facts recorded in the section (e.g. the prompt costs that
        chose ``prompts``).

    Returns
    -------
    pathlib.Path
        The site checkpoint folder (``adapted``).

    Raises
    ------
    ValueError
        If a mode is unknown, or ``adapted`` is a site checkpoint already.
    FileNotFoundError
        If a checkpoint file is missing.
    """
    from busseg.data.io import atomic_write_bytes

    if automatic not in AUTOMATIC_MODES:
        raise ValueError(f"automatic must be one of {AUTOMATIC_MODES}, got {automatic!r}")
    if prompts not in PROMPT_SOURCES:
        raise ValueError(f"prompts must be one of {PROMPT_SOURCES}, got {prompts!r}")
    adapted = Path(adapted)
    config_path = adapted / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get(SITE_KEY):
        raise ValueError(f"{adapted} is a site checkpoint already")
    if base is None:
        from busseg.models import default_checkpoint_path

        base_dir = default_checkpoint_path()
    else:
        base_dir = drawing_base(base)
    if not (base_dir / "model.safetensors").is_file():
        raise FileNotFoundError(f"{base_dir} has no model.safetensors; cannot copy the base")
    target = adapted / BASE_DIRNAME
    if not target.exists():
        _atomic_copy_dir(base_dir, target)
    config[SITE_KEY] = {"automatic": automatic, "prompts": prompts, "base": BASE_DIRNAME,
                        "base_model": str(base_dir.resolve()), **dict(info or {})}
    atomic_write_bytes(config_path, json.dumps(config, indent=2).encode(), overwrite=True)
    return adapted


def _gate_says_normal(prob: Any, class_proba: Any, gate: Mapping[str, Any] | None) -> Any:
    """(N,) bool: the adapted network's normal-scan gate empties its mask."""
    import torch

    n = prob.shape[0]
    if gate is None or class_proba is None:
        return torch.zeros(n, dtype=torch.bool, device=prob.device)
    normal = class_proba[:, 0] >= float(gate["p_normal"])
    conf = float(gate.get("lesion_confidence", 1.0 + 1e-9))
    return normal & (prob.flatten(1).amax(1) < conf)


class SiteModel:
    """Placeholder replaced by :func:`_site_model_class` (keeps this module torch-free)."""

    def __new__(cls, *args: Any, **kwargs: Any):  # noqa: D102 - documented below
        return _site_model_class()(*args, **kwargs)


def _site_model_class():
    """Build the torch class lazily: ``import busseg.site`` must not import torch."""
    global _SITE_CLASS
    if _SITE_CLASS is not None:
        return _SITE_CLASS
    import torch
    from scipy import ndimage
    from torch import nn

    class _SiteModel(nn.Module):
        """A base and an adapted network as one model (see :mod:`busseg.site`).

        Parameters
        ----------
        adapted, base : torch.nn.Module
            The two networks (same input channels and class head).
        automatic : {"vote", "adapted"}
            Who draws the automatic mask.
        prompts : {"base", "adapted"}
            Who answers prompts.
        base_threshold, adapted_threshold : float
            Probability thresholds of each network's automatic mask, in (0, 1).
        adapted_gate : dict, optional
            The adapted network's normal-scan gate (``p_normal``, ``lesion_confidence``):
            when it empties the adapted mask, the vote removes every region.

        Notes
        -----
        ``forward(x, with_class=False)`` takes (N, C, h, w) like the base network. Images
        whose guidance channels are all zero are automatic: "vote" runs both networks and
        sets the logits of the base's rejected regions to -30; "adapted" runs the adapted
        network. The others go to the prompt network. Class logits come from the network
        that drew the mask.
        """

        def __init__(self, adapted: nn.Module, base: nn.Module, *, automatic: str = "vote",
                     prompts: str = "base", base_threshold: float = 0.5,
                     adapted_threshold: float = 0.5,
                     adapted_gate: Mapping[str, Any] | None = None) -> None:
            super().__init__()
            if automatic not in AUTOMATIC_MODES:
                raise ValueError(f"automatic must be one of {AUTOMATIC_MODES}")
            if prompts not in PROMPT_SOURCES:
                raise ValueError(f"prompts must be one of {PROMPT_SOURCES}")
            self.adapted = adapted
            self.base = base
            self.automatic = automatic
            self.prompts = prompts
            self.base_threshold = float(base_threshold)
            self.adapted_threshold = float(adapted_threshold)
            self.adapted_gate = dict(adapted_gate) if adapted_gate else None
            self.in_channels = int(getattr(base, "in_channels", 1))
            self.num_classes = int(getattr(base, "num_classes", 0))
            self.depth = getattr(base, "depth", None)

        def _run(self, net: nn.Module, x: torch.Tensor, with_class: bool):
            if with_class and self.num_classes:
                return net(x, with_class=True)
            return net(x), None

        def _vote(self, x: torch.Tensor, with_class: bool):
            logits, cls = self._run(self.base, x, with_class)
            a_logits, a_cls = self._run(self.adapted, x, bool(self.adapted_gate) and
                                        bool(self.num_classes))
            a_prob = torch.sigmoid(a_logits.float())
            a_mask = a_prob >= self.adapted_threshold
            a_mask[_gate_says_normal(a_prob, None if a_cls is None else
                                     torch.softmax(a_cls.float(), 1), self.adapted_gate)] = False
            b_mask = (torch.sigmoid(logits.float()) >= self.base_threshold).cpu().numpy()
            a_np = a_mask.cpu().numpy()
            removed = np.zeros_like(b_mask)
            structure = np.ones((3, 3), bool)
            for i in range(b_mask.shape[0]):
                lab, n = ndimage.label(b_mask[i, 0], structure=structure)
                if not n:
                    continue
                votes = np.bincount(lab[a_np[i, 0]].ravel(), minlength=n + 1)[1:] > 0
                removed[i, 0] = ~np.concatenate([[True], votes])[lab]
            if removed.any():
                logits = logits.masked_fill(torch.from_numpy(removed).to(logits.device),
                                            _REMOVED_LOGIT)
            return logits, cls

        def _automatic(self, x: torch.Tensor, with_class: bool):
            if self.automatic == "adapted":
                return self._run(self.adapted, x, with_class)
            return self._vote(x, with_class)

        def forward(self, x: torch.Tensor, with_class: bool = False):
            if x.shape[1] > 1:
                auto = x[:, 1:].flatten(1).abs().amax(1) == 0
            else:
                auto = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
            prompt_net = self.base if self.prompts == "base" else self.adapted
            if bool(auto.all()):
                logits, cls = self._automatic(x, with_class)
            elif not bool(auto.any()):
                logits, cls = self._run(prompt_net, x, with_class)
            else:
                la, ca = self._automatic(x[auto], with_class)
                lp, cp = self._run(prompt_net, x[~auto], with_class)
                logits = la.new_empty((x.shape[0], *la.shape[1:]))
                logits[auto], logits[~auto] = la, lp.to(la.dtype)
                cls = None
                if ca is not None and cp is not None:
                    cls = ca.new_empty((x.shape[0], *ca.shape[1:]))
                    cls[auto], cls[~auto] = ca, cp.to(ca.dtype)
            return (logits, cls) if with_class and self.num_classes else logits

    _SITE_CLASS = _SiteModel
    return _SITE_CLASS


_SITE_CLASS = None


def load_site_model(directory: str | os.PathLike, adapted: Any, config: Mapping[str, Any],
                    device: Any) -> Any:
    """Wrap a site checkpoint's adapted network with its base network.

    Parameters
    ----------
    directory : path
        The site checkpoint folder.
    adapted : torch.nn.Module
        Its adapted network, loaded from the folder (eval mode).
    config : mapping
        The folder's ``config.json``.
    device : str or torch.device
        Where to load the base network.

    Returns
    -------
    torch.nn.Module
        A :class:`SiteModel` in eval mode.

    Raises
    ------
    busseg.models.CheckpointError
        If ``base/`` is missing or corrupt, or the site section is invalid.
    """
    from busseg.models import CheckpointError, load_checkpoint

    try:
        site = site_settings(config)
    except ValueError as exc:
        raise CheckpointError(f"{directory}: {exc}") from exc
    base_dir = Path(directory) / str(site.get("base", BASE_DIRNAME))
    if not base_dir.is_dir():
        raise CheckpointError(
            f"{directory} is a site checkpoint but its base network {base_dir} is missing; "
            "copy the whole folder, or load the adapted network alone with "
            "busseg.models.load_checkpoint")
    base, base_cfg = load_checkpoint(base_dir, device=device)
    inf_a = config.get("inference", {})
    inf_b = base_cfg.get("inference", {})
    model = SiteModel(adapted, base, automatic=site["automatic"], prompts=site["prompts"],
                      base_threshold=float(inf_b.get("threshold", 0.5)),
                      adapted_threshold=float(inf_a.get("threshold", 0.5)),
                      adapted_gate=inf_a.get("normal_gate"))
    return model.eval()
