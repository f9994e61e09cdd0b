"""Units of ``ncutfast.label``: the vendored ViT, weights, geometry, and the cut against the reference."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ncutfast import reference
from ncutfast._arrays import to_host
from ncutfast.label import machine
from ncutfast.label.cut import ImageCut, cut_batch, relative_gap
from ncutfast.label.geometry import prepare, to_pixels, upsample_tokens
from ncutfast.label.post import PostConfig, annotations_for, pixel_masks
from ncutfast.label.vit import ARCHS, build_vit, extract_keys_with_hook
from ncutfast.label.weights import WeightsError, load_vit, read_state_dict


@pytest.fixture(scope="module")
def vit_s16() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_vit("vit_small_patch16")


@pytest.mark.parametrize("hw", [(32, 48), (48, 32), (224, 224)])
def test_keys_equal_direct_qkv_computation(vit_s16: torch.nn.Module, hw: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, *hw, generator=gen)
    captured = {}
    last = vit_s16.blocks[-1]
    handle = last.register_forward_pre_hook(lambda _m, args: captured.__setitem__("x", args[0]))
    with torch.inference_mode():
        hooked = extract_keys_with_hook(vit_s16, x)
        fast = vit_s16.last_keys(x)
    handle.remove()
    dim = ARCHS["vit_small_patch16"].dim
    with torch.inference_mode():
        normed = F.layer_norm(captured["x"], (dim,), last.norm1.weight, last.norm1.bias, eps=1e-6)
        direct = normed @ last.attn.qkv.weight[dim:2 * dim].T + last.attn.qkv.bias[dim:2 * dim]
    n = (hw[0] // 16) * (hw[1] // 16)
    assert fast.shape == (2, n, dim)
    torch.testing.assert_close(hooked, direct[:, 1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast, direct[:, 1:], rtol=1e-5, atol=1e-5)


def test_pos_embed_interpolation_rule(vit_s16: torch.nn.Module) -> None:
    assert vit_s16.interpolate_pos_encoding(14, 14) is vit_s16.pos_embed  # training geometry: used as is
    for h, w in [(1, 1), (3, 7), (30, 30), (37, 61), (60, 60)]:
        pos = vit_s16.interpolate_pos_encoding(h, w)
        assert pos.shape == (1, 1 + h * w, 384)
        torch.testing.assert_close(pos[:, 0], vit_s16.pos_embed[:, 0])
    # DINO's "+0.1" scale: (h + 0.1) / 14 on rows, (w + 0.1) / 14 on cols, bicubic, row-major tokens.
    grid = vit_s16.pos_embed[:, 1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    want = F.interpolate(grid, scale_factor=(5.1 / 14, 9.1 / 14), mode="bicubic")
    torch.testing.assert_close(vit_s16.interpolate_pos_encoding(5, 9)[0, 1:], want[0].flatten(1).T)


def test_weights_roundtrip_formats(tmp_path: Path, vit_s16: torch.nn.Module) -> None:
    from safetensors.torch import save_file

    state = vit_s16.state_dict()
    torch.save(state, tmp_path / "plain.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "timm.safetensors"))
    wrapped = {"teacher": {f"module.backbone.{k}": v for k, v in state.items()}
               | {"module.head.mlp.0.weight": torch.zeros(2, 2)}, "epoch": 3}
    torch.save(wrapped, tmp_path / "checkpoint.pth")
    timm_like = dict(state) | {"head.weight": torch.zeros(0, 384)}
    torch.save(timm_like, tmp_path / "timm.pth")
    strided = {k: v.t().contiguous().t() if v.ndim == 2 else v for k, v in state.items()}  # column-major
    assert not strided["blocks.0.attn.qkv.weight"].is_contiguous()
    torch.save(strided, tmp_path / "strided.pth")
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        want = vit_s16.last_keys(x)
        for name in ("plain.pth", "timm.safetensors", "checkpoint.pth", "timm.pth", "strided.pth"):
            loaded = load_vit("vit_small_patch16", tmp_path / name)
            params = dict(loaded.named_parameters())
            assert params.keys() == state.keys()
            for key, value in state.items():
                assert params[key].device.type == "cpu" and params[key].is_contiguous(), key
                assert torch.equal(params[key], value), key
            torch.testing.assert_close(loaded.last_keys(x), want, rtol=0, atol=0)


class _Payload:
    """A pickle that would create a file when loaded without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_with_payload_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.pth"
    with open(bad, "wb") as fh:
        pickle.dump({"pos_embed": _Payload(marker)}, fh, protocol=2)
    with pytest.raises(WeightsError, match="refusing to load .*evil.pth"):
        read_state_dict(bad)
    assert not marker.exists()


def test_weights_errors_name_file_and_arch(tmp_path: Path, vit_s16: torch.nn.Module) -> None:
    path = tmp_path / "small16.pth"
    torch.save(vit_s16.state_dict(), path)
    with pytest.raises(WeightsError, match=r"small16\.pth.*vit_base_patch8.*holds vit_small_patch16"):
        load_vit("vit_base_patch8", path)
    with pytest.raises(WeightsError, match="not found.*nope.pth"):
        load_vit("vit_small_patch16", tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(WeightsError, match="junk.pth"):
        load_vit("vit_small_patch16", junk)
    with pytest.raises(ValueError, match="unsupported arch"):
        load_vit("vit_huge_patch14", path)


def test_geometry_modes() -> None:
    img = Image.new("RGB", (41, 23), (10, 20, 30))
    tc = prepare(img, "tokencut", 16)
    assert tc.grid == (2, 3) and tc.rgb.shape == (23, 41, 3) and tc.size == (23, 41)
    x = to_pixels([tc.rgb, tc.rgb], tc.grid, 16, torch.device("cpu"))
    assert x.shape == (2, 3, 32, 48)
    assert torch.all(x[:, :, 23:] == 0) and torch.all(x[:, :, :, 41:] == 0)  # zero = the mean colour
    want = (10 / 255 - 0.485) / 0.229
    torch.testing.assert_close(x[:, 0, :23, :41], torch.full((2, 23, 41), want))
    sal = prepare(img, "saliency", 16)  # round(41/16) = 3, round(23/16) = 1
    assert sal.grid == (1, 3) and sal.rgb.shape == (16, 48, 3)
    assert prepare(Image.new("RGB", (40, 40)), "saliency", 16).grid == (2, 2)  # 2.5 rounds to even
    mc = prepare(img.convert("L"), "maskcut", 8, fixed_size=64)
    assert mc.grid == (8, 8) and mc.rgb.shape == (64, 64, 3) and mc.rgb.dtype == torch.uint8
    assert prepare(img, "maskcut", 16, fixed_size=72).grid == (4, 4)  # 72/16 = 4.5 -> 4 (banker's rounding)
    assert upsample_tokens(np.eye(2, dtype=bool), 3).shape == (6, 6)


@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("mode", ["maskcut", "tokencut"])
def test_batched_cut_equals_reference(mode: str, ragged: bool) -> None:
    rng = np.random.default_rng(6)
    grids = [(5, 7), (6, 6), (4, 9)] if ragged else [(6, 6)] * 3
    feats = []
    for h, w in grids:
        base = rng.standard_normal((2, 24))
        fg = np.zeros((h, w), dtype=int)
        fg[1:h // 2 + 1, 1:w // 2 + 2] = 1
        feats.append(torch.from_numpy((base[fg.reshape(-1)] + 0.3 * rng.standard_normal((h * w, 24)))
                                      .astype(np.float32)))
    kw = dict(mode=mode, taus=(0.15,), n_masks=3, eps=1e-5, sign_rule="canonical", patch=8,
              precision="float32")
    fast = cut_batch(feats, grids, backend="auto", **kw)
    ref = cut_batch(feats, grids, backend="reference", **kw)
    for i, (f, r, g) in enumerate(zip(fast, ref, grids, strict=True)):
        assert relative_gap(r.lambda2[0], r.lambda3[0]) > 0.05  # a well-posed cut (no degenerate spectrum)
        np.testing.assert_array_equal(f.masks, r.masks)
        np.testing.assert_allclose(f.lambda2, r.lambda2, rtol=1e-4, atol=1e-6)
        if mode == "maskcut":
            direct = reference.maskcut(feats[i].numpy(), g, tau=0.15, sign_rule="canonical")
            np.testing.assert_array_equal(r.masks, reference.subtract_earlier(direct.masks))
    # JSON path: identical masks give identical annotations
    cfg = PostConfig(mode, 8)
    for f, r, g in zip(fast, ref, grids, strict=True):
        size = (g[0] * 8 - 3, g[1] * 8 - 5)
        a, b = annotations_for(f, size, cfg), annotations_for(r, size, cfg)
        assert [x["segmentation"] for x in a] == [x["segmentation"] for x in b]
        assert [x["bbox"] for x in a] == [x["bbox"] for x in b]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (the one-copy path)"))])
def test_to_host_returns_every_tensor(device: str) -> None:
    """to_host (the cut stage's one device-to-host copy): values, shapes and dtypes of mixed tensors."""
    rng = np.random.default_rng(3)
    arrays = [rng.uniform(size=(3, 1, 7)) < 0.5, rng.standard_normal(5), np.arange(11, dtype=np.int64).reshape(1, 11),
              rng.standard_normal((2, 3)).astype(np.float32), np.zeros((0, 4)), rng.standard_normal((4, 3))[:, 1]]
    got = to_host([torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in arrays])
    for g, a in zip(got, arrays, strict=True):
        assert g.dtype == a.dtype and g.shape == a.shape
        np.testing.assert_array_equal(g, a)


def test_tokencut_box_equals_reference_box() -> None:
    rng = np.random.default_rng(4)
    feats = rng.standard_normal((5 * 7, 16)).astype(np.float32)
    feats[:12] += 3.0
    ref = reference.tokencut(feats, (5, 7), patch=16, image_size=(70, 100))
    cut = ImageCut(ref.mask[None], np.array([ref.ncut.lambda2]), np.array([ref.ncut.lambda3]), 0.2)
    (ann,) = annotations_for(cut, (70, 100), PostConfig("tokencut", 16))
    x1, y1, x2, y2 = ref.box
    assert ann["bbox"] == [x1, y1, x2 - x1, y2 - y1]
    assert ann["segmentation"]["size"] == [70, 100] and ann["width"] == 100 and ann["height"] == 70


def test_maskcut_pixel_masks_are_disjoint_and_resized() -> None:
    masks = np.zeros((3, 4, 4), dtype=bool)
    masks[0, :2, :2] = True
    masks[1, :3, :3] = True  # overlaps mask 0: the overlap is subtracted (spec §4 step 6)
    cut = ImageCut(masks, np.array([0.1, 0.2, 0.3]), np.array([0.5, 0.5, np.nan]), 0.15)
    out = pixel_masks(cut, (30, 50), PostConfig("maskcut", 8))
    assert [m.shape for m in out] == [(30, 50)] * 3
    assert not (out[0] & out[1]).any() and not out[2].any()
    anns = annotations_for(cut, (30, 50), PostConfig("maskcut", 8))
    assert [a["mask_index"] for a in anns] == [0, 1]
    assert anns[0]["score"] == pytest.approx(relative_gap(0.1, 0.5)) == pytest.approx(0.8)
    assert relative_gap(0.3, float("nan")) == 0.0


def _held_growth_of_a_freed_tensor(nbytes: int) -> int:
    """How much more free memory the C heap holds after a tensor of ``nbytes`` is allocated and freed."""
    before = machine.held_free_bytes()
    x = torch.ones(nbytes // 4)
    del x
    return machine.held_free_bytes() - before


def test_reuse_freed_memory_keeps_large_tensors_pages_only_inside(monkeypatch: pytest.MonkeyPatch) -> None:
    if machine._glibc() is None:
        pytest.skip("glibc's mallopt/mallinfo2 only")
    for name in (*machine._MALLOC_ENV, "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    big = 96 * 2**20  # above glibc's largest mmap threshold (32 MiB): unmapped on free by default
    assert _held_growth_of_a_freed_tensor(big) < big
    with machine.reuse_freed_memory() as active:
        assert active
        _held_growth_of_a_freed_tensor(big)
        assert machine.held_free_bytes() >= big  # the freed tensor's pages stay in the process
    assert _held_growth_of_a_freed_tensor(big) < big  # defaults back: unmapped on free again


@pytest.mark.parametrize(("name", "value"), [("MALLOC_TRIM_THRESHOLD_", "131072"),
                                             ("GLIBC_TUNABLES", "glibc.malloc.mmap_max=0")])
def test_reuse_freed_memory_leaves_a_tuned_malloc_alone(monkeypatch: pytest.MonkeyPatch, name: str,
                                                        value: str) -> None:
    class FakeLibc:
        def __init__(self) -> None:
            self.calls: list[tuple] = []

        def mallopt(self, *args: int) -> int:
            self.calls.append(("mallopt", *args))
            return 1

        def malloc_trim(self, pad: int) -> int:
            self.calls.append(("malloc_trim", pad))
            return 1

    libc = FakeLibc()
    monkeypatch.setattr(machine, "_glibc", lambda: libc)
    for other in (*machine._MALLOC_ENV, "GLIBC_TUNABLES"):
        monkeypatch.delenv(other, raising=False)
    with machine.reuse_freed_memory() as active:
        assert active and len(libc.calls) == 2  # untuned: the two settings, then the defaults and a trim
    assert len(libc.calls) == 5 and libc.calls[-1] == ("malloc_trim", 0)
    libc.calls.clear()
    monkeypatch.setenv(name, value)
    with machine.reuse_freed_memory() as active:
        assert active is False
    assert libc.calls == []


def test_available_bytes_counts_the_heaps_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(machine, "held_free_bytes", lambda: 0)
    plain = machine.available_bytes(torch.device("cpu"))
    monkeypatch.setattr(machine, "held_free_bytes", lambda: 2**50)
    assert machine.available_bytes(torch.device("cpu")) >= 2**50 > plain
