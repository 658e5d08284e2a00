"""Make the README screenshot: napari with the "Segment lesions" widget on a BUSI test image.

Run it under a virtual display (no window appears; the window is rendered off-screen)::

    xvfb-run -a -s "-screen 0 1600x1000x24" python docs/screenshot.py
    xvfb-run -a python docs/screenshot.py --checkpoint /path/to/checkpoint --case "malignant (181)"
    xvfb-run -a python docs/screenshot.py --case "malignant (181)" --box \
        --out docs/images/napari_box_prompt.png

It opens one of the shipped sample cases (``busseg/samples``, BUSI test split, so the default
model never saw it) with its expert ground truth through the plugin's reader, docks "Segment
lesions" and "Fine-tune" from the manifest, segments with the shipped default model (or
``--checkpoint``), draws the ground truth as a yellow outline over the prediction and saves a
screenshot of the whole window to ``docs/images/napari_segment.png``. It refuses to write a
black canvas (an OpenGL problem) and prints the Dice the widget shows. With ``--box`` it then
draws the tight box around the ground truth on the widget's ``"<image> boxes"`` layer, as an
annotator would, waits for the prompt update and shows that result instead.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "images" / "napari_segment.png"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (see ``--help``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", default="benign (100)",
                   help="sample case name (benign (100), malignant (181), normal (9))")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint folder; default: the shipped default model")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="PNG to write")
    p.add_argument("--size", default="1400x860", help="window size WxH in pixels")
    p.add_argument("--overwrite", action="store_true", help="replace an existing PNG")
    p.add_argument("--dock-width", type=int, default=440, help="width of the dock area (px)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the model")
    p.add_argument("--box", action="store_true",
                   help="after Run, draw the ground truth's box as a prompt and show the result")
    return p.parse_args(argv)


def _process(app, seconds: float = 0.3) -> None:
    end = time.time() + seconds
    while time.time() < end:
        app.processEvents()
        time.sleep(0.02)


def main(argv: list[str] | None = None) -> int:
    """Make the screenshot; return the exit status (0 when the PNG was written)."""
    args = parse_args(argv)
    import napari
    import numpy as np
    from napari.utils.colormaps import DirectLabelColormap
    from PIL import Image
    from qtpy.QtWidgets import QApplication

    from busseg.data.io import atomic_write_bytes
    from busseg.models import default_checkpoint_path
    from busseg.samples import sample_cases

    if args.out.exists() and not args.overwrite:
        print(f"{args.out} exists; pass --overwrite to replace it", file=sys.stderr)
        return 1
    if args.checkpoint is None and not default_checkpoint_path().is_dir():
        print(f"no shipped default model at {default_checkpoint_path()}; pass --checkpoint",
              file=sys.stderr)
        return 1
    cases = {rec.name: rec for rec in sample_cases()}
    if args.case not in cases:
        print(f"unknown case {args.case!r}; choose one of {sorted(cases)}", file=sys.stderr)
        return 1
    rec = cases[args.case]
    w, h = (int(v) for v in args.size.lower().split("x"))

    viewer = napari.Viewer(title="napari-busseg", show=True)
    app = QApplication.instance()
    viewer.window._qt_window.resize(w, h)
    viewer.open(str(rec.image_path), plugin="napari-busseg")
    _, finetune = viewer.window.add_plugin_dock_widget("napari-busseg", "Fine-tune")
    _, seg = viewer.window.add_plugin_dock_widget("napari-busseg", "Segment lesions",
                                                  tabify=True)
    seg.native.parent().raise_()  # show the segment tab in front
    from qtpy.QtCore import Qt

    viewer.window._qt_window.resizeDocks([seg.native.parent()], [args.dock_width],
                                         Qt.Orientation.Horizontal)
    seg.use_checkpoint(args.checkpoint)
    seg._image.value = viewer.layers[rec.name]
    seg._with_proba.value = False
    seg._run_btn.native.click()
    t0 = time.time()
    while seg.running and time.time() - t0 < args.timeout:
        _process(app, 0.1)
    if seg.running or seg.last_result is None:
        print(f"segmentation did not finish: {seg._status.value}", file=sys.stderr)
        return 1
    pred = viewer.layers[f"{rec.name} prediction"]
    pred.opacity = 0.45
    gt_name = f"{rec.name} ground truth"
    if args.box:
        from busseg.data.io import read_mask
        from busseg.metrics import dice_score
        from busseg.prompts import mask_to_boxes

        truth = read_mask(rec.mask_paths)
        boxes_layer, _ = seg.prompt_layers(viewer.layers[rec.name])
        for r0, c0, r1, c1 in mask_to_boxes(truth):
            boxes_layer.add_rectangles(np.array([[r0, c0], [r1, c1]]))
        t0 = time.time()
        _process(app, 0.3)
        while seg.prompt_busy and time.time() - t0 < args.timeout:
            _process(app, 0.1)
        print(f"box prompt: Dice {dice_score(np.asarray(pred.data) > 0, truth):.3f} "
              f"({time.time() - t0:.2f} s to the updated layer, display loop included)")
    if gt_name in viewer.layers:
        gt = viewer.layers[gt_name]
        gt.contour = 2
        gt.opacity = 1.0
        gt.colormap = DirectLabelColormap(color_dict={None: "transparent", 0: "transparent",
                                                      1: "#ffd000"})
        viewer.layers.move(viewer.layers.index(gt), len(viewer.layers))
    viewer.layers.selection.active = pred
    viewer.reset_view()
    _process(app, 1.0)

    shot = viewer.screenshot(canvas_only=False, flash=False)  # (H, W, 4) uint8 RGBA
    canvas = viewer.screenshot(canvas_only=True, flash=False)
    if not canvas[..., :3].any():
        print("the canvas rendered black (alpha is 255 but RGB all zero): check OpenGL under "
              "Xvfb (e.g. LIBGL_ALWAYS_SOFTWARE=1)", file=sys.stderr)
        return 1
    import io

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(shot[..., :3])).save(buf, format="PNG", optimize=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out, buf.getvalue(), overwrite=args.overwrite)
    print(f"wrote {args.out} ({shot.shape[1]}x{shot.shape[0]}); canvas mean RGB "
          f"{canvas[..., :3].reshape(-1, 3).mean(0).round(1).tolist()}")
    print(f"model: {seg.last_result.checkpoint}; {seg._status.value}")
    print(f"metrics: {seg._metrics.value}")
    finetune.close()
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
