"""``ncutfast.label.backbones``: timm ViTs (DINOv2-style, registers, layer scale) and the vendored DINO ViTs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools.coco import COCO

import ncutfast
from ncutfast.label import backbones
from ncutfast.label.backbones import BackboneError, amp_note, import_timm, load_backbone, timm_backbone
from ncutfast.label.cli import main
from ncutfast.label.demo import make_demo_images
from ncutfast.label.geometry import prepare, to_pixels
from ncutfast.label.vit import build_vit, extract_keys_with_hook
from ncutfast.label.weights import WeightsError

TINY = "ncutfast_test_tiny_dinov2"
TINY_ARGS = dict(patch_size=14, embed_dim=48, depth=3, num_heads=3, reg_tokens=4, no_embed_class=True,
                 init_values=1e-5, img_size=56)


@pytest.fixture(scope="module")
def timm():  # noqa: ANN201
    timm = import_timm()
    from timm.models import register_model
    from timm.models.vision_transformer import VisionTransformer

    if TINY not in timm.list_models(TINY):
        def ncutfast_test_tiny_dinov2(pretrained: bool = False, **kwargs: object) -> VisionTransformer:
            for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
                kwargs.pop(key, None)
            return VisionTransformer(**{**TINY_ARGS, **kwargs})

        register_model(ncutfast_test_tiny_dinov2)
    return timm


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights of a useful scale everywhere (layer-scale gammas too, so that every block matters)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("gamma"):
                p.copy_(0.5 + 0.2 * noise)
            else:
                p.copy_((0.3 if p.ndim > 1 else 0.1) * noise)
    return model.eval()


def _tiny(timm, seed: int = 0) -> torch.nn.Module:  # noqa: ANN001
    return _randomize(timm.create_model(TINY, pretrained=False, num_classes=0, dynamic_img_size=True), seed)


def _independent_keys(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Keys from the model's own modules, written out step by step (no hook, no early stop)."""
    from timm.layers import resample_abs_pos_embed

    p = model.patch_embed.patch_size[0]
    h, w = x.shape[2] // p, x.shape[3] // p
    with torch.inference_mode():
        patches = F.conv2d(x, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=p)
        patches = patches.flatten(2).transpose(1, 2)
        pos = resample_abs_pos_embed(model.pos_embed, new_size=(h, w), old_size=model.patch_embed.grid_size,
                                     num_prefix_tokens=0)
        b = x.shape[0]
        tokens = torch.cat((model.cls_token.expand(b, -1, -1), model.reg_token.expand(b, -1, -1),
                            patches + pos), dim=1)
        for blk in model.blocks[:-1]:
            tokens = blk(tokens)
        last = model.blocks[-1]
        qkv = last.attn.qkv(last.norm1(tokens))
    dim = model.embed_dim
    return qkv[:, 1 + 4:, dim:2 * dim]


@pytest.mark.parametrize(("batch", "hw"), [(1, (14, 14)), (2, (28, 70)), (3, (98, 42))])
def test_timm_keys_equal_keys_from_the_models_modules(timm, batch: int, hw: tuple[int, int]) -> None:  # noqa: ANN001
    model = _tiny(timm, seed=batch)
    backbone = timm_backbone(model)
    assert (backbone.patch, backbone.dim, backbone.num_prefix_tokens) == (14, 48, 5)
    x = torch.randn(batch, 3, *hw, generator=torch.Generator().manual_seed(7 + batch))
    keys = backbone.keys(x)
    want = _independent_keys(model, x)
    assert keys.shape == (batch, (hw[0] // 14) * (hw[1] // 14), 48) and keys.dtype == torch.float32
    assert want.abs().max() > 0.1  # the keys are not degenerate
    torch.testing.assert_close(keys, want, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():  # the early stop equals a full forward read through a hook
        torch.testing.assert_close(keys, extract_keys_with_hook(model, x, num_prefix_tokens=5))


@pytest.mark.parametrize(("mode", "size", "grid"), [
    ("maskcut", (45, 31), (4, 4)),    # 61 -> round(61 / 14) * 14 = 56
    ("tokencut", (45, 31), (3, 4)),   # padded: (ceil(31 / 14), ceil(45 / 14))
    ("saliency", (45, 31), (2, 3)),   # resized: (round(31 / 14), round(45 / 14))
    ("tokencut", (13, 1), (1, 1)),
    ("saliency", (71, 29), (2, 5)),
])
def test_timm_image_keys_grid_for_patch_14(tmp_path: Path, timm, mode: str, size: tuple[int, int],  # noqa: ANN001
                                           grid: tuple[int, int]) -> None:
    backbone = timm_backbone(_tiny(timm))
    rng = np.random.default_rng(len(mode) + size[0])
    imgs = [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(2)]
    imgs[0].save(tmp_path / "first.png")
    keys = backbone.image_keys([tmp_path / "first.png", imgs[1]], mode=mode, fixed_size=61)
    assert [tuple(k.shape) for k in keys] == [(*grid, 48)] * 2
    prep = prepare(imgs[1], mode, 14, 61)
    want = _independent_keys(backbone.model, to_pixels([prep.rgb], prep.grid, 14, torch.device("cpu")))
    torch.testing.assert_close(keys[1].reshape(-1, 48), want[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_weights_load_from_file(tmp_path: Path, timm, suffix: str) -> None:  # noqa: ANN001
    model = _tiny(timm, seed=3)
    path = tmp_path / f"tiny{suffix}"
    if suffix == ".pth":
        torch.save(model.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    backbone = load_backbone(f"timm:{TINY}", path)
    assert backbone.name == f"timm:{TINY}" and backbone.patch == 14
    x = torch.randn(2, 3, 42, 56, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(backbone.keys(x), _independent_keys(model, x), rtol=1e-5, atol=1e-5)


def test_timm_weights_that_do_not_fit_name_the_first_mismatched_key(tmp_path: Path, timm) -> None:  # noqa: ANN001
    state = _tiny(timm).state_dict()
    cases = {
        "missing": ({k: v for k, v in state.items() if k != "blocks.1.attn.qkv.bias"},
                    "'blocks.1.attn.qkv.bias' is missing from the file"),
        "shape": ({**state, "reg_token": torch.zeros(1, 2, 48)},
                  "'reg_token' has shape (1, 2, 48) in the file, the model expects (1, 4, 48)"),
        "extra": ({**state, "blocks.7.norm1.weight": torch.ones(48)},
                  "'blocks.7.norm1.weight' is in the file but not in the model"),
    }
    for name, (sd, message) in cases.items():
        path = tmp_path / f"{name}.pth"
        torch.save(sd, path)
        with pytest.raises(WeightsError, match="first mismatched key") as exc:
            load_backbone(f"timm:{TINY}", path)
        assert message in str(exc.value) and path.name in str(exc.value)


def test_backbone_name_errors(tmp_path: Path, timm) -> None:  # noqa: ANN001
    path = tmp_path / "w.pth"
    torch.save(_tiny(timm).state_dict(), path)
    with pytest.raises(BackboneError, match="unknown backbone 'resnet50'"):
        load_backbone("resnet50", path)
    with pytest.raises(BackboneError, match="timm has no model 'no_such_vit_xyz'"):
        load_backbone("timm:no_such_vit_xyz", path)
    with pytest.raises(BackboneError, match="empty timm model name"):
        load_backbone("timm:", path)
    with pytest.raises(BackboneError, match="not a ViT-style model"):
        timm_backbone(torch.nn.Linear(3, 3))


def test_vendored_backbone_is_the_dino_vit(tmp_path: Path) -> None:
    torch.manual_seed(5)
    vit = build_vit("vit_small_patch16")
    path = tmp_path / "dino.pth"
    torch.save(vit.state_dict(), path)
    backbone = load_backbone("vit_small_patch16", path)
    assert (backbone.patch, backbone.dim, backbone.num_prefix_tokens) == (16, 384, 1)
    x = torch.randn(2, 3, 48, 80, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        want = vit.last_keys(x)
    assert torch.equal(backbone.keys(x), want)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_note_only_for_cpus_without_native_instructions(monkeypatch, amp: str) -> None:  # noqa: ANN001
    check = f"_is_mkldnn_{amp}_supported"
    monkeypatch.setattr(torch.ops.mkldnn, check, lambda: False, raising=False)
    note = amp_note(amp, torch.device("cpu"))
    assert note is not None and note.startswith(f"--amp {amp}: this CPU has no ") and "emulated" in note
    assert amp_note(amp, torch.device("cuda")) is None and amp_note("none", torch.device("cpu")) is None
    monkeypatch.setattr(torch.ops.mkldnn, check, lambda: True, raising=False)
    assert amp_note(amp, torch.device("cpu")) is None


def test_cli_labels_with_a_timm_backbone(tmp_path: Path, timm, capsys) -> None:  # noqa: ANN001
    images = tmp_path / "imgs"
    make_demo_images(images, n=3, size=(45, 31), seed=2)
    weights = tmp_path / "tiny.pth"
    torch.save(_tiny(timm, seed=4).state_dict(), weights)
    common = ["--weights", str(weights), "--fixed-size", "61", "--workers", "0", "--no-progress",
              "--batch-size", "2"]
    out = tmp_path / "labels.json"
    assert main(["label", str(images), "--out", str(out), "--backbone", f"timm:{TINY}", *common]) == 0
    with open(out, encoding="utf-8") as fh:
        data = json.load(fh)
    assert data["info"]["arch"] == f"timm:{TINY}" and len(data["images"]) == 3
    coco = COCO(str(out))
    for img in coco.dataset["images"]:
        with Image.open(images / img["file_name"]) as im:
            assert (img["width"], img["height"]) == im.size
        for ann in coco.imgToAnns[img["id"]]:
            assert coco.annToMask(ann).shape == (img["height"], img["width"]) and ann["area"] > 0
    capsys.readouterr()
    bad = tmp_path / "bad.pth"
    torch.save({k: v for k, v in torch.load(weights).items() if k != "cls_token"}, bad)
    assert main(["label", str(images), "--out", str(tmp_path / "b.json"), "--backbone", f"timm:{TINY}",
                 *common[2:], "--weights", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "first mismatched key 'cls_token' is missing" in err[0]
    assert main(["label", str(images), "--out", str(tmp_path / "c.json"), "--backbone", f"timm:{TINY}",
                 "--arch", "vit_small_patch16", *common]) == 2
    assert "not both" in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists() and not (tmp_path / "c.json").exists()


def _fresh_python(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``python ARGS`` in a fresh interpreter that imports the ``ncutfast`` under test."""
    env = {**os.environ, "PYTHONPATH": str(Path(ncutfast.__file__).parents[1])}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600, check=False)


def test_import_timm_declares_torchvision_ops_only_when_they_cannot_load(tmp_path: Path) -> None:
    script = ("import json; from ncutfast.label import backbones as b; timm = b.import_timm(); "
              "import torchvision.extension as e; print(json.dumps([e._has_ops(), len(b._TORCHVISION_STUBS), "
              "b._torchvision_lacks_cuda_libraries(), len(timm.list_models('vit_small_patch14*'))]))")
    proc = _fresh_python(["-c", script], tmp_path)
    assert proc.returncode == 0, proc.stderr
    has_ops, stubs, why, vits = json.loads(proc.stdout.strip().splitlines()[-1])
    assert vits > 0
    if has_ops:  # the real ops loaded: nothing declared in their place
        assert stubs == 0 and why is None
    else:  # a CUDA torchvision beside a CPU torch: declared, and only for want of CUDA libraries
        assert stubs == 1 and "cuda" in why.lower()


@pytest.mark.parametrize(("loader", "want"), [
    (OSError("libc10_cuda.so: cannot open shared object file: No such file or directory"), "libc10_cuda.so"),
    (OSError("libcudart.so.12: cannot open shared object file"), "libcudart.so.12"),
    (OSError("_C.so: undefined symbol: _ZN3c1017RegisterOperators"), None),  # an ABI mismatch: not ours
    (None, None),  # the library loads: the real ops are there
])
def test_torchvision_lacks_cuda_libraries(tmp_path: Path, monkeypatch, loader: OSError | None,  # noqa: ANN001
                                          want: str | None) -> None:
    import ctypes
    import importlib.util
    from importlib.machinery import ModuleSpec

    folder = tmp_path / "torchvision"
    folder.mkdir()
    spec = ModuleSpec("torchvision", None, is_package=True)
    spec.submodule_search_locations = [str(folder)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: spec if name == "torchvision" else None)
    loaded = []

    def cdll(path: str) -> None:
        loaded.append(Path(path).name)
        if loader is not None:
            raise loader

    monkeypatch.setattr(ctypes, "CDLL", cdll)
    assert backbones._torchvision_lacks_cuda_libraries() is None and loaded == []  # no library at all
    (folder / "_C.so").write_bytes(b"")
    got = backbones._torchvision_lacks_cuda_libraries()
    assert loaded == ["_C.so"]
    assert got is None if want is None else want in got
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # no torchvision installed
    assert backbones._torchvision_lacks_cuda_libraries() is None


def test_import_timm_names_a_missing_timm(monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(BackboneError, match="timm backbones need timm .* ModuleNotFoundError"):
        import_timm()


def test_cli_labels_with_a_registered_timm_vit_in_a_fresh_interpreter(tmp_path: Path, timm) -> None:  # noqa: ANN001
    images = tmp_path / "imgs"
    make_demo_images(images, n=3, size=(53, 37), seed=6)
    weights = tmp_path / "test_vit.pth"
    model = _randomize(timm.create_model("test_vit", pretrained=False, num_classes=0, dynamic_img_size=True), 6)
    torch.save(model.state_dict(), weights)
    common = ["--backbone", "timm:test_vit", "--weights", str(weights), "--fixed-size", "80", "--workers", "1",
              "--no-progress", "--batch-size", "2"]
    out = tmp_path / "fresh.json"
    proc = _fresh_python(["-m", "ncutfast.cli", "label", str(images), "--out", str(out), *common], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    data = json.loads(out.read_bytes())
    assert data["info"]["arch"] == "timm:test_vit" and len(data["images"]) == 3 and data["annotations"]
    coco = COCO(str(out))
    for img in coco.dataset["images"]:
        with Image.open(images / img["file_name"]) as im:
            assert (img["width"], img["height"]) == im.size
        for ann in coco.imgToAnns[img["id"]]:
            assert coco.annToMask(ann).shape == (img["height"], img["width"]) and ann["area"] > 0
    here = tmp_path / "here.json"
    assert main(["label", str(images), "--out", str(here), *common]) == 0
    assert out.read_bytes() == here.read_bytes()
