"""How long the annotator waits: Scan browser Next -> mask shown, with and without prefetch.

Usage (from the repository root; napari needs a display, Xvfb is fine)::

    OMP_NUM_THREADS=2 xvfb-run -a -s "-screen 0 1600x1000x24" \\
        python benchmarks/browser_latency.py --threads 2
    # the screenshot of both docks on a BUSI folder at 1500x900:
    OMP_NUM_THREADS=2 xvfb-run -a -s "-screen 0 1600x1000x24" \\
        python benchmarks/browser_latency.py --threads 2 --cases 2 --no-baseline \\
        --root ../shared/data/busi/Dataset_BUSI_with_GT --out /tmp/bl \\
        --screenshot docs/images/browser_and_segment_1500x900.png

What it does, in one process, as an annotator would: a napari window of 1500x900 pixels with
the **Segment lesions** and **Scan browser** docks (the shipped default model, or
``--checkpoint``, chosen in Segment lesions, whose settings the browser's predictions follow),
"Predict on open" on (the default), a fresh corrections folder.

- **first case**: choose the folder (``--root``, default BUS-BRA fold 1), then at once
  **Open** the selected case: the time until its ``"<case> prediction"`` layer is in the
  viewer and the canvas has been drawn. Cold: the model is loaded and run for the first time
  in this process (the browser starts predicting the selected case when the folder is
  chosen, so the Open waits only for what is left of that). With ``--warm-first`` the Open
  comes once that warm-up is done (an annotator who glances at the list first), and the
  warm-up's duration is reported.
- **Next, prefetched**: ``--cases`` times, wait until the next case's prediction has been made
  in the background (what happens while the annotator looks at a case; a forward pass takes
  a fraction of a second), then **Next**: the time until the next case's mask is shown
  (autosave of the case left, reading the next image, swapping it, its ground truth and its
  mask into the case left's layers, which the browser reuses, one draw). Medians and
  quartiles over the cases. Choosing the folder is timed too: the browser's warm-up then
  makes the first case's layers (transparent), so the first Open pays no first-layer costs.
- **Next, not prefetched** (the baseline; ``--no-baseline`` skips it): the same with the
  prefetch switched off and the cache emptied, so every Next waits for a forward pass in a
  worker, as the browser did before it prefetched the next case.

"Shown" is: the Labels layer is inserted, then the canvas is repainted (``QWidget.repaint``,
which draws synchronously) and Qt's pending events are processed. Under Xvfb the canvas is
drawn by Mesa's software rasteriser on the same CPUs. Writes
``browser_latency.md`` and ``browser_latency.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

#: Targets for showing the next case (seconds, 2 CPU threads).
TARGET_PREFETCHED = 0.3
TARGET_FIRST = 1.5
WINDOW = (1500, 900)


def _app():
    from qtpy.QtWidgets import QApplication

    return QApplication.instance()


def _repaint(viewer: Any) -> None:
    """Repaint the canvas now (a synchronous draw)."""
    try:
        viewer.window._qt_viewer.canvas.native.repaint()
    except (AttributeError, RuntimeError):  # another napari layout: events only
        _app().processEvents()


def _draw(viewer: Any) -> None:
    """Repaint the canvas now, then process pending events."""
    _repaint(viewer)
    _app().processEvents()


def _wait(cond, timeout: float, what: str) -> None:
    t0 = time.perf_counter()
    while not cond():
        if time.perf_counter() - t0 > timeout:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        _app().processEvents()
        time.sleep(0.002)


def _even_docks(viewer: Any) -> None:
    """Give the two stacked docks half the height each (as a user drags the splitter)."""
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QDockWidget

    docks = [d for d in viewer.window._qt_window.findChildren(QDockWidget)
             if "napari-busseg" in d.windowTitle()]
    if len(docks) >= 2:
        viewer.window._qt_window.resizeDocks(docks, [1] * len(docks),
                                             Qt.Orientation.Vertical)


def _shown(viewer: Any, name: str) -> bool:
    return any(layer.name == name for layer in viewer.layers)


def _idle(seconds: float) -> None:
    """Run the event loop for ``seconds`` (the annotator looks at the case)."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        _app().processEvents()
        time.sleep(0.005)


def _timed(viewer: Any, widget: Any, action, name: str, timeout: float) -> dict:
    """Run ``action`` (Open / Next); seconds until layer ``name`` exists and is drawn.

    Also: ``call_s`` (the action returned), ``layer_s`` (the layer is in the viewer) and
    ``cleanup_s`` (the left case's hidden layers removed, which the browser does a moment
    after the new case is drawn).
    """
    t0 = time.perf_counter()
    action()
    returned = time.perf_counter() - t0
    _wait(lambda: _shown(viewer, name), timeout, f"the layer {name!r}")
    t_layer = time.perf_counter() - t0
    _repaint(viewer)
    shown = time.perf_counter() - t0
    _app().processEvents()
    _wait(lambda: not getattr(widget, "closing_pending", False), timeout, "the cleanup")
    return {"seconds": shown, "layer_s": t_layer, "call_s": returned,
            "cleanup_s": time.perf_counter() - t0}


def _settle(widget: Any, timeout: float) -> None:
    _wait(lambda: not widget.prefetch_running and not widget.predicting, timeout,
          "the background predictions")


def _background_finetune(records, checkpoint: Path, n: int):
    """Start a site fine-tune on ``n`` labelled records in a thread (learning as you go's load).

    Returns (thread, result dict filled when it ends: ``seconds``, ``error``).
    """
    import threading

    from busseg.data import read_image, read_mask
    from busseg.finetune import SITE_RECIPE, finetune

    pairs = [r for r in records if r.mask_paths][:n]
    images = [read_image(r.image_path) for r in pairs]
    masks = [read_mask(r.mask_paths) for r in pairs]
    out = Path(tempfile.mkdtemp(prefix="busseg_latency_ft_")) / "run"
    result: dict = {"pairs": len(pairs)}

    def work():
        t0 = time.perf_counter()
        try:
            finetune(images, masks, checkpoint, recipe=SITE_RECIPE, out_dir=out)
        except Exception as exc:  # pragma: no cover - reported in the results
            result["error"] = repr(exc)
        result["seconds"] = time.perf_counter() - t0

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread, result


def run(root: Path, checkpoint: Path, cases: int, baseline: bool, timeout: float,
        screenshot: Path | None, quiet: bool, warm_first: bool = False,
        during_finetune: int = 0) -> dict:
    """Measure in a napari window; returns the JSON payload."""
    import napari

    from busseg._widgets._common import prediction_name

    C.log(f"napari {napari.__version__}, folder {root}", quiet)
    viewer = napari.Viewer(show=True)
    try:
        qt_window = viewer.window._qt_window
        qt_window.resize(*WINDOW)
        _, seg = viewer.window.add_plugin_dock_widget("napari-busseg", "Segment lesions")
        _, widget = viewer.window.add_plugin_dock_widget("napari-busseg", "Scan browser")
        seg.use_checkpoint(checkpoint)
        qt_window.resize(*WINDOW)
        _draw(viewer)
        corrections = Path(tempfile.mkdtemp(prefix="busseg_latency_"))
        widget.set_corrections(corrections)
        assert widget._predict_check.value, "Predict on open should be on by default"

        t0 = time.perf_counter()
        widget.set_root(root)
        set_root_s = time.perf_counter() - t0
        n_cases = len(widget.records)
        C.log(f"{n_cases} cases listed in {set_root_s:.2f} s", quiet)
        rec = widget.current_record()
        warmup_s = None
        if warm_first:  # the annotator glances at the list first: the warm-up finishes
            _settle(widget, timeout)
            warmup_s = time.perf_counter() - t0 - set_root_s
            _idle(0.5)
        first = _timed(viewer, widget, widget.open_current, prediction_name(rec.name), timeout)
        first.update(case=rec.name, after_warmup=warm_first, warmup_s=warmup_s)
        C.log(f"first case {rec.name}: {first['seconds']:.3f} s "
              f"({'after the warm-up' if warm_first else 'cold'})", quiet)

        def steps(n: int, prefetch: bool) -> list[dict]:
            out = []
            for _ in range(n):
                s = widget.session
                pos = widget._shown.index(widget._open_index)
                if pos + 1 >= len(widget._shown):
                    break
                nxt = widget._shown[pos + 1]
                if prefetch:  # the annotator looks at the case meanwhile
                    _wait(lambda nxt=nxt, s=s: s.cached_prediction(
                        nxt, widget._prediction_settings()) is not None, timeout,
                        "the prefetch")
                _settle(widget, timeout)
                _idle(0.5)
                cached = s.cached_prediction(nxt, widget._prediction_settings()) is not None
                name = prediction_name(widget._all[nxt].name)
                row = _timed(viewer, widget, widget.next_case, name, timeout)
                row.update(case=widget._all[nxt].name, prefetched=cached)
                out.append(row)
                C.log(f"  Next -> {row['case']}: {row['seconds']:.3f} s "
                      f"({'prefetched' if cached else 'not prefetched'})", quiet)
            return out

        prefetched = steps(cases, True)
        during: list[dict] = []
        finetune_info: dict = {}
        if during_finetune:  # Next while learning as you go fine-tunes in the background
            thread, finetune_info = _background_finetune(widget.records, checkpoint,
                                                         during_finetune)
            during = [r for r in steps(cases, True) if thread.is_alive()]
            finetune_info["next_presses_during"] = len(during)
            thread.join()
        if screenshot is not None:
            _settle(widget, timeout)
            _even_docks(viewer)
            _idle(0.5)
            _draw(viewer)
            image = qt_window.grab().toImage()
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            if not image.save(str(screenshot)):
                raise RuntimeError(f"could not write {screenshot}")
            C.log(f"screenshot: {screenshot} ({image.width()}x{image.height()})", quiet)
        plain: list[dict] = []
        if baseline:
            widget.prefetch_next = False
            _settle(widget, timeout)
            widget.session.clear_predictions()
            plain = steps(cases, False)
        _settle(widget, timeout)
        scroll_min = widget.native.minimumSizeHint().height()
        return {
            "root": C.repo_relative(root),
            "checkpoint": C.repo_relative(checkpoint),
            "cases_listed": n_cases,
            "window": list(WINDOW),
            "set_root_s": set_root_s,
            "first": first,
            "prefetched": prefetched,
            "not_prefetched": plain,
            "during_finetune": during,
            "finetune": finetune_info,
            "browser_min_height_px": scroll_min,
        }
    finally:
        viewer.close()


def _summary(rows: list[dict]) -> dict:
    med, q25, q75 = C.median_iqr(r["seconds"] for r in rows)
    return {"n": len(rows), "median_s": med, "q25_s": q25, "q75_s": q75,
            "max_s": max((r["seconds"] for r in rows), default=float("nan")),
            "all_prefetched": all(r["prefetched"] for r in rows) if rows else None}


def _parts(rows: list[dict]) -> str:
    return " / ".join(C.fmt(C.median_iqr(r[k] for r in rows)[0])
                      for k in ("layer_s", "call_s", "cleanup_s"))


def markdown(payload: dict, command: str) -> str:
    """The results table."""
    pre, plain = payload["summary"]["prefetched"], payload["summary"]["not_prefetched"]
    first = payload["first"]
    if first["after_warmup"]:
        first_row = (f"first case: Open once the browser's warm-up (model load and first "
                     f"prediction, started on choosing the folder: {first['warmup_s']:.1f} s) "
                     f"is done")
    else:
        first_row = ("first case: Open right after choosing the folder (cold: model load and "
                     "first run)")
    lines = [
        "# Scan browser latency: Next -> mask shown",
        "",
        f"`{command}`",
        "",
        f"Folder `{payload['root']}` ({payload['cases_listed']} cases), checkpoint "
        f"`{payload['checkpoint']}`, napari window {payload['window'][0]}x"
        f"{payload['window'][1]} with Segment lesions and Scan browser docked, "
        f"{payload['hardware'].get('torch_threads', '?')} torch threads; load average "
        f"(1 min) {payload['load_average']['before'][0]:.1f} before and "
        f"{payload['load_average']['after'][0]:.1f} after the run (other jobs on the same "
        f"CPUs).",
        "",
        "| step | cases | median s | IQR s | max s | target s | median: layer in / "
        "call returned / cleanup done s |",
        "|---|---:|---:|---:|---:|---:|---|",
        f"| choosing the folder (listing; the warm-up: the first case's layers made, transparent, "
        f"and its prediction started) | 1 | {C.fmt(payload['set_root_s'])} | – | – | – | – |",
        f"| {first_row} | 1 | {C.fmt(first['seconds'])} | – | – | {TARGET_FIRST} | "
        f"{C.fmt(first['layer_s'])} / {C.fmt(first['call_s'])} / "
        f"{C.fmt(first['cleanup_s'])} |",
        f"| Next, prefetched | {pre['n']} | {C.fmt(pre['median_s'])} | "
        f"{C.fmt(pre['q25_s'])}–{C.fmt(pre['q75_s'])} | {C.fmt(pre['max_s'])} | "
        f"{TARGET_PREFETCHED} | {_parts(payload['prefetched'])} |",
    ]
    if plain["n"]:
        lines.append(
            f"| Next, not prefetched (prefetch off: a forward pass per Next) | {plain['n']} | "
            f"{C.fmt(plain['median_s'])} | {C.fmt(plain['q25_s'])}–{C.fmt(plain['q75_s'])} | "
            f"{C.fmt(plain['max_s'])} | – | {_parts(payload['not_prefetched'])} |")
    during = payload["summary"].get("during_finetune", {"n": 0})
    if during["n"]:
        ft = payload.get("finetune", {})
        lines.append(
            f"| Next, prefetched, while a site fine-tune on {ft.get('pairs')} cases runs in "
            f"the background ({C.fmt(ft.get('seconds'), 1)} s) | {during['n']} | "
            f"{C.fmt(during['median_s'])} | {C.fmt(during['q25_s'])}–{C.fmt(during['q75_s'])} "
            f"| {C.fmt(during['max_s'])} | {TARGET_PREFETCHED} | "
            f"{_parts(payload['during_finetune'])} |")
    lines += [
        "",
        "Shown = the prediction Labels layer is in the viewer and the canvas was repainted. "
        "Each prefetched Next waits first until the background prediction of that case is "
        "done (what the annotator's time on a case allows), then times the Next: autosave, "
        "reading the next image and swapping it, its ground truth and its prefetched mask "
        "into the layers of the case left (the same image, Labels and prompt layers, "
        "renamed), one draw. Per case (s): "
        + ", ".join(f"{r['case']} {r['seconds']:.3f}" for r in payload["prefetched"]) + ".",
        "",
        f"The Scan browser's minimum height: {payload['browser_min_height_px']} px (its rows "
        "scroll).",
        "",
        C.hardware_markdown(payload["hardware"]),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_common_args(parser, device=False)
    parser.add_argument("--root", default=str(C.DEFAULT_BUSBRA),
                        help="folder of scans (default: ../shared/data/busbra-fold1)")
    parser.add_argument("--cases", type=int, default=10, help="Next presses per arm (10)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the arm without prefetch")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per wait")
    parser.add_argument("--screenshot", default=None,
                        help="save the window (both docks) after the prefetched Nexts")
    parser.add_argument("--warm-first", action="store_true",
                        help="open the first case once the warm-up prediction (started when "
                        "the folder is chosen) is done, instead of at once")
    parser.add_argument("--during-finetune", type=int, default=0, metavar="N",
                        help="also time prefetched Nexts while a site fine-tune on N labelled "
                        "cases of the folder runs in a background thread (learning as you "
                        "go's load); 0 (default): not")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    threads = C.set_threads(args.threads)
    root = C.require_dir(args.root, "the folder of scans", "--root")
    checkpoint = C.resolve_checkpoint(args.checkpoint)
    os.environ.setdefault("BUSSEG_HOME", tempfile.mkdtemp(prefix="busseg_home_"))
    from speed import _ensure_plugin

    _ensure_plugin()
    load_before = os.getloadavg()
    payload = run(root, checkpoint, args.cases, not args.no_baseline, args.timeout,
                  Path(args.screenshot) if args.screenshot else None, args.quiet,
                  warm_first=args.warm_first, during_finetune=args.during_finetune)
    payload["summary"] = {"prefetched": _summary(payload["prefetched"]),
                          "not_prefetched": _summary(payload["not_prefetched"]),
                          "during_finetune": _summary(payload["during_finetune"])}
    payload["load_average"] = {"before": list(load_before), "after": list(os.getloadavg())}
    payload["hardware"] = C.hardware_info("cpu")
    assert payload["hardware"]["torch_threads"] == threads
    payload["targets"] = {"prefetched_s": TARGET_PREFETCHED, "first_s": TARGET_FIRST}
    command = "OMP_NUM_THREADS=2 xvfb-run -a -s \"-screen 0 1600x1000x24\" python " + " ".join(
        ["benchmarks/browser_latency.py", *(argv if argv is not None else sys.argv[1:])])
    payload["command"] = command
    paths = C.write_results(args.out, "browser_latency", markdown(payload, command), payload)
    C.log(f"wrote {paths['md']} and {paths['json']}", args.quiet)
    pre = payload["summary"]["prefetched"]
    C.log(f"first case {payload['first']['seconds']:.3f} s; prefetched Next median "
          f"{pre['median_s']:.3f} s", args.quiet)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
