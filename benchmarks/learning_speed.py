"""How long learning from the annotator's answers takes: a site fine-tune and a calibration.

Usage (from the repository root)::

    python benchmarks/learning_speed.py --threads 2            # 40 answers, the default model
    python benchmarks/learning_speed.py --answers 40 --repeats 3 --out /tmp/ls

What it does, as the Scan browser's learning as you go does it: an
:class:`busseg.session.AnnotationSession` records ``--answers`` BUS-UCLM scans (busseg-dev, in
patient order, normal scans included) with their expert masks as the annotator's answers
(corrected lesion masks, "no lesion" for the normal scans), then

- **site fine-tune**: :meth:`AnnotationSession.finetune_job` (the site recipe, the latest
  answers held out, a site checkpoint written, prompts chosen, adoption simulated): wall
  time per run, ``--repeats`` times, median;
- **site calibration**: :func:`busseg.calibration.fit_calibration` on the evidence of the
  same answers (``--calibration-answers``, default 300, the evidence repeated to reach it):
  wall time, median of 20.

Writes ``learning_speed.md`` and ``learning_speed.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

NAME = "learning_speed"
#: The targets: a fine-tune on 40 answers within 90 s on 2 threads; a calibration < 0.5 s.
TARGET_FINETUNE_S = 90.0
TARGET_CALIBRATION_S = 0.5


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_common_args(p)
    p.add_argument("--busuclm", default=str(C.DEFAULT_BUSUCLM), help="BUS-UCLM folder")
    p.add_argument("--answers", type=int, default=40, help="recorded answers (default 40)")
    p.add_argument("--repeats", type=int, default=3, help="fine-tunes timed (default 3)")
    p.add_argument("--calibration-answers", type=int, default=300,
                   help="answers of the timed calibration (default 300)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="fine-tune steps (default the site recipe's; for checks only)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.answers < 2 or args.repeats < 1:
        raise SystemExit("--answers must be >= 2 and --repeats >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark; return the JSON payload (also written to ``--out``)."""
    args = parse_args(argv)
    threads, ckpt = C.threads_and_checkpoint(args)
    from busseg.calibration import case_evidence, fit_calibration
    from busseg.data import discover
    from busseg.inference import load_model, predict
    from busseg.region_filter import resolve_filter
    from busseg.session import AnnotationSession

    root = C.require_dir(args.busuclm, "BUS-UCLM", "--busuclm")
    recs = sorted((r for r in discover(root).records if r.usable),
                  key=lambda r: (str(r.group), r.rel_path))[: args.answers]
    work = Path(tempfile.mkdtemp(prefix="busseg-learning-speed-"))
    model = load_model(ckpt, device=args.device)
    opts = {"device": args.device}
    if args.max_steps is not None:
        opts["cfg"] = {"max_steps": args.max_steps}
    try:
        s = AnnotationSession([], work / "corrections", checkpoint=ckpt, records=recs,
                              learn=True, learn_every=len(recs), calibrate=False,
                              finetune_options=opts, models_dir=work / "models")
        evidence = []
        cfg = model.busseg_config
        rfilter = resolve_filter("auto", cfg)
        s.open(0)
        for i in range(len(recs)):
            case = s.current
            truth = case.ground_truth
            raw = predict(case.image, model, normal_gate=None, region_filter=None)
            evidence.append(case_evidence(raw.mask, raw.proba, case.image, raw.class_proba,
                                          rfilter, truth))
            s.set_prediction(raw.mask)
            if truth.any():
                s.set_mask(truth, status="corrected")
            else:
                s.mark_no_lesion(save=False)
            if i + 1 < len(recs):
                s.next()
        s.close()
        n_lesion = sum(bool(e.lesion) for e in evidence)
        seconds = []
        for k in range(args.repeats):
            s.new_corrections = len(recs)
            t0 = time.perf_counter()
            out = s.run_due_finetune()
            seconds.append(time.perf_counter() - t0)
            s.checkpoint = ckpt  # each run from the same start
            C.log(f"fine-tune {k + 1}: {seconds[-1]:.1f} s ({out.message})", args.quiet)
        reps = max(1, args.calibration_answers // len(evidence))
        big = (evidence * reps)[: args.calibration_answers]
        cal_s = []
        for _ in range(20):
            t0 = time.perf_counter()
            fit_calibration(big, cfg)
            cal_s.append(time.perf_counter() - t0)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ft, cal = float(np.median(seconds)), float(np.median(cal_s))
    result = {
        "hardware": C.hardware_info(args.device), "checkpoint": C.checkpoint_summary(ckpt),
        "threads": threads, "answers": len(recs), "lesion_answers": n_lesion,
        "finetune_seconds": seconds, "finetune_median_s": ft,
        "calibration_answers": len(big), "calibration_seconds": cal_s,
        "calibration_median_s": cal,
        "max_steps": args.max_steps,
    }
    md = "\n".join([
        "# Learning from the answers: how long it takes", "",
        C.hardware_markdown(result["hardware"]), "",
        "Starting model: " + C.checkpoint_markdown(result["checkpoint"]), "",
        f"Answers: the first {len(recs)} usable BUS-UCLM scans in patient order "
        f"({n_lesion} with a lesion), the expert masks as the annotator's answers.", "",
        "| what | median | runs | target |", "|---|---:|---:|---:|",
        f"| site fine-tune (`AnnotationSession.finetune_job`, {threads} torch thread(s)) | "
        f"{ft:.1f} s | {', '.join(f'{x:.1f}' for x in seconds)} | <= "
        f"{TARGET_FINETUNE_S:.0f} s ({'met' if ft <= TARGET_FINETUNE_S else 'missed'}) |",
        f"| site calibration (`fit_calibration`, {len(big)} answers) | {1000 * cal:.1f} ms | "
        f"20 | < {1000 * TARGET_CALIBRATION_S:.0f} ms "
        f"({'met' if cal < TARGET_CALIBRATION_S else 'missed'}) |", "",
    ])
    C.write_results(args.out, NAME, md + "\n", result, None)
    print(md)
    return result


if __name__ == "__main__":
    main()
