"""Refinement of TokenCut's saliency masks: the bilateral solver (spec §3), batched in torch.

``bilateral_solve`` runs TokenCut's bilateral solver (a port of Barron and Poole, "The Fast Bilateral
Solver", ECCV 2016) on a batch of images of different sizes at once, on the CPU or a GPU, in float64. It
computes what ``ncutfast.reference.bilateral_solve`` computes, image by image, up to rounding:

1. Grid coordinates (x, y, Y, U, V) of every pixel, truncated toward zero, and a key that orders and
   neighbours vertices as TokenCut's hash sum_d coord_d * 255**d does; ``torch.unique`` per image gives its
   vertices (sorted keys) and every pixel's vertex.
2. The blur's neighbours, vertex key -+ stride_d, for the whole batch at once: by lookups in two small
   dense tables (the rank of a colour cell, then the vertex of a (colour rank, spatial cell) pair), or, for
   TokenCut's wrapping hashes and grids too large for the tables, by ``searchsorted`` in the sorted keys.
   They form one sparse CSR blur matrix for the batch.
3. Splat (a scatter-add over each pixel's vertex), [1 2 1] blur (a sparse CSR product), slice (a gather),
   bistochastization, and one Jacobi-preconditioned conjugate gradient for the whole batch, written into
   reused buffers (fresh vertex- or pixel-sized temporaries cost page faults). Vertex vectors
   are padded to ``(B, max V_i)``, so per-image dot products are row sums: every image follows SciPy's
   ``cg`` exactly (its own step sizes and its own stop at ||r|| < 1e-5 ||b||, at most 25 iterations) and
   is frozen once it stops.

``bilateral_binary`` is TokenCut's binary output for overlays (hole filling and connected components on the
CPU, by the reference's code).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch

from . import reference
from ._validate import check_positive_real, check_rgb_image, check_target

__all__ = ["bilateral_solve", "bilateral_binary"]

ArrayLike = torch.Tensor | np.ndarray


def _as_tensor(x: ArrayLike, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(x).to(device)


def _radices(sizes: list[tuple[int, int]], sigmas: tuple[float, float, float]) -> tuple[list[int], int, bool]:
    """Digit radices of the vertex keys of a batch, a bound above every key + its largest neighbour step,
    and whether the radices are the compact ones (False: TokenCut's 255).

    TokenCut's hash is sum_d coord_d * 255**d. While every coordinate is <= 253 (images below 254 grid cells
    per side, sigmas above about 1), a neighbour hash (+- 255**d) can only hit the vertex one cell away, so
    any order-preserving key with the same neighbour relation gives the same grid: the compact mixed-radix
    key with radix n_d = (the batch's largest coordinate in dimension d) + 2, which needs fewer bits and
    sorts faster. A coordinate never reaches its radix - 1, so key + stride_d never carries into the next
    digit. Otherwise the keys are TokenCut's own hashes (radix 255), wrap-arounds included.
    """
    sigma_spatial, sigma_luma, sigma_chroma = sigmas
    height = max(h for h, _ in sizes)
    width = max(w for _, w in sizes)
    # Y <= 255 and U, V <= 255.5 up to rounding; 256 leaves room for it.
    top = [int((width - 1) / sigma_spatial), int((height - 1) / sigma_spatial), int(256.0 / sigma_luma),
           int(256.0 / sigma_chroma), int(256.0 / sigma_chroma)]
    compact = max(top) <= reference.BS_HASH_BASE - 2
    if compact:
        radices = [t + 2 for t in top]
    else:
        radices = [reference.BS_HASH_BASE] * reference.BS_DIMS
    strides = np.cumprod([1, *radices[:-1]]).tolist()
    return radices, sum(t * s for t, s in zip(top, strides, strict=True)) + strides[-1] + 1, compact


def _pixel_keys(images: list[torch.Tensor], sigmas: tuple[float, float, float], strides: list[int],
                dtype: torch.dtype) -> list[torch.Tensor]:
    """The vertex key sum_d coord_d * strides[d] of every pixel of each uint8 ``(H_i, W_i, 3)`` image, a list
    of ``(H_i * W_i,)`` tensors of ``dtype``.

    The coordinates come from the same float64 operations in the same order as ``reference.rgb_to_yuv`` and
    ``reference.bilateral_coords``, so they are identical to the reference's (not merely close). The
    arithmetic writes into buffers shared by the whole batch: fresh pixel-sized temporaries (page faults)
    would cost more than the arithmetic itself.
    """
    sigma_spatial, sigma_luma, sigma_chroma = sigmas
    dev = images[0].device
    npix = [im.shape[0] * im.shape[1] for im in images]
    keys = torch.empty(sum(npix), dtype=dtype, device=dev).split(npix)
    rgb = torch.empty(3, max(npix), dtype=torch.float64, device=dev)
    yuv_buf, term_buf = torch.empty_like(rgb[0]), torch.empty_like(rgb[0])
    coord_buf = torch.empty(max(npix), dtype=dtype, device=dev)
    for image, key in zip(images, keys, strict=True):
        h, w, _ = image.shape
        # .to(int) truncates toward zero, as NumPy's astype(int).
        cols = (torch.arange(w, device=dev, dtype=torch.float64) / sigma_spatial).to(dtype) * strides[0]
        rows = (torch.arange(h, device=dev, dtype=torch.float64) / sigma_spatial).to(dtype) * strides[1]
        torch.add(rows[:, None], cols[None, :], out=key.view(h, w))
        r, g, b = rgb[:, :h * w].copy_(image.permute(2, 0, 1).reshape(3, h * w))  # planar float64
        yuv, term, coord = yuv_buf[:h * w], term_buf[:h * w], coord_buf[:h * w]
        for d, (c, o, sigma) in enumerate(zip(reference.RGB_TO_YUV, reference.YUV_OFFSET,
                                              (sigma_luma, sigma_chroma, sigma_chroma), strict=True)):
            torch.mul(r, c[0], out=yuv)  # ((c0 R + c1 G) + c2 B) + o, every step rounded
            yuv.add_(torch.mul(g, c[1], out=term))
            yuv.add_(torch.mul(b, c[2], out=term))
            if o:  # Y's offset is 0.0: adding it changes no value
                yuv.add_(o)
            key.add_(coord.copy_(yuv.div_(sigma)), alpha=strides[2 + d])  # copy_ to int truncates toward zero
    return list(keys)


#: Most entries of a table of the dense neighbour search (``_dense_taps``); larger grids use ``searchsorted``.
_DENSE_TABLE_MAX = 1 << 24


def _search_taps(keys: torch.Tensor, local: torch.Tensor, slots: torch.Tensor,
                 strides: list[int]) -> list[torch.Tensor]:
    """The blur's taps by binary search among the batch's sorted int64 vertex ``keys`` (image i's local
    keys ``local`` offset by (i + 1) blocks of at least the image's largest key + stride), any radices: per
    direction (below in dim 4, ..., dim 0, then above in dim 0, ..., dim 4), the slot of each vertex's
    neighbour at key -+ strides[d], or -1, as ``(V,)`` tensors of ``slots``' dtype."""
    last = keys.shape[0] - 1

    def find(wanted: torch.Tensor) -> torch.Tensor:
        loc = torch.searchsorted(keys, wanted).clamp_(max=last)
        return torch.where(keys.index_select(0, loc) == wanted, slots.index_select(0, loc), -1)

    below = [torch.where(local >= s, find(keys - s), -1) for s in reversed(strides)]  # else another image's
    return below + [find(keys + s) for s in strides]


def _dense_taps(keys: torch.Tensor, slots: torch.Tensor, strides: list[int],
                n_high: int) -> list[torch.Tensor] | None:
    """The blur's taps as ``_search_taps``, by table lookups; compact radices only (no carries). None when a
    table would exceed ``_DENSE_TABLE_MAX`` entries.

    A key is ``high * split + low`` with ``split = strides[2]``: ``low`` holds the spatial digits, ``high``
    the image block and the colour digits, and every key of image i has ``high`` in
    ``[(i + 1) * n_high, (i + 2) * n_high)``. ``rank`` maps a present ``high`` to its rank among the
    distinct ones (-1 where absent); ``cells`` holds the slot of the vertex at ``(rank + 1) * split + low``
    (-1 elsewhere, including the first ``split`` entries): tables of (B + 2) * n_high and of (distinct highs
    + 2) x ``split`` entries, small where one over the key space would not be (an image has few colour
    cells). A spatial neighbour is then the cell +- strides[d], a colour one the rank of high +- strides[d] /
    split: with no carry, a step off the grid lands on a digit equal to its radix - 1, which no vertex has,
    or in a padding row or block.
    """
    split = strides[2]
    high = torch.div(keys, split, rounding_mode="floor")
    low = keys - high * split
    first = torch.ones_like(high, dtype=torch.bool)
    torch.ne(high[1:], high[:-1], out=first[1:])
    n_distinct = int(first.sum())
    n_rank = int(high[-1]) // n_high * n_high + 2 * n_high  # through the block after the last image
    if max(n_rank, (n_distinct + 2) * split) > _DENSE_TABLE_MAX:
        return None
    rank = torch.full((n_rank,), -1, dtype=torch.int64, device=keys.device)
    rank[high[first]] = torch.arange(n_distinct, device=keys.device)
    cells = torch.full(((n_distinct + 2) * split,), -1, dtype=slots.dtype, device=keys.device)
    cell = torch.cumsum(first, 0).mul_(split).add_(low)  # (rank + 1) * split + low
    cells[cell] = slots

    def tap(sign: int, stride: int) -> torch.Tensor:
        if stride < split:  # spatial: same colour row
            return cells.index_select(0, cell + sign * stride)
        row = rank.index_select(0, high + sign * (stride // split)).add_(1)  # 0 where absent: padding row
        return cells.index_select(0, row.mul_(split).add_(low))

    return [tap(-1, s) for s in reversed(strides)] + [tap(1, s) for s in strides]


class _BatchGrid:
    """The bilateral grids of a batch in a padded layout: image i's vertices (ascending key) occupy slots
    ``[i * vmax, i * vmax + V_i)`` of every vertex vector, so a vector reshaped to ``(B, vmax)`` has one
    image per row (per-image sums are row sums; per-image scalars broadcast). Padding slots have no pixel
    and no neighbour.

    Attributes:
        inverses: per image, int64 ``(H_i * W_i,)``, the vertex (row position in ``(B, vmax)``) of every pixel.
        blur_matrix: ``(B * vmax, B * vmax)`` sparse CSR float64, the blur's off-centre taps (1 per existing
            neighbour).
        counts: float64 ``(B * vmax,)``, pixels per vertex (splat of ones; 0 on padding).
    """

    def __init__(self, images: list[torch.Tensor], sizes: list[tuple[int, int]],
                 sigmas: tuple[float, float, float]) -> None:
        device = images[0].device
        self.n_images = n_images = len(images)
        radices, bound, compact = _radices(sizes, sigmas)
        strides = [int(np.prod(radices[:d], dtype=np.int64)) for d in range(reference.BS_DIMS)]
        split = strides[2]  # a key is (colour digits) * split + (spatial digits)
        n_high = bound // split + 1  # every key + its largest stride is < bound < n_high * split
        if (n_images + 2) * n_high * split >= 2**63:
            raise ValueError("sigma_spatial / sigma_luma / sigma_chroma: too small, the grid's vertex keys "
                             "overflow int64")
        dtype = torch.int32 if bound < 2**31 else torch.int64
        grids = [torch.unique(k, sorted=True, return_inverse=True, return_counts=True)
                 for k in _pixel_keys(images, sigmas, strides, dtype)]
        self.inverses = [inverse for _, inverse, _ in grids]
        n_vertices = [k.shape[0] for k, _, _ in grids]
        self.vmax = vmax = max(n_vertices)
        self.size = n_images * vmax
        counts = torch.zeros(n_images, vmax, dtype=torch.float64, device=device)
        for row, (_, _, c) in zip(counts, grids, strict=True):
            row[:c.shape[0]] = c
        self.counts = counts.reshape(-1)

        # The whole batch's vertices: image i's keys offset by (i + 1) * n_high * split, so that they ascend
        # and no step off an image reaches another, and their slots.
        local = torch.cat([k for k, _, _ in grids]).to(torch.int64)
        image = torch.repeat_interleave(torch.arange(n_images, device=device),
                                        torch.tensor(n_vertices, device=device))
        keys = local + (image + 1) * (n_high * split)
        first_vertex = np.cumsum([0, *n_vertices[:-1]]).tolist()
        index_dtype = torch.int32 if self.size * 2 * reference.BS_DIMS < 2**31 else torch.int64  # MKL's SpMV
        slots = (torch.arange(local.shape[0], device=device) + torch.repeat_interleave(
            torch.tensor([i * vmax - f for i, f in enumerate(first_vertex)], device=device),
            torch.tensor(n_vertices, device=device))).to(index_dtype)
        # The blur's taps: [below in dim 4, ..., below in dim 0, above in dim 0, ..., above in dim 4], the slot
        # or -1 where absent; as in TokenCut, the neighbour in dimension d is any vertex of the image whose
        # key is key -+ strides[d] (slots ascend along a row, as keys do).
        taps = (_dense_taps(keys, slots, strides, n_high) if compact else None) or _search_taps(
            keys, local, slots, strides)
        taps = torch.stack(taps, dim=1).view(-1)
        # Row-major: every row's columns ascend, and rows ascend with the slots (CSR order).
        col = torch.masked_select(taps, taps >= 0)
        per_slot = torch.zeros(self.size, dtype=index_dtype, device=device)
        per_slot[slots] = sum((t >= 0).to(index_dtype) for t in taps.view(-1, 2 * reference.BS_DIMS).unbind(1))
        crow = torch.zeros(self.size + 1, dtype=index_dtype, device=device)
        torch.cumsum(per_slot, 0, out=crow[1:])
        with warnings.catch_warnings():  # torch flags sparse CSR as beta; the matrix-vector product is stable
            warnings.simplefilter("ignore", UserWarning)
            self.blur_matrix = torch.sparse_csr_tensor(crow, col, torch.ones(
                col.shape[0], dtype=torch.float64, device=device), (self.size, self.size))

    def splat(self, values: list[torch.Tensor]) -> torch.Tensor:
        """Per-image float64 pixel values ``(H_i * W_i,)`` -> their sums on the vertices, ``(B * vmax,)``."""
        out = torch.zeros(self.n_images, self.vmax, dtype=torch.float64, device=self.counts.device)
        for row, inverse, v in zip(out, self.inverses, values, strict=True):
            row.scatter_add_(0, inverse, v)
        return out.reshape(-1)

    def slice(self, y: torch.Tensor) -> list[torch.Tensor]:
        """A vertex vector ``(B * vmax,)`` -> every pixel's vertex value, per image ``(H_i * W_i,)``."""
        return [row.index_select(0, inverse) for row, inverse in zip(self.per_image(y), self.inverses,
                                                                      strict=True)]

    def blur(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """[1 2 1] in every dimension: 2 * 5 * x + the existing neighbours, into ``out``."""
        return torch.addmv(x, self.blur_matrix, x, beta=2 * reference.BS_DIMS, out=out)

    def per_image(self, x: torch.Tensor) -> torch.Tensor:
        """A vertex vector as ``(B, vmax)`` (a view)."""
        return x.view(self.n_images, self.vmax)


def _cg(grid: _BatchGrid, matvec: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], b: torch.Tensor,
        x0: torch.Tensor, precond: torch.Tensor) -> torch.Tensor:
    """SciPy's ``cg`` (rtol 1e-5, atol 0, at most 25 iterations) on every image's block at once.

    Vectors are ``(B, vmax)`` (one image per row); dot products are row sums. Every image follows SciPy's
    iteration on its own block, stops when ||r|| < 1e-5 ||b|| and then takes zero steps (its scalars are
    masked, never the vectors). ``matvec(v, out)`` writes A v into ``out``; the iteration reuses its
    buffers.
    """
    b, x0, precond = (grid.per_image(v) for v in (b, x0, precond))
    tmp = torch.empty_like(b)

    def dot(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # row-wise dot products
        return torch.mul(u, v, out=tmp).sum(dim=1)

    bnorm = dot(b, b).sqrt()
    atol = reference.BS_CG_TOL * bnorm
    active = bnorm > 0
    x = torch.where(active[:, None], x0, b)  # SciPy returns b itself when ||b|| = 0
    r, z, p, q = (torch.empty_like(b) for _ in range(4))
    torch.sub(b, matvec(x, q), out=r)
    rho_prev = torch.ones_like(bnorm)
    for it in range(reference.BS_CG_MAXITER):
        active &= ~(torch.linalg.vector_norm(r, dim=1) < atol)
        if not bool(active.any()):
            break
        torch.mul(precond, r, out=z)
        rho = dot(r, z)
        if it == 0:
            p.copy_(z)
        else:  # p = beta p + z
            p.mul_(torch.where(active, rho / rho_prev, 0.0)[:, None]).add_(z)
        matvec(p, q)
        alpha = torch.where(active, rho / dot(p, q), 0.0)[:, None]
        x.addcmul_(alpha, p)
        r.addcmul_(alpha, q, value=-1.0)
        rho_prev = rho
    return x.reshape(-1)


def bilateral_solve(
    images: ArrayLike | Sequence[ArrayLike],
    targets: ArrayLike | Sequence[ArrayLike],
    *,
    confidence: float = reference.BS_CONFIDENCE,
    sigma_spatial: float = reference.BS_SIGMA_SPATIAL,
    sigma_luma: float = reference.BS_SIGMA_LUMA,
    sigma_chroma: float = reference.BS_SIGMA_CHROMA,
    lam: float = reference.BS_LAM,
    device: str | torch.device | None = None,
) -> torch.Tensor | list[torch.Tensor]:
    """TokenCut's bilateral solver (spec §3) on one image or a batch of images of any sizes.

    Args:
        images: uint8 ``(H_i, W_i, 3)`` RGB (torch or NumPy), the **original** images; one array or a
            sequence.
        targets: real ``(H_i, W_i)`` per image, the TokenCut masks at the original size (0/1); one array or a
            sequence of the same length as ``images``.
        confidence: every pixel's weight (TokenCut: 0.999).
        sigma_spatial, sigma_luma, sigma_chroma: grid cell sizes (pixels, YUV units); TokenCut's README
            values 16, 16, 8 by default.
        lam: weight of the smoothness term (256).
        device: where to compute; default the first image's device (NumPy: the CPU).

    Returns:
        The soft refined masks, float64 ``(H_i, W_i)`` on ``device``: a tensor for one image, a list for a
        sequence. They equal ``reference.bilateral_solve`` image by image up to rounding (float64 sums in
        another order). Deterministic on the CPU; on a GPU the scatter-adds are atomic, so the last bits may
        vary between runs.

    Raises:
        TypeError / ValueError: as the reference, naming the argument (and the image's index in a batch).
    """
    single = hasattr(images, "shape")
    if single != hasattr(targets, "shape"):
        raise TypeError("images, targets: give one array each or a sequence of each")
    image_list = [images] if single else list(images)
    target_list = [targets] if single else list(targets)
    if not image_list:
        raise ValueError("images: empty batch")
    if len(image_list) != len(target_list):
        raise ValueError(f"targets: {len(target_list)} targets for {len(image_list)} images")
    sigmas = (check_positive_real(sigma_spatial, "sigma_spatial"), check_positive_real(sigma_luma, "sigma_luma"),
              check_positive_real(sigma_chroma, "sigma_chroma"))
    confidence = check_positive_real(confidence, "confidence")
    lam = check_positive_real(lam, "lam", allow_zero=True)
    if device is None:
        device = image_list[0].device if isinstance(image_list[0], torch.Tensor) else "cpu"
    device = torch.device(device)
    imgs, tgts, sizes = [], [], []
    for i, (image, target) in enumerate(zip(image_list, target_list, strict=True)):
        tag = "" if single else f"[{i}]"
        size = check_rgb_image(image, f"images{tag}")
        check_target(target, size, f"targets{tag}", all_finite=True)  # type, shape, dtype
        t = _as_tensor(target, device)
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"targets{tag}: contains NaN or inf")
        t = t.to(torch.float64)
        imgs.append(_as_tensor(image, device))
        tgts.append(t.reshape(-1))
        sizes.append(size)
    grid = _BatchGrid(imgs, sizes, sigmas)

    # Bistochastization (spec §3): m = splat(1); n = 1; n = sqrt(n * m / blur(n)) ten times; m = n * blur(n).
    has_pixels = grid.counts > 0
    m = torch.where(has_pixels, grid.counts, 1.0)  # padding slots: isolated vertices (finite, never used)
    n = torch.ones_like(m)
    blurred = torch.empty_like(m)
    for _ in range(reference.BS_BISTOCHASTIC_ITERS):
        grid.blur(n, blurred)
        n.mul_(m).div_(blurred).sqrt_()
    m = n * grid.blur(n, blurred)

    c_splat = grid.counts * confidence
    b = grid.splat(tgts).mul_(confidence)  # splat(t c) for a constant c
    diag = lam * (m - n * (2 * reference.BS_DIMS * n)) + c_splat  # diag(A), rounded as the reference's
    lam_n = lam * n
    scaled, taps = torch.empty_like(m), torch.empty_like(m)

    def matvec(y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        # A y = lam (Dm - Dn B Dn) y + splat(c) y = diag(A) y - lam n (B_off (n y)), B_off = B - 2 * 5 I.
        y = y.reshape(-1)
        torch.mv(grid.blur_matrix, torch.mul(n, y, out=scaled), out=taps)
        return torch.mul(diag, y, out=out.view(-1)).addcmul_(lam_n, taps, value=-1.0).view_as(out)

    precond = 1.0 / torch.clamp(diag, min=reference.BS_A_DIAG_MIN)
    y = _cg(grid, matvec, b, torch.where(has_pixels, b / torch.where(has_pixels, c_splat, 1.0), 0.0), precond)
    out = [o.reshape(s) for o, s in zip(grid.slice(y), sizes, strict=True)]
    return out[0] if single else out


def bilateral_binary(soft: ArrayLike, tokencut_mask: ArrayLike) -> np.ndarray:
    """TokenCut's binary bilateral-solver output for overlays (``reference.bilateral_binary``), bool ``(H, W)``.

    ``soft``: ``bilateral_solve``'s ``(H, W)`` output (torch or NumPy, any device); ``tokencut_mask``: bool
    ``(H, W)``, the mask the solver refined. Holes of ``soft > 0.5`` filled, the second-largest label kept,
    complemented when its IoU with ``tokencut_mask`` is < 0.5.
    """
    def host(x: ArrayLike) -> np.ndarray:
        return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)

    return reference.bilateral_binary(host(soft), host(tokencut_mask))
