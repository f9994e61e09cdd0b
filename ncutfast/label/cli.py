"""The ``label`` and ``merge`` subcommands (``ncutfast label --help``).

``ncutfast.cli`` calls :func:`register` on its subparsers; ``python -m ncutfast.label.cli`` runs them alone.
Exit status: 0 on success (unreadable images are logged, counted and skipped, never fatal); 2 on a usage
error, printed as one line without a traceback (no images, unreadable or mismatched weights, unsupported
arch or device, an existing ``--out`` without ``--overwrite``, a ``.parts`` folder from another command,
unfinished or corrupted shards given to ``merge``, a file that cannot be written, a missing dependency).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

__all__ = ["register", "main", "run_command", "error_line", "missing_dependency"]

#: Modules of the labeling dependencies (required by the package; missing after ``pip install --no-deps``).
LABEL_MODULES = {"PIL": "pillow", "pycocotools": "pycocotools", "tqdm": "tqdm", "safetensors": "safetensors"}


def error_line(exc: BaseException) -> str:
    """``exc``'s message as one plain line (terminal colour codes removed, whitespace runs joined)."""
    from .errors import plain

    return plain(str(exc))


def missing_dependency(exc: ModuleNotFoundError) -> str | None:
    """The one-line advice for a missing labeling dependency, or None when ``exc`` is about another module."""
    top = (exc.name or "").split(".")[0]
    if top not in LABEL_MODULES:
        return None
    return (f"the labeling dependency {LABEL_MODULES[top]!r} is not installed (no module {top!r}); "
            f"install them with: pip install {' '.join(LABEL_MODULES.values())}")


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed subcommand; a missing labeling dependency is one line on stderr and exit code 2."""
    try:
        return int(args.func(args))
    except ModuleNotFoundError as exc:
        advice = missing_dependency(exc)
        if advice is None:
            raise
        print(f"ncutfast {args.command}: error: {advice}", file=sys.stderr)
        return 2


_ARCHS = ("vit_small_patch16", "vit_small_patch8", "vit_base_patch16", "vit_base_patch8")
_AUTO_TAUS = "0.1,0.15,0.2,0.25,0.3"

_LABEL_HELP = """\
Label a folder of images with class-agnostic pseudo-masks: DINO ViT keys of the last block ->
TokenCut (one object) or MaskCut (up to --n-masks objects) -> one COCO-style JSON (category "fg",
RLE masks, bbox [x, y, w, h], area, and a confidence score per annotation).

The run is resumable: results are appended per batch to OUT.parts/; kill it at any moment and rerun
the same command to continue (no image lost or duplicated). Under torchrun every rank takes every
WORLD-th batch and rank 0 writes OUT when all have finished (or run `ncutfast merge OUT.parts --out OUT`).
Weights come only from the local --weights file (official DINO .pth, DINO training checkpoint, or
timm .pth/.safetensors); nothing is ever downloaded.

score = 1 - lambda2/lambda3 (relative eigengap of the cut, in [0, 1]; higher = better separated),
ncut = lambda2 (the relaxed Ncut value), eigengap = lambda3 - lambda2.
"""


def _tau(text: str) -> str | float:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"tau must be a number or 'auto', got {text!r}") from None


def _taus(text: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one tau")
    return vals


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _nonnegative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _add_label(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("label", help="DINO -> TokenCut/MaskCut -> COCO JSON pseudo-labels",
                       description=_LABEL_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", type=Path, metavar="IMAGES",
                   help="folder searched recursively for images, or a text file with one path per line "
                        "(relative to the file's folder); file_name in the JSON is relative to it")
    p.add_argument("--out", type=Path, required=True,
                   help="output JSON path (written atomically); an existing file is refused unless it is this "
                        "same command's earlier output (rerun = resume) or --overwrite is given")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out file that is not this command's output (never a folder)")
    p.add_argument("--weights", type=Path, required=True,
                   help="local checkpoint of the chosen --arch (.pth or .safetensors); loaded as data only")
    p.add_argument("--arch", choices=_ARCHS, default=None,
                   help="DINO backbone (default: vit_base_patch8 for maskcut as in CutLER, "
                        "vit_small_patch16 for tokencut/saliency as in TokenCut)")
    p.add_argument("--backbone", default=None, metavar="NAME",
                   help="feature backbone instead of --arch: a vendored DINO ViT name, or timm:<model> for "
                        "any timm Vision Transformer built without download (e.g. "
                        "timm:vit_small_patch14_reg4_dinov2); --weights must hold its state dict")
    p.add_argument("--mode", choices=("maskcut", "tokencut", "saliency"), default="maskcut",
                   help="maskcut: resize to --fixed-size square, up to --n-masks masks (CutLER); tokencut: "
                        "pad to a multiple of the patch, one object box+mask (TokenCut object discovery); "
                        "saliency: LANCZOS resize to a rounded multiple, one mask (TokenCut saliency). "
                        "Default: %(default)s")
    p.add_argument("--tau", type=_tau, default=None,
                   help="graph threshold, or 'auto' to try every --tau-candidates value in one run and "
                        "keep per image the cut with the highest score (default: 0.15 for maskcut, 0.2 "
                        "otherwise, as in the papers)")
    p.add_argument("--tau-candidates", type=_taus, default=_taus(_AUTO_TAUS), metavar="T1,T2,...",
                   help=f"taus tried by --tau auto (default: {_AUTO_TAUS})")
    p.add_argument("--n-masks", type=_positive, default=3,
                   help="MaskCut: cuts per image (empty ones are dropped); default %(default)s")
    p.add_argument("--fixed-size", type=_positive, default=480,
                   help="MaskCut: square side the image is resized to before the ViT (at most 4096; a batch "
                        "whose estimated memory exceeds what is available is refused before it runs); "
                        "default %(default)s")
    p.add_argument("--eps", type=float, default=1e-5, help="weight of non-edges; default %(default)s")
    p.add_argument("--sign-rule", choices=("canonical", "cutler"), default="canonical",
                   help="MaskCut's foreground rule depends on the eigenvector's arbitrary sign; 'canonical' "
                        "fixes the sign first (reproducible on every backend), 'cutler' applies CutLER's "
                        "rule to the solver's sign (bit-exact CutLER only with --backend reference). "
                        "Default: %(default)s")
    p.add_argument("--batch-size", type=_positive, default=16,
                   help="images per batch (ViT and cut run batched; a batch is the unit of resume); "
                        "default %(default)s")
    p.add_argument("--workers", type=_nonnegative, default=min(8, os.cpu_count() or 1),
                   help="DataLoader decode processes (0 = decode in the main process); default %(default)s")
    p.add_argument("--post-workers", type=_nonnegative, default=0,
                   help="processes for post-processing (pixel masks, CRF, RLE) so it overlaps the GPU; "
                        "0 = inline; default %(default)s")
    p.add_argument("--device", default="auto",
                   help="'auto' (cuda:LOCAL_RANK if a GPU is visible, else cpu), 'cpu', 'cuda', 'cuda:1'...; "
                        "default %(default)s")
    p.add_argument("--amp", choices=("none", "fp16", "bf16"), default="none",
                   help="autocast dtype for the ViT (keys are returned in float32); default %(default)s")
    p.add_argument("--precision", choices=("float32", "float64", "fast", "exact"), default="float32",
                   help="precision of the cut's similarity (see ncutfast.tokencut); default %(default)s")
    p.add_argument("--backend", default="auto",
                   help="cut backend: 'auto' picks the fastest available batched solver; 'reference' uses "
                        "the float64 SciPy specification one image at a time (slow, for checking); "
                        "default %(default)s")
    p.add_argument("--crf", action="store_true",
                   help="MaskCut only: DenseCRF refinement as in CutLER (needs pydensecrf2); off by default")
    p.add_argument("--visualize", type=Path, default=None, metavar="DIR",
                   help="write PNG overlays (masks, boxes, eigenvector heat-map) of the first images to DIR")
    p.add_argument("--visualize-count", type=_nonnegative, default=16, metavar="K",
                   help="how many images --visualize draws (the first K of the dataset); default %(default)s")
    p.add_argument("--masks-dir", type=Path, default=None, metavar="DIR",
                   help="saliency only: also write DIR/tokencut/<path>/<stem>.png (the TokenCut mask at the "
                        "original size, 0/255), and with --refine bilateral DIR/bilateral/<path>/<stem>.png "
                        "(the bilateral solver's soft output, 0..255); resumable, never overwrites a file it "
                        "did not write")
    p.add_argument("--refine", choices=("none", "bilateral"), default="none",
                   help="saliency refinement written to --masks-dir: 'bilateral' runs TokenCut's bilateral "
                        "solver (sigmas 16/16/8, lambda 256) on the original image, batched; its binary "
                        "output is drawn in the --visualize overlays. Default: %(default)s")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_run_label)


def _add_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge label shards (.parts folders) or COCO JSON files into one JSON",
                       description="Merge the shards of a label run (OUT.parts folders; all batches must be "
                                   "finished) into the JSON a one-process run writes, or concatenate COCO "
                                   "JSON files of one labeling setup (equal info; skipped_images summed) in the "
                                   "given order, renumbering image and annotation ids; an image whose "
                                   "file_name was already merged is dropped with a warning.")
    p.add_argument("inputs", type=Path, nargs="+", metavar="INPUT", help=".parts folders or JSON files")
    p.add_argument("--out", type=Path, required=True, help="merged JSON path (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=_run_merge)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``label`` and ``merge`` subcommands (each sets ``func(args) -> exit status``)."""
    _add_label(subparsers)
    _add_merge(subparsers)


def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="ncutfast: %(message)s", stream=sys.stderr)


def _fail(command: str, exc: BaseException) -> int:
    print(f"ncutfast {command}: error: {error_line(exc)}", file=sys.stderr)
    return 2


def _run_label(args: argparse.Namespace) -> int:
    from .pipeline import LabelConfig, LabelError, default_arch, default_tau, run

    _setup_logging()
    if args.tau == "auto":
        taus = args.tau_candidates
    else:
        taus = (default_tau(args.mode) if args.tau is None else args.tau,)
    if args.backbone is not None and args.arch is not None:
        print("ncutfast label: error: give --arch or --backbone, not both", file=sys.stderr)
        return 2
    cfg = LabelConfig(
        images=args.images, out=args.out, weights=args.weights,
        arch=args.backbone or args.arch or default_arch(args.mode),
        mode=args.mode, taus=taus, n_masks=args.n_masks, fixed_size=args.fixed_size, eps=args.eps,
        sign_rule=args.sign_rule, batch_size=args.batch_size, workers=args.workers,
        post_workers=args.post_workers, device=args.device, amp=args.amp, precision=args.precision,
        backend=args.backend, crf=args.crf, visualize=args.visualize, visualize_count=args.visualize_count,
        progress=not args.no_progress, overwrite=args.overwrite, masks_dir=args.masks_dir, refine=args.refine,
    )
    try:
        summary = run(cfg)
    except (LabelError, OSError) as exc:
        return _fail("label", exc)
    sec = summary.seconds
    rate = summary.images / sec["total"] if sec["total"] > 0 else 0.0
    written = (f" -> {summary.out} ({summary.out_images} images, {summary.out_annotations} annotations)"
               if summary.out else "")
    logging.getLogger("ncutfast.label").info(
        "%d images labelled (%d skipped as unreadable, %d done earlier), %d new annotations, %.2f images/s%s",
        summary.images, summary.skipped, summary.already_done, summary.annotations, rate, written)
    return 0


def _run_merge(args: argparse.Namespace) -> int:
    from .errors import LabelError
    from .records import merge_parts

    _setup_logging()
    try:
        coco = merge_parts(args.inputs, args.out, overwrite=args.overwrite)
    except (LabelError, OSError) as exc:
        return _fail("merge", exc)
    logging.getLogger("ncutfast.label").info("%d images, %d annotations -> %s", len(coco["images"]),
                                             len(coco["annotations"]), args.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m ncutfast.label.cli {label,merge} ...``."""
    parser = argparse.ArgumentParser(prog="ncutfast")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    return run_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
