"""The annotation session: a simulated annotator works through a new site's scans.

Usage (from the repository root)::

    python benchmarks/annotation_session.py --threads 1 --jobs 2
    python benchmarks/annotation_session.py --limit 30 --out-dir /tmp/bench   # a dev run

The stream, in its natural mix (normal scans included): the scans of the BUS-UCLM **test
patients** of ``training/splits/busuclm.csv`` (``--busuclm``, ``--busuclm-split``; scans whose
image and mask differ in size are skipped and listed), then **BUS-BRA fold 1** (``--busbra``;
``--busbra-limit`` keeps its first N scans). Each arm drives one
:class:`busseg.session.AnnotationSession` (the object the Scan browser displays) through the
stream: ``goto`` (records the previous case as accepted, corrected, brushed or normal),
``predict`` (the automatic mask, default settings, normal-scan gate included), ``set_mask``
/ ``mark_no_lesion``, and with learning
as you go ``run_due_finetune`` (after every ``--learn-every`` new corrections, a fine-tune
of the current checkpoint on all corrections so far, adopted when the simulated annotator
below, run on the held-out corrections with the current and the new checkpoint, does not
need more interactions per scan with the new one, whatever the Dice says).

The simulated annotator, per scan (ground truth = the dataset's expert mask):

1. **Accept** the automatic mask when its IoU with the truth is >= 0.85 (``--accept-iou``);
   a normal scan (empty truth) when the automatic mask is empty. 0 interactions; nothing is
   saved (an unedited prediction is not a correction).
2. **Normal scan with a false region**: "no lesion" (clear), 1 interaction; saved as a
   normal scan (empty mask).
3. **Otherwise** one box per lesion (8-connected component of the truth, each side moved by up
   to 10 % of the box's side, ``--jitter``; one interaction each). The mask becomes the prompt
   model's prediction for the boxes (restricted to the boxes grown by 10 %); when the automatic
   mask has false regions outside the grown boxes the annotator clears them first (select all,
   delete: one interaction, however many regions). Then clicks from the project's click
   simulator (:func:`busseg.prompts.next_click`: deepest point of the larger error region
   inside the grown boxes, where the widget takes clicks), each given with the boxes kept, all
   clicks so far and the current mask as ``previous_mask``, until IoU >= 0.85. When 20
   interactions (``--max-interactions``; boxes and the clear included) do not get there, the
   scan counts 20 and the annotator brushes it: the saved correction is the truth. Otherwise
   the saved correction is the prompted mask.

Arms: learning as you go on and off (``--learn``) x file order and uncertainty order
(``--orders``; :func:`busseg.uncertainty.rank` with the starting checkpoint, most uncertain
first, within each site, so BUS-UCLM still comes before BUS-BRA), and with
``--region-filter on,off`` the checkpoint's region filter (:mod:`busseg.region_filter`) on
and off in the automatic masks (``--no-region-filter``: off only). Box jitter is drawn per
scan from ``(--seed, the scan's position in the stream)``, so every arm sees the same boxes.
A fine-tune runs to its end before the next scan opens (in the app it runs in the
background, during the next one or two scans).

Reports interactions per scan per block of 10 scans and overall, per site and per kind of
scan, fine-tune compute time; plots interactions per scan against scans annotated. Writes
``annotation_session.{md,json,png}`` to ``--out-dir`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

NAME = "annotation_session"
BLOCK = 10
#: Scans per block of the per-block report (interactions, lesion / normal means, accepted
#: share, false regions on the normal scans still to come).
REPORT_BLOCK = 25
ORDERS = ("file", "uncertainty")
#: Streams: "legacy" = BUS-UCLM test patients then BUS-BRA fold 1; "busuclm-all" = all
#: of busuclm-dev in patient order; "busbra" = BUS-BRA fold 1 in file (patient) order.
STREAMS = ("legacy", "busuclm-all", "busbra")
#: Learning arms: what learning as you go writes (busseg.session.SITE_MODES).
SITE_ARMS = ("vote", "adapted", "whole")
#: Answers after which the false-region rate of the model then in use is reported too.
FALSE_REGION_AT = 20
#: Measured cost of one learning-as-you-go fine-tune on this project's 2-core host (s).
FINETUNE_SECONDS_ESTIMATE = 25.0


# --------------------------------------------------------------------------- the annotator

# the annotator: one implementation in the core (busseg.annotator)
from busseg.annotator import (  # noqa: E402
    ACCEPT_IOU,
    BOX_MARGIN,
    MAX_INTERACTIONS,
    annotate_scan,
    model_prompt,
)

# --------------------------------------------------------------------------- aggregation


def block_means(values: Sequence[float], block: int = BLOCK) -> list[dict]:
    """Mean of ``values`` per block of ``block`` consecutive entries (the last may be short).

    Returns
    -------
    list of dict
        ``{"first": 1-based position of the block's first scan, "last": ..., "n": ...,
        "mean": ..., "total": ...}``.
    """
    if block < 1:
        raise ValueError(f"block must be at least 1, got {block}")
    out = []
    for i in range(0, len(values), block):
        chunk = [float(v) for v in values[i:i + block]]
        out.append({"first": i + 1, "last": i + len(chunk), "n": len(chunk),
                    "mean": float(np.mean(chunk)), "total": float(np.sum(chunk))})
    return out


def summarise_arm(scans: Sequence[dict], finetunes: Sequence[dict]) -> dict:
    """Totals and means of one arm (interactions per scan overall, per site and kind)."""
    def mean_of(sel):
        vals = [s["interactions"] for s in sel]
        return float(np.mean(vals)) if vals else math.nan

    inter = [s["interactions"] for s in scans]
    out: dict[str, Any] = {
        "n": len(scans),
        "interactions": int(sum(inter)),
        "per_scan": mean_of(scans),
        "lesion_per_scan": mean_of([s for s in scans if s["lesion"]]),
        "normal_per_scan": mean_of([s for s in scans if not s["lesion"]]),
        "kinds": {k: sum(s["kind"] == k for s in scans)
                  for k in ("accepted", "cleared", "prompted", "brushed")},
        "boxes": int(sum(s["boxes"] for s in scans)),
        "erases": int(sum(s["erases"] for s in scans)),
        "clicks": int(sum(s["clicks"] for s in scans)),
        "sites": {},
        "blocks": block_means(inter),
        "finetunes": len(finetunes),
        "finetunes_adopted": int(sum(bool(f["adopted"]) for f in finetunes)),
        "finetune_seconds": float(sum(f["seconds"] for f in finetunes)),
        "finetune_seconds_mean": (float(np.mean([f["seconds"] for f in finetunes]))
                                  if finetunes else math.nan),
    }
    for site in dict.fromkeys(s["site"] for s in scans):
        sel = [s for s in scans if s["site"] == site]
        out["sites"][site] = {
            "n": len(sel), "interactions": int(sum(s["interactions"] for s in sel)),
            "per_scan": mean_of(sel),
            "lesion_per_scan": mean_of([s for s in sel if s["lesion"]]),
            "normal_per_scan": mean_of([s for s in sel if not s["lesion"]]),
            "n_normal": sum(not s["lesion"] for s in sel),
            "blocks": block_means([s["interactions"] for s in sel]),
        }
    return out


# --------------------------------------------------------------------------- the stream


def build_stream(args) -> tuple[list, list[str], list[dict], dict[str, int]]:
    """(records, site of each, skipped, untruncated scans per site) in file order."""
    from busseg.data import discover

    recs: list = []
    sites: list[str] = []
    skipped: list[dict] = []
    full: dict[str, int] = {}
    stream = getattr(args, "stream", "legacy")
    if stream == "busuclm-all":
        root = C.require_dir(args.busuclm, "BUS-UCLM", "--busuclm")
        index = discover(root)
        uclm = sorted((r for r in index.records if r.usable),
                      key=lambda r: (str(r.group), r.rel_path))  # patient order
        skipped += [{"image": r.rel_path, "label": r.label, "problems": list(r.problems)}
                    for r in index.records if not r.usable]
        full["BUS-UCLM all"] = len(uclm)
        recs, sites = uclm, ["BUS-UCLM all"] * len(uclm)
    elif stream == "busbra":
        args.no_busuclm = True
    if stream == "busuclm-all":
        pass
    elif not args.no_busuclm:
        uclm, skipped = C.split_records(args.busuclm, args.busuclm_split, "test")
        full["BUS-UCLM test"] = len(uclm)
        recs += uclm
        sites += ["BUS-UCLM test"] * len(uclm)
    if not args.no_busbra and stream != "busuclm-all":
        root = C.require_dir(args.busbra, "BUS-BRA", "--busbra")
        index = discover(root)
        bra = [r for r in index.records if r.usable]
        skipped += [{"image": r.rel_path, "label": r.label, "problems": list(r.problems)}
                    for r in index.records if not r.usable]
        full["BUS-BRA fold 1"] = len(bra)
        if args.busbra_limit is not None:
            bra = bra[: args.busbra_limit]
        recs += bra
        sites += ["BUS-BRA fold 1"] * len(bra)
    if args.limit is not None:
        recs, sites = recs[: args.limit], sites[: args.limit]
    if not recs:
        raise SystemExit("the stream is empty; check --busuclm/--busbra and --limit")
    return recs, sites, skipped, full


def uncertainty_order(records: Sequence, sites: Sequence[str], checkpoint: Path,
                      device: str) -> tuple[list[int], list[float]]:
    """Stream positions most uncertain first within each site (sites keep their order)."""
    from busseg.inference import load_model
    from busseg.uncertainty import rank

    model = load_model(checkpoint, device=device)
    order: list[int] = []
    scores = [math.nan] * len(records)
    for site in dict.fromkeys(sites):
        idx = [i for i, s in enumerate(sites) if s == site]
        ranking = rank([records[i].image_path for i in idx], model, cache=False,
                       device=device)
        for e in ranking.entries:
            scores[idx[e.index]] = e.score if e.score is not None else math.nan
        order += [idx[i] for i in ranking.order()]
    return order, scores


def _site_prediction(session, case, spec: dict, site_filter):
    """The automatic mask with the session's refitted region filter (the "site" arm).

    One forward pass (:func:`busseg.inference.predict`, gate on, filter off) gives the
    unfiltered mask; its components' features are kept for the refit; the filter (the
    checkpoint's, or its refit on this session's decisions so far) is applied and the result
    recorded as the case's prediction (:meth:`AnnotationSession.set_prediction`), as
    :meth:`AnnotationSession.predict` would with that filter.

    Returns (mask, component labels (H, W) int32, features (n, 19), filter in use).
    """
    from busseg.inference import load_model, predict
    from busseg.region_filter import component_features, label_components, resolve_filter

    model = load_model(session.checkpoint, device=spec["device"])
    if site_filter is None:
        site_filter = resolve_filter("auto", model.busseg_config)
    raw = predict(case.image, model, region_filter=None)
    lab, n = label_components(raw.mask)
    feats = component_features(raw.mask, raw.proba, case.image, raw.class_proba, (lab, n))
    mask = raw.mask
    if site_filter is not None and n:
        keep = site_filter.scores(feats) >= site_filter.threshold
        mask = raw.mask & np.concatenate([[False], keep])[lab]
    session.set_prediction(mask)
    return mask, lab, feats, site_filter


def false_region_rate(session, positions: Sequence[int], records: Sequence, order: Sequence[int],
                      spec: dict, cache: dict, calibration=None) -> float:
    """Share of the given stream positions (normal scans) whose automatic mask has a region.

    The session's current checkpoint predicts each scan once (``cache``: checkpoint ->
    position -> bool), with the arm's region-filter setting; NaN without positions.
    """
    from busseg.data.io import read_image
    from busseg.inference import load_model, predict_mask

    if not positions:
        return math.nan
    key = str(session.checkpoint) if session.checkpoint is not None else "default"
    model = None
    kw = {} if spec.get("region_filter", True) else {"region_filter": None}
    if calibration is not None and calibration.changed:
        model = load_model(session.checkpoint, device=spec["device"])
        kw.update(calibration.predict_kwargs(model.busseg_config))
        key += f"|{calibration.threshold}|{calibration.p_normal}"
    seen = cache.setdefault(key, {})
    for p in positions:
        if p not in seen:
            model = model or load_model(session.checkpoint, device=spec["device"])
            seen[p] = bool(predict_mask(read_image(records[order[p]].image_path), model,
                                        **kw).any())
    return float(np.mean([seen[p] for p in positions]))


def report_blocks(scans: Sequence[dict], points: Mapping[int, float],
                  block: int = REPORT_BLOCK) -> list[dict]:
    """Per block of ``block`` scans: interactions, lesion / normal means, accepted share.

    ``points`` maps a stream position (answers so far) to the false-region rate of the model
    then in use on the normal scans still to come; each block gets the rate at its start.
    """
    out = []
    for i in range(0, len(scans), block):
        chunk = scans[i:i + block]

        def mean(sel):
            vals = [s["interactions"] for s in sel]
            return float(np.mean(vals)) if vals else math.nan

        out.append({"first": i + 1, "last": i + len(chunk), "n": len(chunk),
                    "mean": mean(chunk),
                    "lesion": mean([s for s in chunk if s["lesion"]]),
                    "normal": mean([s for s in chunk if not s["lesion"]]),
                    "accepted": float(np.mean([s["kind"] == "accepted" for s in chunk])),
                    "false_regions_to_come": points.get(i, math.nan)})
    return out


def run_arm(spec: dict) -> dict:
    """Drive one AnnotationSession through the stream (one arm); picklable for --jobs."""
    import torch

    from busseg.inference import load_model
    from busseg.session import AnnotationSession

    torch.set_num_threads(int(spec["threads"]))
    records, sites, order = spec["records"], spec["sites"], spec["order"]
    work = Path(spec["work_dir"])
    t_arm = time.perf_counter()
    session = AnnotationSession(
        [], work / "corrections", checkpoint=spec["checkpoint"], learn=spec["learn"],
        learn_every=spec["learn_every"], finetune_options=spec["finetune_options"],
        models_dir=work / "models", records=[records[i] for i in order],
        calibrate=bool(spec.get("calibrate")), calibrate_every=spec.get("calibrate_every", 5))
    scans: list[dict] = []
    finetunes: list[dict] = []
    generation = 0
    site_refit = spec.get("region_filter_mode") == "site"
    site_feats: list[np.ndarray] = []
    site_labels: list[np.ndarray] = []
    refits = 0
    site_filter = base_filter = None
    calibrations: list[dict] = []
    normals = [p for p, i in enumerate(order) if records[i].label == "normal"]
    block = int(spec.get("report_block", REPORT_BLOCK))
    report_at = {0, FALSE_REGION_AT, *range(0, len(order), block)}
    fr_cache: dict = {}
    fr_points: dict[int, float] = {}
    for pos, stream_idx in enumerate(order):
        case = session.goto(pos)  # records the previous case (accepted, corrected ...)
        if session.finetune_due():
            try:
                res = session.run_due_finetune()
            except ValueError as exc:  # e.g. fewer than 2 corrections stored
                C.log(f"[{spec['label']}] fine-tune skipped: {exc}", spec["quiet"])
                res = None
            if res is not None:
                generation += int(res.adopted)
                finetunes.append({
                    "after_scan": pos, "adopted": res.adopted, "seconds": res.seconds,
                    "dice_before": res.dice_before, "dice_after": res.dice_after,
                    "n_train": res.n_train, "n_val": res.n_val,
                    "checkpoint": str(res.checkpoint) if res.checkpoint else None})
                C.log(f"[{spec['label']}] after {pos} scans: {res.message} "
                      f"({res.seconds:.0f} s)", spec["quiet"])
        calibration = session.calibrator.calibration if session.calibrator else None
        if calibration is not None and (not calibrations or calibrations[-1]["after"]
                                        != calibration.n_answers):
            calibrations.append({"after": calibration.n_answers,
                                 "threshold": calibration.threshold,
                                 "p_normal": calibration.p_normal, "text": calibration.text()})
        if pos in report_at and spec.get("false_regions", True):
            fr_points[pos] = false_region_rate(session, [p for p in normals if p >= pos],
                                               records, order, spec, fr_cache, calibration)
        t0 = time.perf_counter()
        # the region filter (busseg.region_filter) is on by default; the filter-off arm
        # (--region-filter off) switches it off in the automatic prediction only
        if site_refit and scans and scans[-1]["site"] != sites[stream_idx]:
            site_feats, site_labels, site_filter = [], [], base_filter  # a new site
        if site_refit:  # the filter refitted on this site's decisions so far
            auto, comp_labels, comp_feats, site_filter = _site_prediction(
                session, case, spec, site_filter)
            base_filter = base_filter or site_filter
        else:
            auto = session.predict(device=spec["device"], **(
                {} if spec.get("region_filter", True) else {"region_filter": None}))
        truth = case.ground_truth
        truth = np.zeros(auto.shape, bool) if truth is None else truth
        if truth.shape != auto.shape:  # pragma: no cover - discover reports these
            raise ValueError(f"{case.record.rel_path}: mask {truth.shape} vs image {auto.shape}")
        model = load_model(session.checkpoint, device=spec["device"])
        rng = np.random.default_rng([spec["seed"], stream_idx])
        res = annotate_scan(auto, truth, model_prompt(case.image, model), rng,
                            accept_iou=spec["accept_iou"],
                            max_interactions=spec["max_interactions"], jitter=spec["jitter"])
        if res["kind"] == "cleared":
            session.mark_no_lesion(save=False)  # saved by the next goto / close
        elif res["kind"] in ("prompted", "brushed"):
            session.set_mask(res["mask"], status="brushed" if res["kind"] == "brushed"
                             else "corrected")
        if site_refit and comp_feats.shape[0]:
            # the annotator's decision labels each region of the unfiltered automatic mask:
            # kept (overlaps the accepted or saved mask) = lesion, else a false region
            final = auto if res["mask"] is None else np.asarray(res["mask"]) > 0
            n_comp = comp_feats.shape[0]
            site_feats.append(comp_feats)
            site_labels.append(np.bincount(comp_labels[final].ravel(),
                                           minlength=n_comp + 1)[1:] > 0)
        if site_refit and (pos + 1) % spec["refit_every"] == 0 and base_filter is not None \
                and site_feats:
            site_filter = base_filter.refit(np.concatenate(site_feats),
                                            np.concatenate(site_labels),
                                            strength=spec["refit_strength"])
            refits += 1
        scans.append({
            "position": pos + 1, "stream_index": stream_idx, "name": case.name,
            "site": sites[stream_idx], "label": case.record.label, "lesion": bool(truth.any()),
            "kind": res["kind"], "interactions": res["interactions"], "boxes": res["boxes"],
            "erases": res["erases"], "clicks": res["clicks"],
            "auto_iou": res["auto_iou"], "final_iou": res["final_iou"],
            "model_generation": generation, "seconds": time.perf_counter() - t0})
        if (pos + 1) % 25 == 0:
            done = scans[-25:]
            C.log(f"[{spec['label']}] {pos + 1}/{len(order)} scans, last 25: "
                  f"{np.mean([s['interactions'] for s in done]):.2f} interactions/scan, "
                  f"{time.perf_counter() - t_arm:.0f} s", spec["quiet"])
    session.close()
    recorded, _ = session.progress()  # every case left, accepted ones too (they train)
    saved = sum(r.status != "accepted" for r in session.recorded())  # the edits
    # the starting model on the normal scans after FALSE_REGION_AT answers (the "before" of
    # the learning arms' rate at that point)
    start_key = str(spec["checkpoint"]) if spec["checkpoint"] else "default"
    late = [p for p in normals if p >= FALSE_REGION_AT]
    before = fr_cache.get(start_key, {})
    fr_start = (float(np.mean([before[p] for p in late]))
                if late and all(p in before for p in late) else math.nan)
    return {"label": spec["label"], "order": spec["order_name"], "learn": spec["learn"],
            "site": spec.get("site"), "calibrations": calibrations,
            "false_regions": {str(k): v for k, v in sorted(fr_points.items())},
            "false_regions_start_after": fr_start,
            "report_blocks": report_blocks(scans, fr_points, block),
            "region_filter": spec.get("region_filter", True),
            "region_filter_mode": spec.get("region_filter_mode", "on"), "site_refits": refits,
            "scans": scans,
            "finetunes": finetunes, "corrections_saved": saved, "recorded": recorded,
            "summary": summarise_arm(scans, finetunes),
            "final_checkpoint": str(session.checkpoint) if session.checkpoint else None,
            "seconds": time.perf_counter() - t_arm}


# --------------------------------------------------------------------------- report


def estimate_seconds(n_scans: int, n_arms_learn: int, n_arms: int, per_scan_s: float,
                     corrections_per_scan: float, learn_every: int,
                     finetune_s: float = FINETUNE_SECONDS_ESTIMATE, jobs: int = 1) -> float:
    """Rough wall time of a run: scans x arms x time per scan + the fine-tunes, over jobs."""
    finetunes = int(n_scans * corrections_per_scan) // max(learn_every, 1)
    total = n_arms * n_scans * per_scan_s + n_arms_learn * finetunes * finetune_s
    return total / max(1, min(jobs, n_arms))


def protocol_text(a: Mapping) -> list[str]:
    mi = a["max_interactions"]
    return [
        "Protocol (simulated annotator, ground truth = the dataset's expert mask), per scan:",
        "",
        f"1. The automatic mask (`AnnotationSession.predict`: the checkpoint in use, default "
        f"settings, normal-scan gate and region filter included unless the arm says "
        f"\"region filter off\") is **accepted** when its IoU with the truth is "
        f">= {a['accept_iou']:g}; a normal scan's when it is empty. 0 interactions, nothing "
        "saved.",
        "2. A **normal scan with a false region**: \"no lesion\" (clear), **1 interaction**; "
        "saved as a normal scan (empty mask).",
        f"3. Otherwise **one box per lesion** (8-connected component of the truth; each side "
        f"moved by up to {100 * a['jitter']:.0f} % of the box's side, uniform, seed "
        f"({a['seed']}, position of the scan in the stream); **1 interaction each**). The mask "
        f"becomes the prompt model's prediction for the boxes (`busseg.inference.predict`, "
        f"restricted to the boxes grown by {100 * BOX_MARGIN:.0f} %); when the automatic mask "
        "has pixels outside the grown boxes, the annotator first **clears** it (select all, "
        "delete: **1 interaction**, however many false regions). "
        "Then **clicks** from `busseg.prompts.next_click` (deepest point of the larger error "
        "region, taken inside the grown boxes, where the widget accepts clicks), each "
        "prediction given the boxes, all clicks so far and the current mask as the previous "
        f"mask, **until IoU >= {a['accept_iou']:g}**, 1 interaction per click. When "
        f"**{mi} interactions** (boxes and the clear included) do not get there, the scan counts "
        f"**{mi}** and is brushed: the saved correction is the truth; otherwise the prompted "
        "mask is saved.",
        "",
        "Each arm drives one `busseg.session.AnnotationSession` (the Scan browser's core) "
        "through the stream: `goto` records the previous case as the annotator left it "
        "(accepted, corrected, brushed or normal, in the corrections folder's manifest); "
        "with learning as "
        f"you go, after every {a['learn_every']} new corrections `run_due_finetune` fine-tunes "
        "the current checkpoint on all corrections so far (normal scans' empty masks "
        "included; `busseg.finetune` defaults) and adopts it when the simulated annotator "
        "(`busseg.annotator`, the protocol below) needs no more interactions per scan on the "
        "held-out corrections with it than with the current checkpoint, whatever the Dice "
        "says, and a held-out correction has a lesion (held-out pairs drawn from lesion and "
        "normal corrections alike). The fine-tune runs to its end before the "
        "next scan opens (the app runs it in the background). File order: the stream as "
        "listed; uncertainty order: "
        "`busseg.uncertainty.rank` with the starting checkpoint, most uncertain first, within "
        "each site (BUS-UCLM still first).",
        "",
    ]


def render(result: dict) -> str:
    a = result["settings"]
    md = [
        "# Annotation session: a simulated annotator at a new site",
        "",
        C.hardware_markdown(result["hardware"]),
        "",
        "Starting model: " + C.checkpoint_markdown(result["checkpoint"]),
        f"Wall time {result['seconds'] / 60:.1f} min ({a['jobs']} arm(s) at a time, "
        f"{result['hardware']['torch_threads']} torch thread(s) each).",
        "",
    ]
    st = result["stream"]
    if a.get("max_steps") is not None:
        md += [f"**Fine-tunes cut to {a['max_steps']} steps: a check, not a result.**", ""]
    if a["limit"] is not None or a["busbra_limit"] is not None:
        cut = []
        if a["limit"] is not None:
            cut.append(f"the first {a['limit']} scans of the stream")
        if a["busbra_limit"] is not None:
            cut.append(f"the first {a['busbra_limit']} BUS-BRA scans")
        md += [f"**Truncated run: {' and '.join(cut)} only"
               + ("; not a result" if a["limit"] is not None else "") + ".**", ""]
    md += [
        "Stream (in this order): " + "; then ".join(
            f"{site}: {v['n']} scans ({v['n_normal']} normal)" for site, v in st["sites"].items())
        + ".",
    ]
    if st["skipped"]:
        md.append(f"Skipped ({len(st['skipped'])}): " + "; ".join(
            f"{d['image']}: {', '.join(d['problems'])}" for d in st["skipped"]) + ".")
    md += ["", *protocol_text(a)]
    fd = result.get("finetune_defaults") or {}
    if any(arm["learn"] for arm in result["arms"]) and fd:
        steps = a.get("max_steps") or fd.get("max_steps")
        md += [f"Fine-tune settings (`busseg.finetune.FINETUNE_DEFAULTS`): {steps} steps, batch "
               f"{fd.get('batch_size')}, lr {fd.get('lr')}, frozen encoder "
               f"{fd.get('freeze_encoder')}, {100 * float(fd.get('val_fraction', 0)):.0f} % of "
               "the corrections held out; on the torch threads above.", ""]
    arms = result["arms"]
    md += [
        "| Arm | Scans | Interactions | per scan | lesion scans | normal scans | accepted | "
        "cleared | box+clicks | brushed (20) | boxes / clears / clicks | fine-tunes "
        "(adopted) | fine-tune compute |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for arm in arms:
        s = arm["summary"]
        k = s["kinds"]
        ft = (f"{s['finetunes']} ({s['finetunes_adopted']})" if arm["learn"] else "–")
        ftt = (f"{s['finetune_seconds']:.0f} s ({C.fmt(s['finetune_seconds_mean'], 1)} s each)"
               if arm["learn"] and s["finetunes"] else "–")
        md.append(
            f"| {arm['label']} | {s['n']} | {s['interactions']} | {C.fmt(s['per_scan'], 2)} | "
            f"{C.fmt(s['lesion_per_scan'], 2)} | {C.fmt(s['normal_per_scan'], 2)} | "
            f"{k['accepted']} | {k['cleared']} | {k['prompted']} | {k['brushed']} | "
            f"{s['boxes']} / {s['erases']} / {s['clicks']} | {ft} | {ftt} |")
    md += ["", "Per site (interactions per scan; lesion / normal scans):", "",
           "| Arm | " + " | ".join(st["sites"]) + " |",
           "|---|" + "---:|" * len(st["sites"])]
    for arm in arms:
        cells = []
        for site in st["sites"]:
            v = arm["summary"]["sites"].get(site)
            cells.append("–" if v is None else
                         f"{C.fmt(v['per_scan'], 2)} ({C.fmt(v['lesion_per_scan'], 2)} / "
                         f"{C.fmt(v['normal_per_scan'], 2)})")
        md.append(f"| {arm['label']} | " + " | ".join(cells) + " |")
    md += ["", f"Interactions per scan, per block of {BLOCK} scans annotated:", "",
           "| Scans | " + " | ".join(arm["label"] for arm in arms) + " |",
           "|---|" + "---:|" * len(arms)]
    n_blocks = max(len(arm["summary"]["blocks"]) for arm in arms)
    bound = st["sites"].get("BUS-UCLM test", {}).get("n")
    for b in range(n_blocks):
        first = arms[0]["summary"]["blocks"][b]
        site_note = ""
        if bound and first["first"] <= bound < first["last"]:
            site_note = f" (BUS-BRA from scan {bound + 1})"
        cells = [C.fmt(arm["summary"]["blocks"][b]["mean"], 1)
                 if b < len(arm["summary"]["blocks"]) else "–" for arm in arms]
        md.append(f"| {first['first']}-{first['last']}{site_note} | " + " | ".join(cells) + " |")
    groups: dict[str, list] = {}  # arms without learning that differ only in the order
    for arm in arms:
        if not arm["learn"] and not arm.get("calibrations"):
            groups.setdefault(arm.get("region_filter_mode", "on"), []).append(arm)
    if any(len(g) > 1 for g in groups.values()):
        same = all(len({arm["summary"]["interactions"] for arm in g}) == 1
                   for g in groups.values())
        md += ["", "Without learning the order cannot change the total: each scan's box jitter "
               "is seeded by its position in the stream, so those arms see the same scans with "
               "the same boxes" + (" (and agree here)." if same else
                                   " (**they differ here: check the run**).")]
    if len(groups) > 1:
        md += ["", "Region filter arms: on = the checkpoint's filter (`inference.region_filter`, "
               "the default); off = switched off (`region_filter=None`, the gate still on); "
               "site = the checkpoint's filter refitted on this site's own decisions "
               f"(`RegionFilter.refit`, prior strength {a.get('refit_strength', 10.0):g}, every "
               f"{a.get('refit_every', 10)} scans, restarted at each new site; a region is a "
               "lesion when it overlaps the accepted or saved mask, else a false region)."]
    md += render_report_blocks(result)
    md += ["", f"Estimated full run on this host: {result['estimate']['text']}", ""]
    return "\n".join(md) + "\n"


def _ratio(a: float | None, b: float | None) -> str:
    a, b = (math.nan if v is None else float(v) for v in (a, b))  # JSON writes NaN as null
    return "–" if not (np.isfinite(a) and np.isfinite(b) and b > 0) else f"{a / b:.2f}"


def render_report_blocks(result: dict) -> list[str]:
    """The per-block table (interactions; lesion / normal; accepted; false regions to come)."""
    arms = [a for a in result["arms"] if a.get("report_blocks")]
    if not arms:
        return []
    block = result["settings"].get("block", REPORT_BLOCK)
    md = ["", f"Per block of {block} scans: interactions per scan (lesion / normal scans), "
          "share accepted as predicted, and the false-region rate of the model in use at the "
          "block's start on the normal scans still to come:", ""]
    md += ["| Scans | " + " | ".join(a["label"] for a in arms) + " |",
           "|---|" + "---:|" * len(arms)]
    n = max(len(a["report_blocks"]) for a in arms)
    for b in range(n):
        first = arms[0]["report_blocks"][min(b, len(arms[0]["report_blocks"]) - 1)]
        cells = []
        for a in arms:
            if b >= len(a["report_blocks"]):
                cells.append("–")
                continue
            r = a["report_blocks"][b]
            cells.append(f"{C.fmt(r['mean'], 2)} ({C.fmt(r['lesion'], 2)} / "
                         f"{C.fmt(r['normal'], 2)}); acc {100 * r['accepted']:.0f} %; "
                         f"FR {C.fmt(r['false_regions_to_come'], 2)}")
        md.append(f"| {first['first']}-{first['last']} | " + " | ".join(cells) + " |")
    off = next((a for a in arms if not a["learn"]), None)
    md += ["", "| Arm | per scan | x off | lesion scans | x off | normal scans | x off | "
           f"last 100 / first 50 | false regions after {FALSE_REGION_AT} answers "
           "(starting model) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for a in arms:
        s = a["summary"]
        o = off["summary"] if off else None
        inter = [x["interactions"] for x in a["scans"]]
        late = (float(np.mean(inter[-100:])) / float(np.mean(inter[:50]))
                if len(inter) >= 150 and np.mean(inter[:50]) > 0 else math.nan)
        fr = a.get("false_regions", {}).get(str(FALSE_REGION_AT), math.nan)
        md.append(
            f"| {a['label']} | {C.fmt(s['per_scan'], 2)} | "
            f"{_ratio(s['per_scan'], o['per_scan']) if o else '–'} | "
            f"{C.fmt(s['lesion_per_scan'], 2)} | "
            f"{_ratio(s['lesion_per_scan'], o['lesion_per_scan']) if o else '–'} | "
            f"{C.fmt(s['normal_per_scan'], 2)} | "
            f"{_ratio(s['normal_per_scan'], o['normal_per_scan']) if o else '–'} | "
            f"{C.fmt(late, 2)} | {C.fmt(fr, 2)} ({C.fmt(a.get('false_regions_start_after'), 2)}) |")
    return md


def make_figure(result: dict):
    fig, axes = C.new_figure(1, 2, size=(6.0, 4.2))
    ax, ax2 = axes[0]
    for arm in result["arms"]:
        blocks = arm.get("report_blocks") or arm["summary"]["blocks"]
        x = [b["last"] for b in blocks]
        style = "-" if arm["learn"] else "--"
        ax.plot(x, [b["mean"] for b in blocks], style, marker="o", ms=3, label=arm["label"])
        cum = np.cumsum([s["interactions"] for s in arm["scans"]])
        ax2.plot(np.arange(1, len(cum) + 1), cum, style, label=arm["label"])
        for f in arm["finetunes"]:
            if f["adopted"]:
                ax.axvline(f["after_scan"], color="grey", lw=0.3, alpha=0.4)
    bound = result["stream"]["sites"].get("BUS-UCLM test", {}).get("n")
    for a_ in (ax, ax2):
        if bound:
            a_.axvline(bound + 0.5, color="black", lw=0.8, ls=":")
        a_.set_xlabel("scans annotated")
        a_.legend(fontsize=7)
    per = result["settings"].get("block", BLOCK) if result["arms"][0].get("report_blocks") \
        else BLOCK
    ax.set_ylabel(f"interactions per scan (mean per block of {per})")
    ax.set_title(("dotted: BUS-UCLM -> BUS-BRA; " if bound else "")
                 + "grey: adopted fine-tunes", fontsize=8)
    ax2.set_ylabel("interactions, cumulative")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None,
                   help="starting checkpoint (default: the shipped default model)")
    p.add_argument("--busuclm", default=str(C.DEFAULT_BUSUCLM), help="BUS-UCLM folder")
    p.add_argument("--busuclm-split", default=str(C.DEFAULT_BUSUCLM_SPLIT),
                   help="its patient split (the 'test' patients are the stream's first part)")
    p.add_argument("--no-busuclm", action="store_true", help="no BUS-UCLM part")
    p.add_argument("--busbra", default=str(C.DEFAULT_BUSBRA), help="BUS-BRA fold 1 folder")
    p.add_argument("--no-busbra", action="store_true", help="no BUS-BRA part")
    p.add_argument("--busbra-limit", type=int, default=None,
                   help="keep the first N BUS-BRA scans (file order) to shorten the run")
    p.add_argument("--limit", type=int, default=None,
                   help="the first N scans of the stream only (dev runs; not a result)")
    p.add_argument("--stream", choices=STREAMS, default="legacy",
                   help="legacy: BUS-UCLM test patients then BUS-BRA fold 1 (default); "
                        "busuclm-all: all of busuclm-dev in patient order; busbra: BUS-BRA "
                        "fold 1 only")
    p.add_argument("--site", default="vote",
                   help="comma-separated learning arms (what a fine-tune writes, "
                        "busseg.session.SITE_MODES): vote, adapted, whole (default vote)")
    p.add_argument("--recipe", default=None,
                   help="fine-tune recipe of the learning arms (default busseg.finetune's)")
    p.add_argument("--block", type=int, default=REPORT_BLOCK,
                   help=f"scans per block of the per-block report (default {REPORT_BLOCK})")
    p.add_argument("--calibrate", action="store_true",
                   help="add an arm with site calibration only (busseg.calibration: the "
                        "region filter's threshold and the gate re-chosen on the answers, no "
                        "training)")
    p.add_argument("--calibrate-learning", action="store_true",
                   help="site calibration in the learning arms too (learning as you go with "
                        "calibration, as the Scan browser runs them together by default)")
    p.add_argument("--calibrate-every", type=int, default=5,
                   help="answers between two calibrations (default 5)")
    p.add_argument("--no-false-regions", dest="false_regions", action="store_false",
                   help="skip the false-region rate on the normal scans still to come")
    p.add_argument("--learn-every", type=int, default=10,
                   help="new answers before the first fine-tunes (default 10; later ones "
                        "wait longer, see AnnotationSession.learn_interval)")
    p.add_argument("--orders", default="file,uncertainty",
                   help="comma-separated: file, uncertainty (default both)")
    p.add_argument("--learn", default="on,off",
                   help="comma-separated: on, off (learning as you go; default both)")
    p.add_argument("--region-filter", default="on",
                   help="comma-separated: on, off, site (the checkpoint's region filter in the "
                        "automatic masks; default on; 'on,off' runs both, side by side; site: "
                        "refitted every --refit-every scans on the session's own decisions, "
                        "RegionFilter.refit)")
    p.add_argument("--refit-every", type=int, default=10,
                   help="scans between refits of the 'site' arm (default 10)")
    p.add_argument("--refit-strength", type=float, default=10.0,
                   help="prior strength of the 'site' refit (default 10)")
    p.add_argument("--no-region-filter", dest="region_filter", action="store_const",
                   const="off", help="the same as --region-filter off")
    p.add_argument("--max-steps", type=int, default=None,
                   help="fine-tune steps (default: busseg.finetune's; changes the protocol, "
                        "for checks only)")
    p.add_argument("--accept-iou", type=float, default=ACCEPT_IOU,
                   help="IoU at which a mask is accepted / the prompts stop (default 0.85)")
    p.add_argument("--max-interactions", type=int, default=MAX_INTERACTIONS,
                   help="cap per scan, boxes included (default 20)")
    p.add_argument("--jitter", type=float, default=0.1,
                   help="largest move of a box side, share of the side (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the box jitter")
    p.add_argument("--jobs", type=int, default=1,
                   help="arms run side by side in processes (default 1; 2 on 2 cores with "
                        "--threads 1)")
    p.add_argument("--work-dir", default=None,
                   help="keep the corrections and fine-tuned checkpoints here (default: a "
                        "temporary folder, removed)")
    p.add_argument("--out-dir", "--out", dest="out", default=str(C.DEFAULT_OUT),
                   help="folder for annotation_session.{md,json,png} (default "
                        "benchmarks/results; dev runs: elsewhere)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per arm (default 1)")
    p.add_argument("--device", default="cpu", help="'cpu' (default), 'cuda', 'mps', 'auto'")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = p.parse_args(argv)
    args.orders = [x.strip() for x in args.orders.split(",") if x.strip()]
    args.learn = [x.strip() for x in args.learn.split(",") if x.strip()]
    args.region_filter = [x.strip() for x in args.region_filter.split(",") if x.strip()]
    args.site = [x.strip() for x in args.site.split(",") if x.strip()]
    if not args.site or any(x not in SITE_ARMS for x in args.site):
        raise SystemExit(f"--site: choose from {','.join(SITE_ARMS)}")
    if args.block < 1:
        raise SystemExit("--block must be at least 1")
    if not args.region_filter or any(x not in ("on", "off", "site")
                                     for x in args.region_filter):
        raise SystemExit("--region-filter: choose from on,off,site")
    if not args.orders or any(o not in ORDERS for o in args.orders):
        raise SystemExit(f"--orders: choose from {','.join(ORDERS)}")
    if not args.learn or any(x not in ("on", "off") for x in args.learn):
        raise SystemExit("--learn: choose from on,off")
    for flag in ("limit", "busbra_limit"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} must be at least 1")
    if args.learn_every < 2:
        raise SystemExit("--learn-every must be at least 2 (a fine-tune holds one pair out)")
    if args.max_interactions < 2:
        raise SystemExit("--max-interactions must be at least 2")
    if args.jobs < 1:
        raise SystemExit("--jobs must be at least 1")
    return args


def rerender(path: str | Path) -> dict:
    """Write the Markdown and the figure of a saved run again (``--from-json``), no re-run."""
    import json

    path = Path(path)
    result = json.loads(path.read_text())
    C.write_results(path.parent, NAME, render(result), result, make_figure(result))
    return result


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark; return the JSON payload (also written to ``--out-dir``)."""
    if argv is None:
        argv = sys.argv[1:]
    if len(argv) == 2 and argv[0] == "--from-json":  # re-render a saved run
        return rerender(argv[1])
    args = parse_args(argv)
    threads = C.set_threads(args.threads)
    ckpt = C.resolve_checkpoint(args.checkpoint)
    from busseg.finetune import FINETUNE_DEFAULTS
    from busseg.inference import accepts_prompts, load_model

    t_start = time.perf_counter()
    if not accepts_prompts(load_model(ckpt, device=args.device)):
        raise SystemExit(f"{ckpt} takes no prompts; the annotator needs a prompt model")
    records, sites, skipped, full_counts = build_stream(args)
    for d in skipped:
        C.log(f"skipped {d['image']}: {', '.join(d['problems'])}", args.quiet)
    stream_sites: dict[str, dict] = {}
    for r, s in zip(records, sites, strict=True):
        v = stream_sites.setdefault(s, {"n": 0, "n_normal": 0})
        v["n"] += 1
        v["n_normal"] += int(r.label == "normal")
    C.log(f"stream: {len(records)} scans ({stream_sites}); threads {threads}", args.quiet)
    orders: dict[str, list[int]] = {"file": list(range(len(records)))}
    scores = None
    if "uncertainty" in args.orders:
        with C.Stopwatch() as sw:
            orders["uncertainty"], scores = uncertainty_order(records, sites, ckpt, args.device)
        C.log(f"uncertainty ranking: {sw.seconds:.0f} s", args.quiet)

    ft_opts: dict[str, Any] = {"device": args.device}
    if args.recipe is not None:
        ft_opts["recipe"] = args.recipe
    if args.max_steps is not None:
        ft_opts["cfg"] = {"max_steps": args.max_steps}
    own_work = args.work_dir is None
    work = Path(tempfile.mkdtemp(prefix="busseg-session-")) if own_work else Path(args.work_dir)
    specs = []
    learn_arms = [(x, None) if x == "off" else (x, site) for x in args.learn
                  for site in (args.site if x == "on" else [None])]
    if args.calibrate:
        learn_arms.append(("off", "calibration"))
    arms_wanted = [(o, x, f, site) for o in args.orders for x, site in learn_arms
                   for f in args.region_filter]
    for order_name, learn, rfilter, site in arms_wanted:  # order x learning x filter
        label = f"{order_name} order, learning {learn}"
        wd = work / f"{order_name}-learn-{learn}"
        if site == "calibration":
            label = f"{order_name} order, calibration only"
            wd = wd.with_name(wd.name + "-calibration")
        elif site is not None and args.calibrate_learning:
            label += f" ({site}) + calibration"
            wd = wd.with_name(wd.name + f"-{site}-calibration")
        elif site is not None and args.site != ["vote"]:
            label += f" ({site})"
            wd = wd.with_name(wd.name + f"-{site}")
        if args.region_filter != ["on"]:
            label += f", region filter {rfilter}"
            wd = wd.with_name(wd.name + f"-filter-{rfilter}")
        if wd.exists():
            raise SystemExit(f"{wd} exists; choose another --work-dir")
        specs.append({
            "label": label, "order_name": order_name, "learn": learn == "on",
            "records": records, "sites": sites, "order": orders[order_name],
            "checkpoint": str(ckpt), "learn_every": args.learn_every,
            "finetune_options": {**ft_opts, "site": site if site in SITE_ARMS else "vote"},
            "site": site,
            "calibrate": site == "calibration" or (site is not None and args.calibrate_learning),
            "calibrate_every": args.calibrate_every,
            "report_block": args.block, "false_regions": args.false_regions,
            "work_dir": str(wd), "threads": args.threads, "device": args.device,
            "seed": args.seed, "accept_iou": args.accept_iou,
            "max_interactions": args.max_interactions, "jitter": args.jitter,
            "region_filter": rfilter != "off", "region_filter_mode": rfilter,
            "refit_every": args.refit_every, "refit_strength": args.refit_strength,
            "quiet": args.quiet})
    try:
        if args.jobs > 1 and len(specs) > 1:
            # learning arms first: they take longest
            todo = sorted(specs, key=lambda s: not s["learn"])
            with mp.get_context("spawn").Pool(min(args.jobs, len(specs))) as pool:
                done = {r["label"]: r for r in pool.imap_unordered(run_arm, todo)}
            arms = [done[s["label"]] for s in specs]
        else:
            arms = [run_arm(s) for s in specs]
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)

    # the full-run estimate from this run's own timings
    per_scan = [s["seconds"] for arm in arms for s in arm["scans"]]
    per_scan_s = float(np.mean(per_scan)) if per_scan else math.nan
    # fine-tunes wait for recorded answers (accepted cases count)
    corr = [arm.get("recorded", arm["corrections_saved"]) / max(1, len(arm["scans"]))
            for arm in arms]
    ft = [f["seconds"] for arm in arms for f in arm["finetunes"]]
    ft_s = float(np.mean(ft)) if ft else FINETUNE_SECONDS_ESTIMATE
    full_n = int(sum(full_counts.values()))
    est = {}
    for jobs in (1, 2):
        est[jobs] = estimate_seconds(full_n, 2, 4, per_scan_s, float(np.mean(corr)),
                                     args.learn_every, ft_s, jobs)
    estimate = {
        "full_stream_scans": full_n, "per_scan_seconds": per_scan_s,
        "corrections_per_scan": float(np.mean(corr)), "finetune_seconds": ft_s,
        "four_arms_seconds_jobs1": est[1], "four_arms_seconds_jobs2": est[2],
        "text": (f"{full_n} scans x 4 arms at {per_scan_s:.2f} s per scan (this run's mean), "
                 f"{np.mean(corr):.2f} recorded answers per scan, so about "
                 f"{int(full_n * np.mean(corr)) // args.learn_every} fine-tunes per learning "
                 f"arm at {ft_s:.0f} s: about {est[1] / 60:.0f} min with --jobs 1, "
                 f"{est[2] / 60:.0f} min with --jobs 2 --threads 1 (2 cores)."),
    }
    result = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "hardware": C.hardware_info(args.device),
        "checkpoint": C.checkpoint_summary(ckpt),
        "finetune_defaults": FINETUNE_DEFAULTS,
        "stream": {"sites": stream_sites, "skipped": skipped, "full_counts": full_counts,
                   "scans": [{"rel_path": r.rel_path, "site": s, "label": r.label,
                              "uncertainty": (scores[i] if scores else None)}
                             for i, (r, s) in enumerate(zip(records, sites, strict=True))]},
        "arms": arms,
        "estimate": estimate,
        "seconds": time.perf_counter() - t_start,
    }
    md = render(result)
    C.write_results(args.out, NAME, md, result, make_figure(result))
    print(md)
    return result


if __name__ == "__main__":
    main()
