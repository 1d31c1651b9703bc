"""Input validation at the boundary of public functions: clear ValueErrors, never silent NaNs
(`InputError` for a choice that is not known, `NonFiniteError` for NaN or inf)."""

from __future__ import annotations

import torch
from torch import Tensor

from entroprl.errors import InputError, NonFiniteError


def check_same_shape(**tensors: Tensor) -> None:
    """Raise if the named tensors do not all have the same shape."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items() if t is not None}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name}{list(shape)}" for name, shape in shapes.items())
        raise ValueError(f"shape mismatch: {listed} must all have the same shape")


def check_mask(mask: Tensor, what: str = "response_mask") -> Tensor:
    """Validate a 0/1 (bool or numeric) (B, T) mask and return it as bool."""
    if mask.dim() != 2:
        raise ValueError(f"{what} must be 2-D (batch, length), got shape {list(mask.shape)}")
    if mask.dtype == torch.bool:
        return mask
    if bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError(f"{what} must hold only 0 and 1")
    return mask != 0


def check_finite(name: str, tensor: Tensor, mask: Tensor | None = None) -> None:
    """Raise NonFiniteError if `tensor` holds NaN or inf (only where `mask` is set, when given)."""
    bad = ~torch.isfinite(tensor)
    if mask is not None:
        bad = bad & mask.bool()
    if bool(bad.any()):
        where = bad.nonzero()[0].tolist()
        raise NonFiniteError(f"{name} contains NaN or inf (first at index {where})")


def check_nonempty(mask: Tensor, what: str = "response_mask") -> int:
    """Return the number of selected entries; raise if there are none."""
    n = int(mask.sum().item())
    if n == 0:
        raise ValueError(f"{what} selects no token: nothing to compute over")
    return n


def check_choice(name: str, value: str, choices) -> None:
    """Raise if `value` is not one of `choices`, listing them."""
    if value not in choices:
        raise InputError(f"unknown {name} {value!r}; expected one of {sorted(choices)}")
