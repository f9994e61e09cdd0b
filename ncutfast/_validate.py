"""Input checks shared by the reference and the public API, so both raise the same exception types with
the same messages for the same bad input.

Checks work on anything with ``ndim``, ``shape`` and ``dtype`` (NumPy, torch, CuPy); finiteness is checked
by the caller-supplied ``all_finite`` result so each framework uses its own reduction.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "check_tau",
    "check_eps",
    "check_feature_matrix",
    "check_grid",
    "check_lengths",
    "check_patch",
    "check_image_size",
    "check_positive_int",
    "check_choice",
    "FLOAT_DTYPE_NAMES",
    "check_positive_real",
    "check_rgb_image",
    "check_target",
]

#: Floating dtypes accepted as features (by name, so the same table serves NumPy, torch and CuPy).
FLOAT_DTYPE_NAMES = ("float16", "bfloat16", "float32", "float64")


def dtype_name(dtype: object) -> str:
    """'float32' for np.float32, torch.float32, cupy's float32 dtype, ..."""
    name = str(dtype)
    return name.rsplit(".", 1)[-1]


def check_tau(tau: float, *, binary: bool = True) -> float:
    """tau must be a real number in the open interval (-1, 1): cosine similarities live in [-1, 1].

    A non-binary graph (``binary=False``: W keeps the similarities that are >= tau) also needs tau >= 0.
    With tau < 0 the similarities in [tau, 0) become negative edge weights: D - W is indefinite, degrees
    can be <= 0, and the 2nd-smallest generalized eigenpair is no longer a cut (scipy's may even be the
    trivial constant vector, shifted to index 1 by a negative eigenvalue), so such graphs are refused.
    """
    if isinstance(tau, bool) or not isinstance(tau, (int, float, np.floating, np.integer)):
        raise TypeError(f"tau: expected a real number, got {type(tau).__name__}")
    tau = float(tau)
    if not np.isfinite(tau) or not -1.0 < tau < 1.0:
        raise ValueError(f"tau: must lie in the open interval (-1, 1), got {tau!r}")
    if not binary and tau < 0.0:
        raise ValueError(f"tau: must be >= 0 for a non-binary graph (binary=False), got {tau!r}: similarities in "
                         "[tau, 0) would be negative edge weights, for which the normalized cut is undefined")
    return tau


def check_eps(eps: float) -> float:
    """eps must be a finite positive real number (the weight of non-edges keeps the graph connected)."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating, np.integer)):
        raise TypeError(f"eps: expected a real number, got {type(eps).__name__}")
    eps = float(eps)
    if not np.isfinite(eps) or eps <= 0.0:
        raise ValueError(f"eps: must be finite and > 0, got {eps!r}")
    return eps


def check_feature_matrix(x: object, name: str, *, ndims: Sequence[int] = (2,), all_finite: bool | None) -> None:
    """Check rank, emptiness and dtype of a feature array; ``all_finite`` False raises (None skips)."""
    if not hasattr(x, "ndim") or not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name}: expected an array (torch, NumPy or CuPy), got {type(x).__name__}")
    if x.ndim not in ndims:
        want = " or ".join(f"{d}-D" for d in ndims)
        raise ValueError(f"{name}: expected a {want} array, got shape {tuple(x.shape)}")
    if any(int(s) == 0 for s in x.shape):
        raise ValueError(f"{name}: empty array of shape {tuple(x.shape)} (need >= 1 token and >= 1 channel)")
    if dtype_name(x.dtype) not in FLOAT_DTYPE_NAMES:
        raise TypeError(f"{name}: unsupported dtype {dtype_name(x.dtype)}; expected one of {FLOAT_DTYPE_NAMES}")
    if all_finite is False:
        raise ValueError(f"{name}: contains NaN or inf")


def check_positive_int(v: object, name: str, *, minimum: int = 1, maximum: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    if int(v) < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {int(v)}")
    if maximum is not None and int(v) > maximum:
        raise ValueError(f"{name}: must be in [{minimum}, {maximum}], got {int(v)}")
    return int(v)


def check_grid(grid: object, n: int, name: str = "grid") -> tuple[int, int]:
    """A grid is (h, w) with h * w == n tokens (row-major token order)."""
    if not isinstance(grid, (tuple, list)) or len(grid) != 2:
        raise TypeError(f"{name}: expected an (h, w) pair, got {grid!r}")
    h = check_positive_int(grid[0], f"{name}[0]")
    w = check_positive_int(grid[1], f"{name}[1]")
    if h * w != n:
        raise ValueError(f"{name}: {h}x{w} = {h * w} tokens does not match the {n} feature rows")
    return h, w


def check_patch(patch: object) -> int:
    return check_positive_int(patch, "patch")


def check_image_size(image_size: object, name: str = "image_size") -> tuple[int, int]:
    """An image size is (H, W) in pixels."""
    if not isinstance(image_size, (tuple, list)) or len(image_size) != 2:
        raise TypeError(f"{name}: expected an (H, W) pair, got {image_size!r}")
    return check_positive_int(image_size[0], f"{name}[0]"), check_positive_int(image_size[1], f"{name}[1]")


def check_lengths(lengths: Sequence[int], batch: int, n_max: int) -> list[int]:
    """Per-image token counts of a padded batch: ``batch`` ints in [1, n_max] (bools and floats, even
    integral ones, are refused: a float count is a bug upstream, not a value to truncate)."""
    if isinstance(lengths, (str, bytes)) or not isinstance(lengths, Sequence):
        raise TypeError(f"lengths: expected a sequence of ints, got {type(lengths).__name__}")
    for i, v in enumerate(lengths):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"lengths: entry {i} is {v!r} ({type(v).__name__}), expected an integer")
    out = [int(v) for v in lengths]
    if len(out) != batch:
        raise ValueError(f"lengths: has {len(out)} entries but the batch holds {batch} images")
    for i, v in enumerate(out):
        if not 1 <= v <= n_max:
            raise ValueError(f"lengths: entry {i} is {v}, must lie in [1, {n_max}]")
    return out


def check_choice(value: object, name: str, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")
    return value


def check_positive_real(v: object, name: str, *, allow_zero: bool = False) -> float:
    """A finite real number > 0 (>= 0 with ``allow_zero``)."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name}: expected a real number, got {type(v).__name__}")
    v = float(v)
    if not np.isfinite(v) or v < 0.0 or (v == 0.0 and not allow_zero):
        raise ValueError(f"{name}: must be finite and {'>=' if allow_zero else '>'} 0, got {v!r}")
    return v


def check_rgb_image(image: object, name: str = "image") -> tuple[int, int]:
    """An RGB image is a uint8 ``(H, W, 3)`` array with H, W >= 1; returns (H, W)."""
    if not hasattr(image, "ndim") or not hasattr(image, "shape") or not hasattr(image, "dtype"):
        raise TypeError(f"{name}: expected an array (torch or NumPy), got {type(image).__name__}")
    if image.ndim != 3 or int(image.shape[2]) != 3 or int(image.shape[0]) == 0 or int(image.shape[1]) == 0:
        raise ValueError(f"{name}: expected a non-empty (H, W, 3) RGB array, got shape {tuple(image.shape)}")
    if dtype_name(image.dtype) != "uint8":
        raise TypeError(f"{name}: expected dtype uint8 (0..255 RGB), got {dtype_name(image.dtype)}")
    return int(image.shape[0]), int(image.shape[1])


def check_target(target: object, size: tuple[int, int], name: str = "target", *, all_finite: bool) -> None:
    """A per-pixel target is a real ``(H, W)`` array of the image's size; ``all_finite`` False raises."""
    if not hasattr(target, "ndim") or not hasattr(target, "shape") or not hasattr(target, "dtype"):
        raise TypeError(f"{name}: expected an array (torch or NumPy), got {type(target).__name__}")
    if tuple(int(s) for s in target.shape) != tuple(size):
        raise ValueError(f"{name}: expected shape {tuple(size)} (the image's H, W), got {tuple(target.shape)}")
    kind = dtype_name(target.dtype)
    if kind not in FLOAT_DTYPE_NAMES and kind != "bool" and not kind.startswith(("int", "uint")):
        raise TypeError(f"{name}: expected a real dtype, got {kind}")
    if not all_finite:
        raise ValueError(f"{name}: contains NaN or inf")
