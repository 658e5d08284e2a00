"""Draw the map of napari-busseg: its layers and its two data flows, as one picture.

Run from the repository root with the project's Python::

    .venv/bin/python docs/architecture_diagram.py                 # docs/images/architecture.png
    .venv/bin/python docs/architecture_diagram.py --out /tmp/a.png

Three panels, one colour per layer:

- **left, the layers** of the package, top (napari side) to bottom (data); a module imports
  only from its own band and the bands below it;
- **middle, a file to a Labels layer**: the functions a scan passes through on its way from a
  file to the editable ``"<image> prediction"`` layer;
- **right, corrections to a checkpoint**: from the case the annotator leaves in the Scan
  browser to the site checkpoint the session switches to.

Each box of a flow has the colour of the layer its function lives in. The picture is 2400 px
wide (12 inches at 200 dpi; white background, a 128-colour palette), with text sized to stay
readable when shown 1200 px wide.
After drawing, the script checks that every text lies inside its box and that no two boxes
overlap, and fails (exit status 1) if not. Only matplotlib (the Agg backend) and Pillow are
needed; ``busseg`` itself is not imported.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "images" / "architecture.png"

#: Figure size in inches and output resolution: 12 in x 200 dpi = 2400 px wide.
WIDTH, HEIGHT, DPI = 12.0, 9.25, 200
#: Font sizes in points (at 1200 px display width, 1 pt is about 1.4 px).
TITLE_PT, HEAD_PT, CODE_PT, TEXT_PT, SMALL_PT = 15, 11.5, 8.6, 8.6, 8.0
MONO = "DejaVu Sans Mono"
SANS = "DejaVu Sans"

#: Layer name -> (fill colour, edge colour).
COLOURS = {
    "napari": ("#fde2e4", "#c0392b"),
    "entry": ("#fff1c9", "#b7950b"),
    "loop": ("#e3f4e1", "#27ae60"),
    "engine": ("#dcebfa", "#2e86c1"),
    "models": ("#ebe1f5", "#8e44ad"),
    "data": ("#e8e8e8", "#566573"),
    "shared": ("#ffffff", "#7f8c8d"),
    "outside": ("#ffffff", "#2c3e50"),
}


@dataclass
class Box:
    """A drawn box and the texts that must stay inside it (for the layout check)."""

    name: str
    patch: FancyBboxPatch
    texts: list


BOXES: list[Box] = []


def box(ax, x: float, y: float, w: float, h: float, lines: list[tuple[str, str]], layer: str,
        *, name: str = "", align: str = "left", lw: float = 1.4, dashed: bool = False) -> Box:
    """Draw a rounded box with lines of text, top-aligned, and remember it.

    Parameters
    ----------
    ax : matplotlib.axes.Axes
        Axes whose data coordinates are inches (origin bottom left).
    x, y, w, h : float
        Lower-left corner, width and height in inches.
    lines : list of (str, str)
        ``(text, style)`` with style ``"code"`` (monospace), ``"bold"``, ``"text"`` or
        ``"small"``.
    layer : str
        A key of :data:`COLOURS`.
    name : str
        Name used in the layout check's messages.
    align : {"left", "center"}
        Horizontal text alignment.
    lw : float
        Edge line width in points.
    dashed : bool
        Dashed edge.

    Returns
    -------
    Box
    """
    face, edge = COLOURS[layer]
    patch = FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0,rounding_size=0.06",
                           facecolor=face, edgecolor=edge, linewidth=lw,
                           linestyle="--" if dashed else "-", zorder=2)
    ax.add_patch(patch)
    texts = []
    cy = y + h - 0.07
    for text, style in lines:
        size = {"code": CODE_PT, "bold": TEXT_PT, "text": TEXT_PT, "small": SMALL_PT}[style]
        family = MONO if style == "code" else SANS
        weight = "bold" if style == "bold" else "normal"
        colour = "#444444" if style == "small" else "#111111"
        tx = x + 0.08 if align == "left" else x + w / 2
        t = ax.text(tx, cy, text, ha=align, va="top", fontsize=size, family=family,
                    weight=weight, color=colour, zorder=3)
        texts.append(t)
        cy -= size * 1.42 / 72
    b = Box(name or (lines[0][0] if lines else "box"), patch, texts)
    BOXES.append(b)
    return b


def arrow(ax, start: tuple[float, float], end: tuple[float, float], colour: str = "#333333",
          *, rad: float = 0.0, lw: float = 1.6, style: str = "-|>", dashed: bool = False):
    """Draw an arrow from ``start`` to ``end`` (inches); ``rad`` bends it."""
    a = FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=13, color=colour,
                        linewidth=lw, connectionstyle=f"arc3,rad={rad}",
                        linestyle="--" if dashed else "-", zorder=4, shrinkA=0, shrinkB=0)
    ax.add_patch(a)
    return a


# --------------------------------------------------------------------------- the layers

#: The bands of the left panel, top to bottom: (layer, title, module lines).
LAYERS = [
    ("napari", "napari side: may import Qt, napari, magicgui", [
        ("_widgets/  browser (+ _cases _layers _predict", "code"),
        ("           _learning _ranking _keys)", "code"),
        ("           segment (+ prompts, segment_results)", "code"),
        ("           finetune   _common.start_worker", "code"),
        ("_reader.py  _writer.py  _sample_data.py", "code"),
    ]),
    ("entry", "jobs and entry points", [
        ("jobs.py  segment_job  prompt_job", "code"),
        ("cli/     busseg predict | rank | info", "code"),
        ("outside src/: training/  benchmarks/", "code"),
    ]),
    ("loop", "the loop: answers, fine-tunes, costs", [
        ("session.py (+ _records _predict _learning", "code"),
        ("            _types)  corrections.py", "code"),
        ("manifest.py  finetune.py  annotator.py", "code"),
        ("calibration.py  uncertainty.py", "code"),
    ]),
    ("engine", "engine and inference", [
        ("engine/  loop trainer evaluation hooks", "code"),
        ("         state curves guidance config", "code"),
        ("inference.py (+ inputs model_cache stack", "code"),
        ("              gating)  region_filter.py", "code"),
        ("prompts.py  postprocess.py  losses.py", "code"),
    ]),
    ("models", "models and checkpoints", [
        ("models/  registry base decoder unet", "code"),
        ("         resnet efficientnet checkpoint", "code"),
        ("site.py  (site checkpoint, SiteModel)", "code"),
        ("checkpoint_id.py  (identity, no torch)", "code"),
    ]),
    ("data", "data: files -> records -> arrays", [
        ("data/  discover busi io dicom", "code"),
        ("       transforms dataset splits", "code"),
    ]),
]


def draw_layers(ax, x0: float, top: float, width: float) -> dict[str, tuple[float, float]]:
    """Draw the layer bands; return layer -> (y bottom, y top) of its band."""
    gap = 0.10
    bands: dict[str, tuple[float, float]] = {}
    y = top
    for layer, title, lines in LAYERS:
        h = 0.18 + (1 + len(lines)) * CODE_PT * 1.42 / 72
        box(ax, x0, y - h, width, h, [(title, "bold"), *lines], layer, name=f"layer {layer}")
        bands[layer] = (y - h, y)
        y -= h + gap
    return bands


# --------------------------------------------------------------------------- the flows


def flow(ax, x: float, top: float, width: float, steps: list, colour: str,
         gap: float = 0.17) -> list[Box]:
    """Draw a column of boxes joined by arrows, top to bottom; return the boxes.

    ``steps``: ``(layer, [(text, style), ...])`` per box.
    """
    out = []
    y = top
    for k, (layer, lines) in enumerate(steps):
        h = 0.12 + sum({"code": CODE_PT, "small": SMALL_PT}.get(s, TEXT_PT) * 1.42 / 72
                       for _, s in lines)
        b = box(ax, x, y - h, width, h, lines, layer, name=f"{colour} step {k + 1}")
        if out:
            arrow(ax, (x + width / 2, y + gap), (x + width / 2, y), colour)
        out.append(b)
        y -= h + gap
    return out


FLOW_FILE = [
    ("outside", [("1  a scan file or a folder", "bold"),
                 ("PNG JPEG TIFF BMP, DICOM (pydicom)", "small")]),
    ("napari", [("2  _reader.napari_get_reader", "code"),
                ("read_case / read_folder", "code")]),
    ("data", [("3  data.discover(root) -> records", "code"),
              ("image path, mask paths, label, group", "small"),
              ("data.io.read_image -> (H, W) uint8", "code")]),
    ("entry", [("4  jobs.segment_job in start_worker", "code"),
               ("browser: AnnotationSession.predict,", "small"),
               ("prefetch_job (the same call); prompts:", "small"),
               ("jobs.prompt_job -> predict(boxes=...)", "small")]),
    ("engine", [("5  inference.load_model (cached)", "code"),
                ("site checkpoint -> SiteModel: automatic", "small"),
                ("images vote/adapted, prompted -> its", "small"),
                ("prompt network", "small")]),
    ("engine", [("6  inference.predict", "code"),
                ("preprocess -> network -> proba at the", "small"),
                ("original size -> threshold", "small"),
                ("automatic only: gate, region filter", "small")]),
    ("entry", [("7  mask (H, W) bool -> SegmentResult", "code")]),
    ("napari", [('8  "<image> prediction" Labels layer', "code"),
                ("written in the returned slot; an edited", "small"),
                ("layer is never overwritten silently", "small")]),
]

FLOW_CORRECTIONS = [
    ("napari", [("1  the annotator leaves a case", "bold"),
                ("its prediction layer, edited or not;", "small"),
                ("Scan browser: Next, Previous, Open, close", "small")]),
    ("loop", [("2  AnnotationSession.next/goto", "code"),
              ("<class>/<name>.png + _mask.png, a", "small"),
              ("manifest.csv row (seq, status), atomic", "small")]),
    ("loop", [("3  finetune_due -> finetune_job", "code"),
              ("recorded_pairs(): recorded order", "small"),
              ("later_split: latest answers held out", "small")]),
    ("engine", [("4  finetune_iter -> engine.fit_iter", "code"),
                ('recipe "site", from drawing_base', "small")]),
    ("models", [("5  site.make_site_checkpoint", "code"),
                ("adapted + base/; prompts: the adapted", "small"),
                ("network only if >= 0.5 cheaper per scan", "small"),
                ("on >= 10 held-out lesions (prompt_costs)", "small")]),
    ("loop", [("6  heldout_costs -> annotator", "code"),
              ("adopt if interactions per held-out", "small"),
              ("scan <= the current checkpoint's", "small")]),
    ("napari", [("7  session.checkpoint = new", "code"),
                ("ViewerState.checkpoint: Segment lesions,", "small"),
                ("the browser and the next predictions", "small"),
                ("follow (the arrow to step 5, left)", "small")]),
]


def draw(out: Path) -> list[str]:
    """Draw the picture into ``out``; return the layout problems found (empty: none)."""
    fig = plt.figure(figsize=(WIDTH, HEIGHT), dpi=DPI, facecolor="white")
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, WIDTH)
    ax.set_ylim(0, HEIGHT)
    ax.axis("off")

    ax.text(0.25, HEIGHT - 0.22, "napari-busseg: the layers and the two data flows", ha="left",
            va="top", fontsize=TITLE_PT, weight="bold", family=SANS)
    ax.text(0.25, HEIGHT - 0.55, "segment, correct by hand, fine-tune, segment better; "
            "each box of a flow has the colour of its layer", ha="left", va="top",
            fontsize=TEXT_PT + 0.4, family=SANS, color="#333333")

    # left: the layers
    lx, lw_, top = 0.25, 4.45, HEIGHT - 1.25
    ax.text(lx, top + 0.3, "The layers (imports point down)", fontsize=HEAD_PT, weight="bold",
            family=SANS, va="center")
    bands = draw_layers(ax, lx + 0.3, top, lw_ - 0.3)
    # the import direction
    arrow(ax, (lx + 0.13, top - 0.05), (lx + 0.13, bands["data"][0] + 0.05), "#555555",
          lw=2.2)
    # the Qt line between the napari side and the core
    qy = (bands["napari"][0] + bands["entry"][1]) / 2
    ax.plot([lx + 0.3, lx + lw_], [qy, qy], color="#c0392b", lw=1.6, ls=(0, (5, 3)), zorder=5)
    # shared modules and the viewer state, under the bands
    sy = bands["data"][0] - 0.14
    shared = box(ax, lx + 0.3, sy - 0.78, lw_ - 0.3, 0.78, [
        ("Qt-free modules beside the bands", "bold"),
        ("devices.py  metrics.py: any layer", "code"),
        ("layers.py: layer names and metadata", "code"),
        ("state.py: the ViewerState widgets observe", "code"),
    ], "shared", name="shared", dashed=True)
    del shared

    # middle: a file to a Labels layer
    mx, mw = 5.0, 3.25
    ax.text(mx, top + 0.3, "A file to a Labels layer", fontsize=HEAD_PT, weight="bold",
            family=SANS, va="center", color="#1f4e79")
    f1 = flow(ax, mx, top, mw, FLOW_FILE, "#1f4e79")

    # the rules, under the first flow
    rules_top = f1[-1].patch.get_y() - 0.3
    box(ax, mx, rules_top - 1.72, mw, 1.72, [
        ("Rules (checked by tests)", "bold"),
        ("- the core, below the red dashed line,", "text"),
        ("  never imports Qt or napari", "text"),
        ("- import busseg imports no torch; torch", "text"),
        ("  loads with models/, engine/, inference,", "text"),
        ("  prompts, losses, finetune; the napari", "text"),
        ("  side loads it only to predict or train", "text"),
        ("- widgets never find each other: they", "text"),
        ("  share one ViewerState (state.py)", "text"),
    ], "outside", name="rules", lw=1.0)

    # right: corrections to a checkpoint
    rx, rw = 8.55, 3.25
    ax.text(rx, top + 0.3, "Corrections to a checkpoint", fontsize=HEAD_PT, weight="bold",
            family=SANS, va="center", color="#1e6b34")
    f2 = flow(ax, rx, top, rw, FLOW_CORRECTIONS, "#1e6b34")

    # calibration, beside the last step of the correction flow
    last = f2[-1].patch
    cal_top = last.get_y() - 0.32
    cal = box(ax, rx, cal_top - 1.05, rw, 1.05, [
        ("site calibration (no training)", "bold"),
        ("SiteCalibrator.observe(each answer);", "small"),
        ("every 5, fit_calibration re-chooses the", "small"),
        ("region-filter threshold and the gate ->", "small"),
        ("calibration.json; the next masks use it", "small"),
    ], "loop", name="calibration", dashed=True)
    # calibration reads the recorded answers: an elbow along the right margin
    s2 = f2[1].patch
    y2 = s2.get_y() + s2.get_height() / 2
    yc = cal.patch.get_y() + cal.patch.get_height() / 2
    xm = rx + rw + 0.1
    ax.plot([rx + rw, xm, xm], [y2, y2, yc], color="#1e6b34", lw=1.2, ls=(0, (4, 3)), zorder=4)
    arrow(ax, (xm, yc), (rx + rw, yc), "#1e6b34", lw=1.2)
    # the adopted checkpoint feeds the next predictions (flow 1, step 5): an elbow in the gap
    last, load = f2[-1].patch, f1[4].patch
    y7 = last.get_y() + last.get_height() / 2
    y5 = load.get_y() + load.get_height() / 2
    xg = (mx + mw + rx) / 2
    ax.plot([rx, xg, xg], [y7, y7, y5], color="#1e6b34", lw=1.8, zorder=4)
    arrow(ax, (xg, y5), (mx + mw, y5), "#1e6b34", lw=1.8)

    problems = check_layout(fig)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, facecolor="white")
    plt.close(fig)
    shrink(out)
    return problems


def shrink(path: Path, colours: int = 128) -> None:
    """Rewrite the PNG with a palette of ``colours`` (about a third of the size, same look).

    Uses Pillow, which matplotlib depends on. The picture has a few flat colours and
    anti-aliased text, so an undithered median-cut palette keeps the text sharp.
    """
    from PIL import Image

    with Image.open(path) as im:
        rgb = im.convert("RGB")
    pal = rgb.quantize(colors=colours, method=Image.Quantize.MEDIANCUT,
                       dither=Image.Dither.NONE)
    pal.save(path, optimize=True)


def check_layout(fig) -> list[str]:
    """Return the texts that leave their box and the boxes that overlap (empty: none)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    problems = []
    extents = []
    for b in BOXES:
        be = b.patch.get_window_extent(renderer)
        extents.append((b.name, be))
        for t in b.texts:
            te = t.get_window_extent(renderer)
            if (te.x0 < be.x0 + 1 or te.x1 > be.x1 - 1 or te.y0 < be.y0 + 1
                    or te.y1 > be.y1 - 1):
                problems.append(f"text {t.get_text()!r} leaves the box {b.name!r}")
    for i, (na, ea) in enumerate(extents):
        for nb, eb in extents[i + 1:]:
            if ea.overlaps(eb):
                problems.append(f"boxes {na!r} and {nb!r} overlap")
    if extents and min(e.y0 for _, e in extents) < 0:
        problems.append("a box runs off the bottom of the figure")
    return problems


def main(argv: list[str] | None = None) -> int:
    """Draw the picture; exit status 1 when the layout check finds a problem."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="PNG to write")
    args = ap.parse_args(argv)
    problems = draw(args.out)
    for p in problems:
        print(f"layout: {p}", file=sys.stderr)
    print(f"wrote {args.out}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
