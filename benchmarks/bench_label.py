"""Whole-pipeline throughput of ``ncutfast label``: images/s with a per-stage breakdown, optionally side by side.

    python benchmarks/bench_label.py                         # ViT-S/16, MaskCut, 480x480, 32 images
    python benchmarks/bench_label.py --arch vit_base_patch8 --images 2000 --batch-size 64   # a GPU run
    python benchmarks/bench_label.py --images 16 --amps none,bf16 --baseline-src /path/to/other/checkout

Generated images (``ncutfast.label.demo``, resized to ``--size`` square) and a random-init ViT saved to a
temporary file go through :func:`ncutfast.label.pipeline.run` exactly as the CLI runs them (decode in
DataLoader workers, batched ViT keys, batched cut, post-processing to RLE, shard records, final JSON).
A warm-up run on one batch comes first (thread pools, allocator, kernels); the timed run starts from an
empty output. Stage seconds: ``decode`` is the decode+resize time summed over the workers (it overlaps the
rest), ``wait`` is the time the main loop waited for a decoded batch, ``vit``/``cut``/``post``/``write`` are
main-process wall times (``write`` includes the final JSON merge), ``total`` is the wall time of the run
(the benchmarks' timer, ``ncutfast.bench.measure.timed_call``).

Every run happens in a fresh subprocess whose ``PYTHONPATH`` selects the ``ncutfast`` under test: this
checkout, and with ``--baseline-src DIR`` also the checkout in ``DIR`` (its extension built in place), on the
same images and weights. Runs alternate (baseline, this, baseline, this, ...) ``--repeats`` times so that
load from other processes hits both alike; the table gives the best images/s of each, the ratio to the
baseline's float32 row, the main process's CPU seconds per image (user + system over all its threads; less
sensitive to other processes' load than wall time) and its ratio, whether each JSON equals the float32 JSON
of this checkout (``same json``; ``n/a`` for rows run on fewer images), and for the other rows the fraction
of images whose masks are all identical and the mean IoU of masks matched by position. ``bf16``/``fp16``
rows run on the first ``--amp-images`` images. ``--key-check`` adds, on the first batch of images, the keys'
relative error ``||k - k_fp32|| / ||k_fp32||`` (and max elementwise error over max magnitude) of each
autocast setting, and of float32 with PyTorch's math attention instead of the fused
``scaled_dot_product_attention`` kernel.
Nothing is downloaded; nothing runs at import.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

_HERE = Path(__file__).resolve().parents[1]
_COLS = ("decode", "wait", "vit", "cut", "post", "write", "total")


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
    p.add_argument("--amps", default="none",
                   help="comma-separated settings to time: none, bf16, fp16 (autocast), math (float32 with "
                        "PyTorch's math attention instead of the fused kernel); default none")
    p.add_argument("--amp-images", type=int, default=None,
                   help="images for the --amp rows other than none (default: --images)")
    p.add_argument("--precision", default="float32", choices=("float32", "float64", "fast"))
    p.add_argument("--backend", default="auto")
    p.add_argument("--baseline-src", type=Path, default=None, metavar="DIR",
                   help="another checkout (extension built in place) timed side by side as the baseline")
    p.add_argument("--repeats", type=int, default=1, help="alternating timed runs per row (default 1)")
    p.add_argument("--key-check", action="store_true",
                   help="also measure the keys' error of each --amps setting and of math attention")
    p.add_argument("--csv", type=Path, default=None, help="append the result rows to this CSV file")
    p.add_argument("--_worker", nargs=4, default=None, help=argparse.SUPPRESS,
                   metavar=("KIND", "DATA", "OUT", "AMP"))
    return p.parse_args(argv)


def _config(args: argparse.Namespace, data: Path, source: Path, out: Path, amp: str):  # noqa: ANN202
    from ncutfast.label.pipeline import LabelConfig

    taus = (0.15,) if args.mode == "maskcut" else (0.2,)
    return LabelConfig(images=source, out=out, weights=data / "weights.pth", arch=args.arch, mode=args.mode,
                       taus=taus, fixed_size=args.fixed_size, batch_size=args.batch_size,
                       workers=args.workers, post_workers=args.post_workers, device=args.device, amp=amp,
                       precision=args.precision, backend=args.backend, progress=False)


def _worker_run(args: argparse.Namespace, data: Path, out: Path, amp: str) -> dict:
    """One warm-up batch, then the timed run on ``data/<list>``; returns the summary as a dict."""
    import contextlib
    import resource

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ncutfast.bench.measure import timed_call
    from ncutfast.label.pipeline import run

    source = data / ("amp.txt" if amp in ("bf16", "fp16") else "all.txt")
    attention = sdpa_kernel(SDPBackend.MATH) if amp == "math" else contextlib.nullcontext()
    amp = "none" if amp == "math" else amp
    with attention:
        run(_config(args, data, data / "warm.txt", out.with_suffix(".warm.json"), amp))
        before = resource.getrusage(resource.RUSAGE_SELF)
        device = "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
        summary, total = timed_call(lambda: run(_config(args, data, source, out, amp)), device)
        after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {"images": summary.images, "seconds": {**summary.seconds, "total": total}, "cpu_s": cpu}


def _worker_keys(args: argparse.Namespace, data: Path) -> dict:
    """Keys' relative error of each --amps setting and of math attention against fused float32 keys."""
    import torch
    from PIL import Image
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ncutfast.label.backbones import load_backbone

    backbone = load_backbone(args.arch, data / "weights.pth")
    files = (data / "warm.txt").read_text().split()
    images = []
    for name in files:
        with Image.open(data / name) as img:
            images.append(img.convert("RGB"))
    ref = torch.stack(backbone.image_keys(images, args.mode, args.fixed_size)).double()
    variants = {f"amp {a}": {"amp": a} for a in args.amps.split(",") if a not in ("none", "math")}
    variants["float32, math attention"] = {"math": True}
    out = {}
    for label, how in variants.items():
        if how.get("math"):
            with sdpa_kernel(SDPBackend.MATH):
                k = torch.stack(backbone.image_keys(images, args.mode, args.fixed_size)).double()
        else:
            k = torch.stack(backbone.image_keys(images, args.mode, args.fixed_size, how["amp"])).double()
        rel = float((k - ref).norm() / ref.norm())
        max_rel = float(((k - ref).abs() / ref.abs().amax()).max())
        out[label] = {"rel": rel, "max_rel": max_rel}
    return out


def _make_data(args: argparse.Namespace, data: Path) -> None:
    import torch
    from PIL import Image

    from ncutfast.label.demo import make_demo_images
    from ncutfast.label.vit import build_vit

    images = data / "images"
    for path in make_demo_images(images, n=args.images, size=(args.size, args.size), seed=0):
        with Image.open(path) as img:
            img.convert("RGB").resize((args.size, args.size)).save(path)
    torch.manual_seed(0)
    torch.save(build_vit(args.arch).state_dict(), data / "weights.pth")
    files = sorted(f"images/{p.relative_to(images).as_posix()}" for p in images.rglob("*.*"))
    (data / "all.txt").write_text("\n".join(files) + "\n")
    (data / "warm.txt").write_text("\n".join(files[: args.batch_size]) + "\n")
    (data / "amp.txt").write_text("\n".join(files[: args.amp_images or args.images]) + "\n")


def _spawn(src: Path, argv: list[str], kind: str, data: Path, out: Path, amp: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src)}
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--_worker", kind, str(data), str(out), amp]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker for {src} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _masks(path: Path) -> dict[str, list]:
    with open(path, encoding="utf-8") as fh:
        coco = json.load(fh)
    names = {img["id"]: img["file_name"] for img in coco["images"]}
    out: dict[str, list] = {name: [] for name in names.values()}
    for ann in coco["annotations"]:
        out[names[ann["image_id"]]].append(ann["segmentation"])
    return out


def _mask_agreement(path: Path, ref_path: Path) -> tuple[float, float]:
    """(fraction of images whose masks equal the reference's, mean IoU of masks matched by position)."""
    from pycocotools import mask as mask_util

    got, ref = _masks(path), _masks(ref_path)
    same, ious = 0, []
    for name, masks in got.items():
        want = ref[name]
        same += masks == want
        for a, b in zip(masks, want, strict=False):
            ious.append(float(mask_util.iou([a], [b], [0])[0][0]))
        ious.extend([0.0] * abs(len(masks) - len(want)))
    return same / max(1, len(got)), (sum(ious) / len(ious) if ious else 1.0)


def _same_json(path: Path, ref_path: Path) -> bool:
    with open(path, encoding="utf-8") as a, open(ref_path, encoding="utf-8") as b:
        return json.load(a) == json.load(b)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)
    if args._worker is not None:
        kind, data, out, amp = args._worker
        result = _worker_keys(args, Path(data)) if kind == "keys" else _worker_run(args, Path(data), Path(out), amp)
        print(json.dumps(result))
        return 0
    import torch

    amps = args.amps.split(",")
    if "none" not in amps:
        amps.insert(0, "none")
    sources = [("baseline", args.baseline_src.resolve())] if args.baseline_src is not None else []
    sources.append(("this", _HERE))
    rows: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        _make_data(args, data)
        for rep in range(args.repeats):
            for amp in amps:
                for name, src in sources:
                    if name == "baseline" and amp != "none":
                        continue
                    out = data / f"{name}-{amp}-{rep}.json"
                    result = _spawn(src, argv, "run", data, out, amp)
                    result["json"] = out
                    rows.setdefault((name, amp), []).append(result)
        keys = _spawn(_HERE, argv, "keys", data, data / "keys.json", "none") if args.key_check else {}
        ref_json = rows[("this", "none")][0]["json"]
        on_gpu = torch.cuda.is_available() and args.device != "cpu"
        device = torch.cuda.get_device_name() if on_gpu else f"cpu ({torch.get_num_threads()} threads)"
        base = rows.get(("baseline", "none"), rows[("this", "none")])
        base_rate = max(r["images"] / r["seconds"]["total"] for r in base)
        base_cpu = min(r["cpu_s"] / r["images"] for r in base)
        print(f"| code | amp | images | batch | device | images/s | ratio | CPU s/image | CPU ratio | same json / "
              f"masks | {' | '.join(_COLS)} (s) |")
        print("|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(_COLS))
        table = []
        for (name, amp), results in rows.items():
            best = max(results, key=lambda r: r["images"] / r["seconds"]["total"])
            rate = best["images"] / best["seconds"]["total"]
            full = best["images"] == rows[("this", "none")][0]["images"]
            same = ("yes" if all(_same_json(r["json"], ref_json) for r in results) else "NO") if full else "n/a"
            if amp == "none":
                agree = same
            else:
                frac, iou = _mask_agreement(best["json"], ref_json)
                agree = f"{same}; masks {frac:.2f}, IoU {iou:.3f}"
            sec = best["seconds"]
            cpu = min(r["cpu_s"] / r["images"] for r in results)
            print(f"| {name} | {amp} | {best['images']} | {args.batch_size} | {device} | {rate:.3f} | "
                  f"{rate / base_rate:.2f} | {cpu:.2f} | {base_cpu / cpu:.2f} | {agree} | "
                  + " | ".join(f"{sec[c]:.2f}" for c in _COLS) + " |")
            table.append({"code": name, "arch": args.arch, "mode": args.mode, "size": args.size, "amp": amp,
                          "images": best["images"], "batch": args.batch_size, "device": device,
                          "images_per_s": round(rate, 4), "ratio": round(rate / base_rate, 3),
                          "cpu_s_per_image": round(cpu, 3), "cpu_ratio": round(base_cpu / cpu, 3), "agree": agree,
                          **{f"{k}_s": round(v, 3) for k, v in sec.items()}})
    for (name, amp), results in rows.items():
        rates = sorted(r["images"] / r["seconds"]["total"] for r in results)
        cpus = sorted(r["cpu_s"] / r["images"] for r in results)
        print(f"{name} {amp}: images/s median {rates[len(rates) // 2]:.3f} min {rates[0]:.3f} max {rates[-1]:.3f}; "
              f"CPU s/image median {cpus[len(cpus) // 2]:.3f} min {cpus[0]:.3f} (runs: "
              + ", ".join(f"{r['images'] / r['seconds']['total']:.3f}/{r['cpu_s'] / r['images']:.3f}" for r in results)
              + ")")
    for label, err in keys.items():
        print(f"keys, {label}: ||k - k_fp32|| / ||k_fp32|| = {err['rel']:.2e}, "
              f"max |k - k_fp32| / max |k_fp32| = {err['max_rel']:.2e}")
    if args.csv is not None:
        new = not args.csv.exists()
        with open(args.csv, "a", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(table[0]))
            if new:
                writer.writeheader()
            writer.writerows(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
