"""Feature backbones: the vendored DINO ViTs, or any timm Vision Transformer, loaded from a local file.

A backbone turns images into the keys TokenCut and MaskCut cut (``shared/spec/tokencut.md`` section 1): the
last block's fused ``qkv`` Linear applied to ``norm1(x)``, channels ``[dim, 2*dim)`` (heads concatenated,
bias included, before any scaling or key norm), with the prefix tokens (CLS and, for DINOv2-style models,
the register tokens) dropped. The forward stops there: the last block's attention and MLP and the final
norm never run.

Backbone names (``ncutfast label --backbone``):

- ``vit_small_patch16``, ``vit_small_patch8``, ``vit_base_patch16``, ``vit_base_patch8``: the vendored DINO
  ViTs (:mod:`ncutfast.label.vit`), faithful to DINO including its positional-embedding interpolation;
- ``timm:<model name>``: ``timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True)``
  (nothing is downloaded), then the weights file is loaded strictly in timm's own state-dict layout. Any
  model with ViT-style ``patch_embed``, ``blocks[-1].attn.qkv`` and ``num_prefix_tokens`` works, e.g.
  ``vit_small_patch14_reg4_dinov2`` or ``vit_base_patch16_224.dino``. The patch size comes from the model,
  positional embeddings are resized by timm's own rule, and the pixels are normalized with the model's
  ``pretrained_cfg`` mean and std. timm is imported only here, and only for such names.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .geometry import prepare, to_pixels
from .vit import ARCHS, IMAGENET_MEAN, IMAGENET_STD
from .weights import WeightsError, load_vit, read_state_dict

__all__ = ["AMP_DTYPES", "Backbone", "BackboneError", "amp_note", "import_timm", "load_backbone", "timm_backbone"]

log = logging.getLogger("ncutfast.label")

TIMM_PREFIX = "timm:"
AMP_DTYPES: dict[str, torch.dtype | None] = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_HEAD_KEYS = ("head.", "fc_norm.", "head_drop.")
_TORCHVISION_STUBS: list[torch.library.Library] = []  # see import_timm


class BackboneError(Exception):
    """A backbone name that names no model, a model that is not ViT-like, or timm that does not import."""


class _Stop(Exception):
    """Raised by the pre-hook on the last ``qkv`` to end the forward once the keys are known."""


@dataclass
class Backbone:
    """A ViT in eval mode and what the pipeline needs to know about it.

    Attributes:
        model: the module (a vendored :class:`~ncutfast.label.vit.VisionTransformer` or a timm model).
        name: the backbone name it was built from (``vit_small_patch16``, ``timm:...``).
        patch: patch side in pixels (square patches only).
        dim: embedding width = number of key channels.
        num_prefix_tokens: tokens before the patch tokens (CLS, registers) that the keys drop.
        mean, std: per-channel pixel normalization applied after scaling to ``[0, 1]``.
    """

    model: nn.Module
    name: str
    patch: int
    dim: int
    num_prefix_tokens: int = 1
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def to(self, device: torch.device | str) -> Backbone:
        """Move the model to ``device`` (in place); returns ``self``."""
        self.model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters."""
        return next(self.model.parameters()).device

    def keys(self, x: torch.Tensor, amp: str = "none") -> torch.Tensor:
        """Keys of the last block for a batch of normalized images.

        Args:
            x: ``(B, 3, H, W)`` float32 on the model's device, ``H`` and ``W`` multiples of :attr:`patch`.
            amp: ``"none"`` (float32, the faithful features), ``"bf16"`` or ``"fp16"`` (autocast).

        Returns:
            ``(B, N, dim)`` float32, ``N = (H/p) * (W/p)`` patch tokens in row-major order.
        """
        if amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {', '.join(AMP_DTYPES)}, got {amp!r}")
        dtype = AMP_DTYPES[amp]
        with torch.inference_mode(), torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            if self.name.startswith(TIMM_PREFIX):
                k = _timm_last_keys(self.model, x, self.dim, self.num_prefix_tokens)
            else:
                k = self.model.last_keys(x)
        return k.float()

    def batch_keys(self, rgbs: Sequence[torch.Tensor], grids: Sequence[tuple[int, int]],
                   amp: str = "none") -> list[torch.Tensor]:
        """Keys of prepared images (see :func:`ncutfast.label.geometry.prepare`), batched by size.

        Args:
            rgbs: uint8 ``(Hr_i, Wr_i, 3)`` images after their mode's resize.
            grids: token grid ``(h_i, w_i)`` of each image.
            amp: as in :meth:`keys`.

        Returns:
            One float32 ``(h_i * w_i, dim)`` tensor per image on the model's device, in input order. Images
            with the same size and grid share one forward.
        """
        device = self.device
        out: list[torch.Tensor | None] = [None] * len(rgbs)
        groups: dict[tuple, list[int]] = {}
        for i, (rgb, grid) in enumerate(zip(rgbs, grids, strict=True)):
            groups.setdefault((tuple(grid), tuple(rgb.shape)), []).append(i)
        for (grid, _), idx in groups.items():
            x = to_pixels([rgbs[i] for i in idx], grid, self.patch, device, self.mean, self.std)
            k = self.keys(x, amp)
            for j, i in enumerate(idx):
                out[i] = k[j]
        return out  # type: ignore[return-value]

    def image_keys(self, images: Sequence[Image.Image | str | os.PathLike[str]], mode: str = "maskcut",
                   fixed_size: int = 480, amp: str = "none") -> list[torch.Tensor]:
        """Key features of a batch of images, as the labeling pipeline computes them.

        Args:
            images: PIL images or image file paths (converted to RGB).
            mode: the input geometry, ``"maskcut"``, ``"tokencut"`` or ``"saliency"`` (see
                :mod:`ncutfast.label.geometry`).
            fixed_size: MaskCut's square input side before rounding to the patch.
            amp: as in :meth:`keys`.

        Returns:
            One float32 ``(h_i, w_i, dim)`` tensor per image on the model's device: the keys on the image's
            token grid.
        """
        preps = []
        for img in images:
            if isinstance(img, Image.Image):
                preps.append(prepare(img, mode, self.patch, fixed_size))
            else:
                with Image.open(img) as opened:
                    opened.load()
                    preps.append(prepare(opened, mode, self.patch, fixed_size))
        keys = self.batch_keys([p.rgb for p in preps], [p.grid for p in preps], amp)
        return [k.reshape(*p.grid, self.dim) for k, p in zip(keys, preps, strict=True)]


def amp_note(amp: str, device: torch.device) -> str | None:
    """Why ``amp`` will be slower than float32 on ``device``, or None when it should pay.

    On a CPU, autocast runs the ViT's matrix products in bf16/fp16 through oneDNN, which is fast only with
    native instructions (AVX512-BF16 or AMX for bf16, AVX512-FP16 or AMX-FP16 for fp16); without them the
    products are emulated and several times slower than float32.
    """
    if amp == "none" or device.type != "cpu":
        return None
    check, isa = {"bf16": ("_is_mkldnn_bf16_supported", "AVX512-BF16 or AMX"),
                  "fp16": ("_is_mkldnn_fp16_supported", "AVX512-FP16 or AMX-FP16")}[amp]
    native = getattr(torch.ops.mkldnn, check, None)
    if native is None or native():
        return None
    return (f"--amp {amp}: this CPU has no {isa}, so the ViT's {amp} products are emulated and slower than "
            f"float32 (--amp none)")


def _timm_last_keys(model: nn.Module, x: torch.Tensor, dim: int, num_prefix_tokens: int) -> torch.Tensor:
    """Run ``model.forward_features`` up to the last ``qkv`` and return its key channels, prefix dropped.

    A forward pre-hook on ``blocks[-1].attn.qkv`` receives ``norm1(x)``, applies only the key rows of the
    fused weight and stops the forward, so the last attention, MLP and final norm are never computed.
    """
    qkv = model.blocks[-1].attn.qkv
    store: dict[str, torch.Tensor] = {}

    def hook(_mod: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        bias = None if qkv.bias is None else qkv.bias[dim:2 * dim]
        store["k"] = F.linear(args[0], qkv.weight[dim:2 * dim], bias)
        raise _Stop

    handle = qkv.register_forward_pre_hook(hook)
    try:
        model.forward_features(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    if "k" not in store:
        raise BackboneError("the model's forward_features never reached blocks[-1].attn.qkv")
    return store["k"][:, num_prefix_tokens:]


def _torchvision_lacks_cuda_libraries() -> str | None:
    """Why torchvision's compiled ops library cannot load for want of CUDA libraries, or None.

    Looks for ``torchvision/_C*.so`` without importing torchvision and tries to load each with
    :class:`ctypes.CDLL`. Returns the loader's message only when a library fails to load because a CUDA
    library (``libc10_cuda.so``, ``libcudart.so``, ...) is missing; None when torchvision is absent, when its
    ops load (then nothing may be declared in their place) or when they fail for another reason.
    """
    import ctypes
    import importlib.util
    import re

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    libs = sorted(p for folder in spec.submodule_search_locations for p in Path(folder).glob("_C*.so"))
    errors = []
    for lib in libs:
        try:
            ctypes.CDLL(str(lib))
        except OSError as exc:
            errors.append(str(exc))
        else:
            return None  # the real ops load
    cuda = [e for e in errors if re.search(r"lib\w*(cuda|cudnn|cublas|cufft|curand|cusparse|nccl|nvrtc)\w*\.so", e)]
    return cuda[0] if cuda and len(cuda) == len(errors) else None


def import_timm():  # noqa: ANN201 -- returns the timm module, imported lazily
    """Import timm, also beside a torchvision whose compiled ops need CUDA libraries this torch lacks.

    timm imports torchvision, and PyPI's torchvision wheels are CUDA builds: beside a CPU-only torch
    (``torch==X+cpu``) their ops library (``torchvision/_C.so``) does not load (``libc10_cuda.so`` is
    missing), and ``import torchvision`` then fails with ``RuntimeError: operator torchvision::nms does not
    exist`` when it registers fake kernels for ``nms`` and ``qnms``. Only in that case (the import fails
    that way *and* the ops library fails to load for want of a CUDA library) are the schemas of those two
    operators declared, without kernels, and the import retried. torchvision then imports with
    ``torchvision.extension._has_ops()`` False, so its compiled ops (``torchvision.ops.nms``,
    ``roi_align``, ...) raise torchvision's own "Couldn't load custom C++ ops" error; timm's Vision
    Transformers do not use them. Where torchvision's ops load, nothing is declared (declaring them there
    would clash with the real registration).

    Raises:
        BackboneError: timm is not installed, or does not import for another reason (the message names it).
    """
    try:
        import timm
    except RuntimeError as exc:
        if "torchvision::" not in str(exc) or (why := _torchvision_lacks_cuda_libraries()) is None:
            raise _timm_error(exc) from exc
        for module in [m for m in sys.modules if m.split(".")[0] in ("torchvision", "timm")]:
            del sys.modules[module]  # the halves of the failed import
        if not _TORCHVISION_STUBS:
            lib = torch.library.Library("torchvision", "DEF")
            for op in ("nms", "qnms"):
                lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _TORCHVISION_STUBS.append(lib)  # the declarations live as long as this object
        log.debug("torchvision's ops do not load (%s); declared torchvision::nms and ::qnms to import timm", why)
        try:
            import timm
        except Exception as again:  # noqa: BLE001 -- any failure of the retry
            raise _timm_error(again) from again
    except Exception as exc:  # noqa: BLE001 -- missing, or a torchvision that does not import
        raise _timm_error(exc) from exc
    return timm


def _timm_error(exc: BaseException) -> BackboneError:
    return BackboneError(
        f"timm backbones need timm and a torchvision that imports with this torch "
        f"({torch.__version__}): {type(exc).__name__}: {exc}".split("\n")[0]
    )


def timm_backbone(model: nn.Module, name: str | None = None) -> Backbone:
    """Wrap a timm Vision Transformer (already built and loaded) as a :class:`Backbone` in eval mode.

    Raises:
        BackboneError: the model has no ViT-style ``patch_embed``, ``blocks[-1].attn.qkv`` (a fused
            ``Linear`` of ``3 * dim`` outputs) or square patches.
    """
    try:
        qkv = model.blocks[-1].attn.qkv
        patch_size = model.patch_embed.patch_size
        prefix = int(model.num_prefix_tokens)
    except (AttributeError, IndexError, TypeError) as exc:
        raise BackboneError(
            f"{type(model).__name__} is not a ViT-style model (needs patch_embed.patch_size, "
            f"blocks[-1].attn.qkv and num_prefix_tokens): {exc}"
        ) from exc
    if not isinstance(qkv, nn.Linear) or qkv.out_features != 3 * qkv.in_features:
        raise BackboneError(f"{type(model).__name__}: blocks[-1].attn.qkv is not a fused Linear(dim, 3*dim)")
    patch = tuple(patch_size) if isinstance(patch_size, (tuple, list)) else (patch_size, patch_size)
    if patch[0] != patch[1]:
        raise BackboneError(f"{type(model).__name__}: only square patches are supported, got {patch}")
    if getattr(model, "dynamic_img_size", True) is False:
        raise BackboneError(f"{type(model).__name__}: create the model with dynamic_img_size=True")
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = tuple(float(v) for v in cfg.get("mean", IMAGENET_MEAN))
    std = tuple(float(v) for v in cfg.get("std", IMAGENET_STD))
    name = name or TIMM_PREFIX + str(cfg.get("architecture", type(model).__name__))
    return Backbone(model.eval(), name, int(patch[0]), qkv.in_features, prefix, mean, std)  # type: ignore[arg-type]


def _first_mismatch(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> str | None:
    """Describe the first key (in the model's order, then the file's) where ``state`` does not fit."""
    for key, value in expected.items():
        if key.startswith(_HEAD_KEYS):
            continue
        if key not in state:
            return f"first mismatched key {key!r} is missing from the file"
        if state[key].shape != value.shape:
            return (f"first mismatched key {key!r} has shape {tuple(state[key].shape)} in the file, "
                    f"the model expects {tuple(value.shape)}")
    for key in state:
        if key not in expected and not key.startswith(_HEAD_KEYS):
            return f"first mismatched key {key!r} is in the file but not in the model"
    return None


def _load_timm(model_name: str, path: str | os.PathLike[str]) -> Backbone:
    timm = import_timm()
    try:
        model = timm.create_model(model_name, pretrained=False, num_classes=0, dynamic_img_size=True)
    except RuntimeError as exc:
        raise BackboneError(f"timm has no model {model_name!r}: {exc}".split("\n")[0]) from exc
    except TypeError as exc:
        raise BackboneError(f"timm model {model_name!r} is not a Vision Transformer: {exc}") from exc
    state = read_state_dict(path)
    problem = _first_mismatch(model.state_dict(), state)
    if problem is not None:
        raise WeightsError(f"weights file {Path(path)} does not fit {TIMM_PREFIX}{model_name}: {problem}")
    model.load_state_dict({k: v.float() for k, v in state.items() if not k.startswith(_HEAD_KEYS)},
                          strict=False)
    return timm_backbone(model, TIMM_PREFIX + model_name)


def load_backbone(name: str, weights: str | os.PathLike[str]) -> Backbone:
    """Build the backbone ``name`` and load the local weights file ``weights`` into it (CPU, eval mode).

    Args:
        name: one of :data:`ncutfast.label.vit.ARCHS` (vendored DINO ViT) or ``"timm:<model name>"``.
        weights: ``.pth`` (read with ``weights_only=True``) or ``.safetensors`` state dict of that model.

    Raises:
        WeightsError: the file is missing, unsafe or unreadable, or does not fit the model (the message
            names the first mismatched key for timm models, the architecture for vendored ones).
        BackboneError: an unknown name, a timm model that is not ViT-like, or timm not importable.
    """
    if name.startswith(TIMM_PREFIX):
        model_name = name[len(TIMM_PREFIX):]
        if not model_name:
            raise BackboneError("empty timm model name: use timm:<model name>, e.g. timm:vit_small_patch14_dinov2")
        return _load_timm(model_name, weights)
    if name not in ARCHS:
        raise BackboneError(f"unknown backbone {name!r}; choose one of {', '.join(ARCHS)} or timm:<model name>")
    spec = ARCHS[name]
    return Backbone(load_vit(name, weights), name, spec.patch, spec.dim)
