"""The ``eval`` subcommand: ``ncutfast eval {corloc,saliency,coco}``.

Each prints its summary as the last line of stdout, notes (excluded images, resized predictions) on stderr,
and with ``--per-image FILE`` a CSV with one row per image (an existing FILE is never overwritten). Exit
status 0, or 2 with one line on stderr for a user error (missing or malformed files, unmatched images).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

__all__ = ["register"]

_MATCH = ("Images are matched by file name without folders and extension: a label JSON's "
          "'JPEGImages/000005.jpg' matches VOC's Annotations/000005.xml, COCO's '000005.jpg' and an image-list "
          "line '000005' or 'train2014/000005.jpg'.")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--per-image", type=Path, default=None, metavar="FILE",
                   help="also write one CSV row per image to FILE (must not exist)")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``eval`` subcommand and its three metrics (each sets ``func(args) -> exit status``)."""
    p = subparsers.add_parser("eval", help="score labels: CorLoc, saliency maxF/IoU/Acc, class-agnostic COCO AP",
                              description="Score pseudo-labels with TokenCut's and CutLER's metrics. " + _MATCH)
    sub = p.add_subparsers(dest="metric", required=True)

    c = sub.add_parser("corloc", help="CorLoc of the predicted boxes (TokenCut object discovery)",
                       description="Percentage of images whose predicted box (the highest-score annotation, "
                       "or any with --any) has IoU >= 0.5 with a GT box, IoU computed exactly as TokenCut "
                       "(VOC boxes (xmin-1, ymin-1, xmax, ymax); COCO boxes (x, y, x+w, y+h) rounded, iscrowd "
                       "dropped). An image without prediction is a miss; one without GT box is excluded. "
                       "Last line: 'CorLoc: 68.80% (3431/4987)'. " + _MATCH)
    c.add_argument("--pred", type=Path, required=True, metavar="LABELS.json", help="ncutfast label output")
    c.add_argument("--gt", type=Path, required=True, metavar="PATH",
                   help="VOC root (with Annotations/*.xml) or COCO instances JSON")
    c.add_argument("--gt-format", choices=("voc", "coco"), required=True, help="format of --gt")
    c.add_argument("--image-list", type=Path, default=None, metavar="FILE",
                   help="evaluate only the images listed (one per line), e.g. VOC's ImageSets/Main/trainval.txt "
                   "or TokenCut's coco_20k_filenames.txt")
    c.add_argument("--any", action="store_true", help="an image is correct when any predicted box hits")
    _common(c)
    c.set_defaults(func=_run_corloc)

    s = sub.add_parser("saliency", help="maxF (beta^2 = 0.3), IoU and accuracy of saliency maps",
                       description="TokenCut's saliency metrics on 8-bit PNG maps (value / 255) against PNG GT "
                       "masks (non-zero = foreground), matched by file stem: IoU and accuracy at > 0.5, maxF over "
                       "the thresholds 0, 1/255, ..., 254/255 (F averaged over images, then maximised). A map of "
                       "another size than its GT is resized to it (nearest neighbour), with a note per image. "
                       "Last line: 'maxF: 80.30 IoU: 71.20 Acc: 91.80'.")
    s.add_argument("--pred", type=Path, required=True, metavar="DIR",
                   help="folder of <stem>.png maps, searched recursively (e.g. label --masks-dir's "
                   "DIR/tokencut or DIR/bilateral)")
    s.add_argument("--gt", type=Path, required=True, metavar="DIR", help="folder of <stem>.png GT masks")
    _common(s)
    s.set_defaults(func=_run_saliency)

    k = sub.add_parser("coco", help="class-agnostic COCO AP / AP50 / AR100 of boxes and masks",
                       description="pycocotools' COCOeval with every GT category counted as one class; detections "
                       "are the label JSON's annotations with their 'score'. Last two lines: 'bbox AP: .. AP50: "
                       ".. AR100: ..' and the same for 'segm'. " + _MATCH)
    k.add_argument("--pred", type=Path, required=True, metavar="LABELS.json", help="ncutfast label output")
    k.add_argument("--gt", type=Path, required=True, metavar="instances.json", help="COCO instances JSON")
    k.add_argument("--image-list", type=Path, default=None, metavar="FILE",
                   help="evaluate only the images listed (one per line)")
    _common(k)
    k.set_defaults(func=_run_coco)


def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="ncutfast: %(message)s", stream=sys.stderr)


def _names(names: list[str], limit: int = 10) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _finish(args: argparse.Namespace, compute) -> int:
    from ._common import EvalError, write_csv

    _setup_logging()
    try:
        if args.per_image is not None and args.per_image.exists():
            raise EvalError(f"per-image file {args.per_image} already exists; choose another path (it is never "
                            "overwritten)")
        result = compute()
        if args.per_image is not None:
            write_csv(args.per_image, result.CSV_HEADER, result.csv_rows())
    except EvalError as exc:
        print(f"ncutfast eval {args.metric}: error: {exc}", file=sys.stderr)
        return 2
    print(result.summary())
    return 0


def _run_corloc(args: argparse.Namespace) -> int:
    from ._corloc import corloc

    def compute():
        res = corloc(args.pred, args.gt, args.gt_format, image_list=args.image_list, any_box=args.any)
        log = logging.getLogger("ncutfast.eval")
        if res.no_gt:
            log.info("%d image(s) without GT box, excluded: %s", len(res.no_gt), _names(res.no_gt))
        if res.no_prediction:
            log.info("%d image(s) without prediction, counted as misses: %s", len(res.no_prediction),
                     _names(res.no_prediction))
        return res

    return _finish(args, compute)


def _run_saliency(args: argparse.Namespace) -> int:
    from ._saliency import saliency

    return _finish(args, lambda: saliency(args.pred, args.gt))


def _run_coco(args: argparse.Namespace) -> int:
    from ._coco import coco

    return _finish(args, lambda: coco(args.pred, args.gt, image_list=args.image_list))
