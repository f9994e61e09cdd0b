"""The ``ncutfast`` command: ``demo``, ``label``, ``merge``, ``eval`` and ``bench`` subcommands."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

__all__ = ["main"]


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="solve a batch of planted-object feature maps; compare with the reference and time both",
        description="Builds --images planted-object token maps (a --grid token grid, --channels channels), "
        "cuts them all with ncutfast.tokencut in one batched call and one by one with the reference path "
        "as TokenCut runs it (float32 torch affinity + scipy's dense generalized eigh), then prints the "
        "masks' agreement and the speed-up measured side by side.",
    )
    p.add_argument("--images", type=int, default=16, help="number of feature maps (default 16)")
    p.add_argument("--grid", type=int, nargs=2, default=(28, 28), metavar=("H", "W"),
                   help="token grid per image (default 28 28: 784 tokens, a 448x448 image at patch 16)")
    p.add_argument("--channels", type=int, default=384, help="feature channels (default 384, ViT-S)")
    p.add_argument("--backend", default="auto", help="ncutfast backend (default auto)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the scenes (default 0)")
    p.add_argument("--out", type=Path, default=Path("ncutfast-demo"),
                   help="folder for the labeling part: generated images, random-init ViT-S/16 weights, "
                   "labels.json and overlays (default ./ncutfast-demo)")
    p.set_defaults(func=_run_demo)


def _ascii_pair(planted, found) -> str:
    """The planted object layout (digits = object k, ``.`` = background) beside the found mask (``#``)."""
    left = ["".join(str(v % 10) if v else "." for v in row) for row in planted]
    right = ["".join("#" if v else "." for v in row) for row in found]
    width = max(len(left[0]), len("planted"))
    rows = [f"{'planted':<{width}}   found"] + [f"{a:<{width}}   {b}" for a, b in zip(left, right, strict=True)]
    return "\n".join(rows)


def _run_demo(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    import ncutfast
    from ncutfast import reference
    from ncutfast.testing import GAP_MIN, compare_to_reference, planted_scene

    rng = np.random.default_rng(args.seed)
    grid = tuple(args.grid)
    scenes = [planted_scene(rng, grid=grid, channels=args.channels) for _ in range(args.images)]
    feats = torch.from_numpy(np.stack([s.features for s in scenes]))
    ncutfast.tokencut(feats[:1], grid, patch=16, backend=args.backend)  # warm-up
    t0 = time.perf_counter()
    out = ncutfast.tokencut(feats, grid, patch=16, backend=args.backend)
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    refs = [reference.tokencut(s.features, grid, patch=16, similarity_dtype=np.float32) for s in scenes]
    t_ref = time.perf_counter() - t0
    well = same = 0
    for i, (s, ref) in enumerate(zip(scenes, refs, strict=True)):
        d = reference.degrees(reference.affinity(s.features, similarity_dtype=np.float32))
        agree = compare_to_reference(out.ncut.eigenvector[i].numpy(), out.ncut.partition[i].numpy(),
                                     int(out.ncut.seed[i]), float(out.ncut.lambda2[i]), ref.ncut, d)
        if agree.well_defined:
            well += 1
            same += agree.same_partition and agree.seed_tied
    n = grid[0] * grid[1]
    print(f"ncutfast demo: {args.images} planted-object maps, {grid[0]}x{grid[1]} = {n} tokens, "
          f"C = {args.channels}, backend {out.ncut.backend}")
    print(f"image 0: box {tuple(out.boxes[0].tolist())}, lambda2 {float(out.ncut.lambda2[0]):.4g}, "
          f"lambda3 {float(out.ncut.lambda3[0]):.4g}; planted objects beside the foreground mask found:")
    print(_ascii_pair(scenes[0].labels, out.masks[0].numpy()))
    print(f"agreement with the reference: identical partitions and seeds on {same}/{well} images with a "
          f"well-defined cut (relative eigengap >= {GAP_MIN:g}); {args.images - well} ill-conditioned")
    print(f"time per image: reference {1e3 * t_ref / args.images:.1f} ms, ncutfast (batched) "
          f"{1e3 * t_fast / args.images:.1f} ms -> speed-up {t_ref / t_fast:.1f}x (this machine, same run)")
    return 0 if same == well and _demo_label(args.out) == 0 else 1


def _demo_label(out: Path) -> int:
    """The labeling job end to end on generated images with a random-init ViT-S/16 (no real weights here)."""
    import torch

    from .label.demo import make_demo_images
    from .label.pipeline import LabelConfig, run
    from .label.vit import build_vit

    out.mkdir(parents=True, exist_ok=True)
    make_demo_images(out / "images", n=8)
    weights = out / "vit_small_patch16_random.pth"
    torch.manual_seed(0)
    torch.save(build_vit("vit_small_patch16").state_dict(), weights)
    cfg = LabelConfig(images=out / "images", out=out / "labels.json", weights=weights, arch="vit_small_patch16",
                      mode="maskcut", fixed_size=224, batch_size=4, workers=0, visualize=out / "overlays",
                      visualize_count=4, progress=False)
    summary = run(cfg)  # resumable: a rerun with the same folder only finishes what is missing
    coco = json.loads(cfg.out.read_text())
    print(f"labeling: {len(coco['images'])} generated images ({summary.images} labelled now, "
          f"{summary.already_done} in an earlier run) -> {len(coco['annotations'])} MaskCut annotations in "
          f"{cfg.out} (COCO JSON; overlays in {cfg.visualize}); ViT-S/16 weights are random, so the masks "
          "show the pipeline, not DINO's quality")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ncutfast`` console script."""
    from . import __version__

    parser = argparse.ArgumentParser(prog="ncutfast", description="Exact, batched normalized cut "
                                     "(TokenCut / MaskCut) on CPUs and GPUs.")
    parser.add_argument("--version", action="version", version=f"ncutfast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo(sub)
    from .bench.cli import register as register_bench
    from .eval.cli import register as register_eval
    from .label.cli import register as register_label
    from .label.cli import run_command

    register_label(sub)
    register_eval(sub)
    register_bench(sub)
    return run_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
