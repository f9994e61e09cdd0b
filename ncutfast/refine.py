"""Refinement of TokenCut's saliency masks: the bilateral solver (spec §3), batched in torch.

``bilateral_solve`` runs TokenCut's bilateral solver (a port of Barron and Poole, "The Fast Bilateral
Solver", ECCV 2016) on a batch of images of different sizes at once, on the CPU or a GPU, in float64. It
computes what ``ncutfast.reference.bilateral_solve`` computes, image by image, up to rounding:

1. Grid coordinates (x, y, Y, U, V) of every pixel, truncated toward zero, and a key that orders and
   neighbours vertices as TokenCut's hash sum_d coord_d * 255**d does; ``torch.unique`` per image gives its
   vertices (sorted keys) and every pixel's vertex.
2. The blur's neighbours: vertex key + stride_d, looked up in the image's sorted keys with
   ``searchsorted`` (the neighbours below are the transpose). The images' vertex sets are then
   concatenated with per-image offsets into one sparse blur matrix for the batch.
3. Splat (a scatter-add over each pixel's vertex), [1 2 1] blur (a sparse CSR product), slice (a gather),
   bistochastization, and one Jacobi-preconditioned conjugate gradient for the whole batch. Vertex vectors
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


def _radices(sizes: list[tuple[int, int]], sigmas: tuple[float, float, float]) -> tuple[list[int], int]:
    """Digit radices of the vertex keys of a batch, and a bound above every key + its largest neighbour step.

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
    if max(top) <= reference.BS_HASH_BASE - 2:
        radices = [t + 2 for t in top]
    else:
        radices = [reference.BS_HASH_BASE] * reference.BS_DIMS
    strides = np.cumprod([1, *radices[:-1]]).tolist()
    return radices, sum(t * s for t, s in zip(top, strides, strict=True)) + strides[-1] + 1


def _pixel_keys(image: torch.Tensor, sigmas: tuple[float, float, float], strides: list[int],
                dtype: torch.dtype) -> torch.Tensor:
    """The vertex key sum_d coord_d * strides[d] of every pixel of one uint8 ``(H, W, 3)`` image, ``(H * W,)``.

    The coordinates come from the same float64 operations in the same order as ``reference.rgb_to_yuv`` and
    ``reference.bilateral_coords``, so they are identical to the reference's (not merely close).
    """
    h, w, _ = image.shape
    sigma_spatial, sigma_luma, sigma_chroma = sigmas
    dev = image.device
    r, g, b = image.permute(2, 0, 1).contiguous().to(torch.float64)  # planar: contiguous channels
    # .to(int) truncates toward zero, as NumPy's astype(int).
    cols = (torch.arange(w, device=dev, dtype=torch.float64) / sigma_spatial).to(dtype) * strides[0]
    rows = (torch.arange(h, device=dev, dtype=torch.float64) / sigma_spatial).to(dtype) * strides[1]
    key = rows[:, None] + cols[None, :]
    for d, (c, o, sigma) in enumerate(zip(reference.RGB_TO_YUV, reference.YUV_OFFSET,
                                          (sigma_luma, sigma_chroma, sigma_chroma), strict=True)):
        yuv = r * c[0] + g * c[1] + b * c[2]
        if o:  # Y's offset is 0.0: adding it changes no value
            yuv += o
        key.add_((yuv / sigma).to(dtype), alpha=strides[2 + d])
    return key.reshape(-1)


def _neighbours(key: torch.Tensor, strides: list[int]) -> torch.Tensor:
    """The blur's taps of one image's vertices (``key``: their sorted keys), int64 ``(V, 10)``.

    Columns: [below in dim 4, ..., below in dim 0, above in dim 0, ..., above in dim 4], -1 where the
    neighbour does not exist. Keys, hence vertex indices, ascend along a row (key - strides[4] < ... <
    key - strides[0] < key + strides[0] < ...). Only the neighbours above are searched (``searchsorted``);
    those below are their transpose. As in TokenCut, a neighbour is any vertex of the image with that key.
    """
    dims = reference.BS_DIMS
    nv = key.shape[0]
    table = torch.full((nv, 2 * dims), -1, dtype=torch.int64, device=key.device)
    vertex = torch.arange(nv, device=key.device)
    for d in range(dims):
        wanted = key + strides[d]
        loc = torch.searchsorted(key, wanted).clamp_(max=nv - 1)
        ok = key[loc] == wanted
        src, dst = torch.masked_select(vertex, ok), torch.masked_select(loc, ok)
        table[src, dims + d] = dst
        table[dst, dims - 1 - d] = src
    return table


class _BatchGrid:
    """The bilateral grids of a batch in a padded layout: image i's vertices (ascending key) occupy slots
    ``[i * vmax, i * vmax + V_i)`` of every vertex vector, so a vector reshaped to ``(B, vmax)`` has one
    image per row (per-image sums are row sums; per-image scalars broadcast). Padding slots have no pixel
    and no neighbour.

    Attributes:
        inverse: int64 ``(P,)``, the slot of every pixel (pixels of all images, concatenated).
        blur_matrix: ``(B * vmax, B * vmax)`` sparse CSR float64, the blur's off-centre taps (1 per existing
            neighbour).
        counts: float64 ``(B * vmax,)``, pixels per vertex (splat of ones; 0 on padding).
    """

    def __init__(self, images: list[torch.Tensor], sizes: list[tuple[int, int]],
                 sigmas: tuple[float, float, float]) -> None:
        device = images[0].device
        self.n_images = n_images = len(images)
        radices, bound = _radices(sizes, sigmas)
        strides = [int(np.prod(radices[:d], dtype=np.int64)) for d in range(reference.BS_DIMS)]
        if bound >= 2**63:
            raise ValueError("sigma_spatial / sigma_luma / sigma_chroma: too small, the grid's vertex keys "
                             "overflow int64")
        dtype = torch.int32 if bound < 2**31 else torch.int64
        grids = []  # per image: vertex of every pixel, pixels per vertex, neighbour table
        for img in images:
            key, inverse, counts = torch.unique(_pixel_keys(img, sigmas, strides, dtype), sorted=True,
                                                return_inverse=True, return_counts=True)
            grids.append((inverse.reshape(-1), counts, _neighbours(key, strides)))
        self.vmax = vmax = max(counts.shape[0] for _, counts, _ in grids)
        self.size = n_images * vmax

        def padded(x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x, x.new_zeros(vmax - x.shape[0])])

        self.inverse = torch.cat([inverse + i * vmax for i, (inverse, _, _) in enumerate(grids)])
        self.counts = torch.cat([padded(counts.to(torch.float64)) for _, counts, _ in grids])
        present = [table >= 0 for _, _, table in grids]
        per_row = torch.cat([padded(p.sum(dim=1)) for p in present])
        index_dtype = torch.int32 if self.size * 2 * reference.BS_DIMS < 2**31 else torch.int64  # MKL's SpMV
        crow = torch.zeros(self.size + 1, dtype=index_dtype, device=device)
        crow[1:] = torch.cumsum(per_row, 0)
        # Row-major selection keeps every row's columns ascending: CSR order.
        col = torch.cat([torch.masked_select(table, p) + i * vmax
                         for i, ((_, _, table), p) in enumerate(zip(grids, present, strict=True))])
        with warnings.catch_warnings():  # torch flags sparse CSR as beta; the matrix-vector product is stable
            warnings.simplefilter("ignore", UserWarning)
            self.blur_matrix = torch.sparse_csr_tensor(crow, col.to(index_dtype), torch.ones(
                col.shape[0], dtype=torch.float64, device=device), (self.size, self.size))

    def splat(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(self.size, dtype=x.dtype, device=x.device).index_add_(0, self.inverse, x)

    def slice(self, y: torch.Tensor) -> torch.Tensor:
        return y[self.inverse]

    def blur(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * reference.BS_DIMS * x + self.blur_matrix @ x

    def per_image(self, x: torch.Tensor) -> torch.Tensor:
        """A vertex vector as ``(B, vmax)`` (a view)."""
        return x.view(self.n_images, self.vmax)


def _cg(grid: _BatchGrid, matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, x0: torch.Tensor,
        precond: torch.Tensor) -> torch.Tensor:
    """SciPy's ``cg`` (rtol 1e-5, atol 0, at most 25 iterations) on every image's block at once.

    Vectors are ``(B, vmax)`` (one image per row); dot products are row sums. Every image follows SciPy's
    iteration on its own block, stops when ||r|| < 1e-5 ||b|| and then takes zero steps (its scalars are
    masked, never the vectors).
    """
    b, x0, precond = (grid.per_image(v) for v in (b, x0, precond))

    def mv(v: torch.Tensor) -> torch.Tensor:
        return grid.per_image(matvec(v.reshape(-1)))

    def dot(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # row-wise dot products
        return (u * v).sum(dim=1)

    bnorm = dot(b, b).sqrt()
    atol = reference.BS_CG_TOL * bnorm
    active = bnorm > 0
    x = torch.where(active[:, None], x0, b)  # SciPy returns b itself when ||b|| = 0
    r = b - mv(x)
    p = torch.zeros_like(b)
    rho_prev = torch.ones_like(bnorm)
    for it in range(reference.BS_CG_MAXITER):
        active = active & ~(dot(r, r).sqrt() < atol)
        if not bool(active.any()):
            break
        z = precond * r
        rho = dot(r, z)
        p = z if it == 0 else torch.addcmul(z, torch.where(active, rho / rho_prev, 0.0)[:, None], p)
        q = mv(p)
        alpha = torch.where(active, rho / dot(p, q), 0.0)[:, None]
        x = torch.addcmul(x, alpha, p)
        r = torch.addcmul(r, alpha, q, value=-1.0)
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
        t = _as_tensor(target, device).to(torch.float64)
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"targets{tag}: contains NaN or inf")
        imgs.append(_as_tensor(image, device))
        tgts.append(t.reshape(-1))
        sizes.append(size)
    grid = _BatchGrid(imgs, sizes, sigmas)

    # Bistochastization (spec §3): m = splat(1); n = 1; n = sqrt(n * m / blur(n)) ten times; m = n * blur(n).
    has_pixels = grid.counts > 0
    m = torch.where(has_pixels, grid.counts, 1.0)  # padding slots: isolated vertices (finite, never used)
    n = torch.ones_like(m)
    for _ in range(reference.BS_BISTOCHASTIC_ITERS):
        n = torch.sqrt(n * m / grid.blur(n))
    m = n * grid.blur(n)

    t = torch.cat(tgts)
    c_splat = grid.counts * confidence
    b = grid.splat(t) * confidence  # splat(t c) for a constant c
    diag = lam * (m - n * (2 * reference.BS_DIMS * n)) + c_splat  # diag(A), rounded as the reference's
    lam_n = lam * n

    def matvec(y: torch.Tensor) -> torch.Tensor:
        # A y = lam (Dm - Dn B Dn) y + splat(c) y = diag(A) y - lam n (B_off (n y)), B_off = B - 2 * 5 I.
        return torch.addcmul(diag * y, lam_n, grid.blur_matrix @ (n * y), value=-1.0)

    precond = 1.0 / torch.clamp(diag, min=reference.BS_A_DIAG_MIN)
    y = _cg(grid, matvec, b, torch.where(has_pixels, b / torch.where(has_pixels, c_splat, 1.0), 0.0), precond)
    out = list(grid.slice(y).split([h * w for h, w in sizes]))
    out = [o.reshape(s) for o, s in zip(out, sizes, strict=True)]
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
