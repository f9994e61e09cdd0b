"""A small DINO Vision Transformer whose state-dict keys match the official DINO checkpoints and timm.

Only what feature extraction needs is implemented: patch embedding, CLS token, DINO's positional-embedding
interpolation, pre-norm blocks, and the final norm. The keys are ``cls_token``, ``pos_embed``,
``patch_embed.proj.{weight,bias}``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*`` and
``norm.*``, so ``load_state_dict(strict=True)`` accepts ``dino_deitsmall16_pretrain.pth`` and friends, and
timm's ``vit_*_patch*_224.dino`` weights (``.pth`` or ``.safetensors``) unchanged.

Why not timm: timm hard-imports torchvision, and PyPI's torchvision does not import beside the CPU build of
torch this project tests on (``shared/spec/toolchain.md`` section 5). A timm model can still be passed to
:func:`extract_keys_with_hook`, which reads the same tensor through a forward hook.

Features (``shared/spec/tokencut.md`` section 1) are the keys of the last block: channels ``[dim, 2*dim)`` of
the last block's fused ``qkv`` Linear output (heads concatenated, bias included, before scaling), CLS dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ARCHS", "ArchSpec", "VisionTransformer", "build_vit", "extract_keys_with_hook", "IMAGENET_MEAN",
           "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ArchSpec:
    """Shape of a DINO ViT: embedding ``dim``, attention ``heads``, ``patch`` size in pixels, 12 blocks."""

    dim: int
    heads: int
    patch: int
    depth: int = 12
    train_size: int = 224

    @property
    def n_pos(self) -> int:
        """Number of patch positional embeddings in the checkpoint (14*14 for p=16, 28*28 for p=8)."""
        return (self.train_size // self.patch) ** 2


ARCHS: dict[str, ArchSpec] = {
    "vit_small_patch16": ArchSpec(dim=384, heads=6, patch=16),
    "vit_small_patch8": ArchSpec(dim=384, heads=6, patch=8),
    "vit_base_patch16": ArchSpec(dim=768, heads=12, patch=16),
    "vit_base_patch8": ArchSpec(dim=768, heads=12, patch=8),
}


class PatchEmbed(nn.Module):
    """Non-overlapping ``p x p`` patches projected to ``dim`` by a strided convolution."""

    def __init__(self, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> ``(B, (H/p)*(W/p), dim)``, row-major token order."""
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` Linear laid out ``[q | k | v]``, each head-major."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, dim)`` -> ``(B, T, dim)``; softmax(q k^T / sqrt(head_dim)) v, then the projection."""
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class Mlp(nn.Module):
    """``fc1`` (dim -> 4 dim), exact GELU, ``fc2`` (4 dim -> dim)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, dim)`` -> ``(B, T, dim)``."""
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))`` (LayerNorm eps 1e-6)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, dim)`` -> ``(B, T, dim)``."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """DINO ViT backbone (no classification head).

    Args:
        spec: the architecture (see :data:`ARCHS`).
    """

    def __init__(self, spec: ArchSpec) -> None:
        super().__init__()
        self.spec = spec
        self.patch = spec.patch
        self.patch_embed = PatchEmbed(spec.dim, spec.patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, spec.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + spec.n_pos, spec.dim))
        self.blocks = nn.ModuleList(Block(spec.dim, spec.heads) for _ in range(spec.depth))
        self.norm = nn.LayerNorm(spec.dim, eps=1e-6)

    def interpolate_pos_encoding(self, h: int, w: int) -> torch.Tensor:
        """Positional embeddings for an ``h x w`` token grid, ``(1, 1 + h*w, dim)``.

        DINO's rule: the checkpoint's square grid is resized bicubically with scale factors
        ``(h + 0.1) / sqrt(Npos)`` (rows) and ``(w + 0.1) / sqrt(Npos)`` (cols) -- the 0.1 guards against the
        output size rounding down -- and the training geometry (square, ``h*w == Npos``) is used as is.
        """
        n_pos = self.pos_embed.shape[1] - 1
        if h * w == n_pos and h == w:
            return self.pos_embed
        side = math.sqrt(n_pos)
        grid = self.pos_embed[:, 1:].reshape(1, int(side), int(side), -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((h + 0.1) / side, (w + 0.1) / side), mode="bicubic")
        if grid.shape[-2:] != (h, w):
            raise RuntimeError(f"pos-embed interpolation gave {tuple(grid.shape[-2:])}, want {(h, w)}")
        return torch.cat((self.pos_embed[:, :1], grid.flatten(2).transpose(1, 2)), dim=1)

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` normalized images (H, W multiples of the patch) -> ``(B, 1 + N, dim)`` tokens."""
        b, _, height, width = x.shape
        tokens = self.patch_embed(x)
        tokens = torch.cat((self.cls_token.expand(b, -1, -1), tokens), dim=1)
        pos = self.interpolate_pos_encoding(height // self.patch, width // self.patch)
        return tokens + pos.to(tokens.dtype)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Full backbone: ``(B, 3, H, W)`` -> ``(B, 1 + N, dim)`` after the final norm (token 0 is CLS)."""
        tokens = self.prepare_tokens(x)
        for blk in self.blocks:
            tokens = blk(tokens)
        return self.norm(tokens)

    def last_keys(self, x: torch.Tensor) -> torch.Tensor:
        """Keys of the last block: ``(B, 3, H, W)`` -> ``(B, N, dim)``, N = (H/p)*(W/p), row-major, no CLS.

        Runs the first ``depth - 1`` blocks, then only ``norm1`` and the fused ``qkv`` of the last block,
        and slices channels ``[dim, 2*dim)``. The attention, MLP and final norm of the last block do not
        affect the keys and are skipped (this equals a hook on ``blocks[-1].attn.qkv`` in a full forward).
        """
        tokens = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            tokens = blk(tokens)
        last = self.blocks[-1]
        dim = self.spec.dim
        k = F.linear(last.norm1(tokens), last.attn.qkv.weight[dim:2 * dim], last.attn.qkv.bias[dim:2 * dim])
        return k[:, 1:]


def build_vit(arch: str) -> VisionTransformer:
    """A randomly initialised (seeded by the caller) ViT for ``arch``, one of :data:`ARCHS`, in eval mode."""
    if arch not in ARCHS:
        raise ValueError(f"unsupported arch {arch!r}; choose one of {', '.join(ARCHS)}")
    model = VisionTransformer(ARCHS[arch])
    nn.init.trunc_normal_(model.pos_embed, std=0.02)
    nn.init.trunc_normal_(model.cls_token, std=0.02)
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            nn.init.trunc_normal_(mod.weight, std=0.02)
            nn.init.zeros_(mod.bias)
    return model.eval()


def extract_keys_with_hook(model: nn.Module, x: torch.Tensor, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Keys read through a forward hook on ``model.blocks[-1].attn.qkv`` during ``model.forward_features(x)``.

    Works for this module and for timm ``VisionTransformer`` models. Returns ``(B, N, dim)`` in the model's
    dtype. The hook is removed before returning (the original code bases leak one hook per image).
    """
    store: dict[str, torch.Tensor] = {}
    qkv = model.blocks[-1].attn.qkv
    handle = qkv.register_forward_hook(lambda _m, _i, out: store.__setitem__("qkv", out))
    try:
        model.forward_features(x)
    finally:
        handle.remove()
    out = store["qkv"]
    dim = out.shape[-1] // 3
    return out[:, num_prefix_tokens:, dim:2 * dim]
