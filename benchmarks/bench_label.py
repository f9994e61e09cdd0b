"""Whole-pipeline throughput of ``ncutfast label`` (issue 6): images/s with a per-stage breakdown.

    python benchmarks/bench_label.py                         # ViT-S/16, MaskCut, 480x480, 32 images
    python benchmarks/bench_label.py --arch vit_base_patch8 --images 2000 --batch-size 64   # a GPU run

Generated images (``ncutfast.label.demo``, resized to ``--size`` square) and a random-init ViT saved to a
temporary file go through :func:`ncutfast.label.pipeline.run` exactly as the CLI runs them (decode in
DataLoader workers, batched ViT keys, batched cut, post-processing to RLE, shard records, final JSON).
A warm-up run on one batch comes first (thread pools, allocator, kernels); the timed run starts from an
empty output. Stage seconds: ``decode`` is the decode+resize time summed over the workers (it overlaps the
rest), ``wait`` is the time the main loop waited for a decoded batch, ``vit``/``cut``/``post``/``write`` are
main-process wall times (``write`` includes the final JSON merge), ``total`` is the wall time of the run.
Nothing is downloaded; nothing runs at import.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=32, help="number of generated images (default 32)")
    p.add_argument("--size", type=int, default=480, help="side of the generated square images (default 480)")
    p.add_argument("--arch", default="vit_small_patch16", help="ViT (default vit_small_patch16)")
    p.add_argument("--mode", default="maskcut", choices=("maskcut", "tokencut", "saliency"))
    p.add_argument("--fixed-size", type=int, default=480, help="MaskCut input side (default 480)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=1, help="decode workers (default 1)")
    p.add_argument("--post-workers", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="none", choices=("none", "fp16", "bf16"))
    p.add_argument("--precision", default="float32", choices=("float32", "float64", "fast"))
    p.add_argument("--backend", default="auto")
    p.add_argument("--csv", type=Path, default=None, help="append the result row to this CSV file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    import torch
    from PIL import Image

    from ncutfast.label.demo import make_demo_images
    from ncutfast.label.pipeline import LabelConfig, run
    from ncutfast.label.vit import build_vit

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        images = root / "images"
        for path in make_demo_images(images, n=args.images, size=(args.size, args.size), seed=0):
            with Image.open(path) as img:
                img.convert("RGB").resize((args.size, args.size)).save(path)
        torch.manual_seed(0)
        weights = root / "weights.pth"
        torch.save(build_vit(args.arch).state_dict(), weights)

        def config(out: Path, source: Path) -> LabelConfig:
            taus = (0.15,) if args.mode == "maskcut" else (0.2,)
            return LabelConfig(images=source, out=out, weights=weights, arch=args.arch, mode=args.mode,
                               taus=taus, fixed_size=args.fixed_size, batch_size=args.batch_size,
                               workers=args.workers, post_workers=args.post_workers, device=args.device,
                               amp=args.amp, precision=args.precision, backend=args.backend, progress=False)

        warm = root / "warm.txt"
        files = sorted(p.relative_to(images).as_posix() for p in images.rglob("*.*"))
        warm.write_text("\n".join(f"images/{f}" for f in files[: args.batch_size]) + "\n")
        run(config(root / "warm.json", warm))
        summary = run(config(root / "labels.json", images))

    sec = summary.seconds
    rate = summary.images / sec["total"]
    on_gpu = torch.cuda.is_available() and args.device != "cpu"
    device = torch.cuda.get_device_name() if on_gpu else f"cpu ({torch.get_num_threads()} threads)"
    row = {"arch": args.arch, "mode": args.mode, "size": args.size, "images": summary.images,
           "batch": args.batch_size, "device": device, "images_per_s": round(rate, 3),
           **{f"{k}_s": round(v, 3) for k, v in sec.items()}}
    cols = ("decode", "wait", "vit", "cut", "post", "write", "total")
    print(f"| arch | mode | images | batch | device | images/s | {' | '.join(cols)} (s) |")
    print("|---|---|---|---|---|---|" + "---|" * len(cols))
    print(f"| {args.arch} | {args.mode} | {summary.images} | {args.batch_size} | {device} | {rate:.2f} | "
          + " | ".join(f"{sec[c]:.2f}" for c in cols) + " |")
    per_image = {c: 1000 * sec[c] / max(1, summary.images) for c in cols}
    print("ms/image: " + ", ".join(f"{c} {v:.1f}" for c, v in per_image.items()))
    if args.csv is not None:
        new = not args.csv.exists()
        with open(args.csv, "a", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
