"""The ``busseg`` command: segment image files headlessly, and describe the installation.

Examples
--------
::

    busseg predict --samples --out preds/              # the three shipped sample cases
    busseg predict scans/ one.png --out preds/ --tta   # folders (BUSI or plain) and files
    busseg predict Dataset_BUSI_with_GT --out preds/ --checkpoint runs/x/best
    busseg info
    busseg rank Dataset_BUSI_with_GT --out ranking.csv  # most uncertain images first

``busseg predict`` writes one ``<stem>_mask.png`` (0 = background, 255 = lesion, the image's
own size) per image. With a model that has an image-level class head (normal / benign /
malignant) it also writes ``OUT/classes.csv`` (columns path, p_normal, p_benign, p_malignant,
gated; research output, not a diagnosis) and applies the checkpoint's normal-scan gate
(``--no-gate`` switches it off; see :func:`busseg.inference.predict`), then the checkpoint's
region filter, which removes regions of the automatic mask unlikely to be lesions
(``--no-region-filter`` switches it off; :mod:`busseg.region_filter`). Folders are indexed by
:func:`busseg.data.discover` (BUSI, BUS-BRA / BUS-UCLM image and mask folders, any folder of
scans, searched recursively; single-frame DICOM with pydicom); the layout under each PATH
folder is mirrored in OUT (a BUSI folder gives ``OUT/benign/benign (1)_mask.png`` ...);
single files go straight into OUT. The ``path`` column of ``classes.csv`` is the image's
path relative to its PATH folder (the shipped samples' folder for ``--samples``; the file
name for single files), the same relative place its mask has under OUT. Mask files are never
taken as input; when an image has ground-truth masks (BUSI ``<stem>_mask*.png`` siblings, or
the dataset's mask folder as :func:`busseg.data.discover` pairs it, for a folder and for a
single image file alike), its Dice is printed, and the mean at the end. Empty files and files
that do not open as an image are named once and refused before torch and the model load.

Output is plain text when it is not a terminal (no progress bar frames), and a closed pipe
(``busseg rank ... | head -1``) silences the output without a traceback; the work goes on.

Exit status: 0 all masks written; 1 the run finished but some images were skipped because
their output exists (pass ``--overwrite`` to replace) or could not be read, including when
no mask at all was written; 2 nothing was done because of a usage error (missing file, no
images, bad checkpoint or device); 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys

from busseg.cli.common import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_USAGE,
    UsageError,
    add_inference_args,
    filter_status,
    gate_status,
    load_cli_model,
    print_error,
    probability_arg,
)
from busseg.cli.info import add_info_parser, model_card_lines, run_info
from busseg.cli.inputs import Job, collect_jobs
from busseg.cli.predict import (
    CLASSES_COLUMNS,
    CLASSES_CSV,
    add_predict_parser,
    run_predict,
    write_classes_csv,
)
from busseg.cli.rank import add_rank_parser, run_rank

__all__ = [
    "CLASSES_COLUMNS", "CLASSES_CSV", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_PARTIAL",
    "EXIT_USAGE", "Job", "UsageError", "add_inference_args", "build_parser", "collect_jobs",
    "filter_status", "gate_status", "load_cli_model", "main", "model_card_lines", "probability_arg",
    "write_classes_csv",
]

_EPILOG = """examples:
  busseg predict --samples --out preds/              # the three shipped sample cases
  busseg predict scans/ one.png --out preds/ --tta   # folders (BUSI or plain) and files
  busseg predict Dataset_BUSI_with_GT --out preds/ --checkpoint runs/x/best
  busseg info
  busseg rank Dataset_BUSI_with_GT --out ranking.csv  # most uncertain images first

exit status: 0 all masks written; 1 finished, but some images were skipped (output exists
without --overwrite, or unreadable) or none was written; 2 usage error, nothing done;
130 interrupted.
"""


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of the ``busseg`` command.

    Returns
    -------
    argparse.ArgumentParser
        With the sub-commands ``predict``, ``rank`` and ``info``.
    """
    from busseg import __version__

    ap = argparse.ArgumentParser(
        prog="busseg",
        description="Breast-ultrasound lesion segmentation with a U-Net (napari-busseg).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--version", action="version", version=f"busseg {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    add_predict_parser(sub)
    add_rank_parser(sub)
    add_info_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run the ``busseg`` command.

    Parameters
    ----------
    argv : list of str, optional
        Arguments without the program name; default ``sys.argv[1:]``.

    Returns
    -------
    int
        Exit status: 0 success, 1 finished with skipped images, 2 usage error, 130
        interrupted (argparse errors exit with 2 through ``SystemExit``).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _PipeGuard(out), _PipeGuard(err)
    try:
        if args.command == "predict":
            return run_predict(args)
        if args.command == "rank":
            return run_rank(args)
        return run_info(args)
    except UsageError as exc:
        print_error(str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        print_error("interrupted; masks written so far are complete (each file is written "
                    "atomically)")
        return EXIT_INTERRUPTED
    finally:
        sys.stdout, sys.stderr = out, err


class _PipeGuard:
    """A text stream that goes quiet when its reader goes away (``busseg rank ... | head -1``).

    The first ``BrokenPipeError`` points the file descriptor at ``os.devnull`` (so Python's
    final flush at exit does not fail either) and drops all later output; the command goes on
    and exits with its usual status, without a traceback.
    """

    def __init__(self, stream) -> None:
        self._stream = stream
        self.broken = False

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._silence()
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._silence()

    def _silence(self) -> None:
        self.broken = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, self._stream.fileno())
            finally:
                os.close(devnull)
        except (OSError, ValueError, AttributeError):  # no real file descriptor (tests)
            pass

    def __getattr__(self, name: str):
        return getattr(self._stream, name)
