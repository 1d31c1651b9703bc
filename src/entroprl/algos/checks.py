"""Input validation at the boundary of public functions: clear ValueErrors, never silent NaNs
(`InputError` for a choice that is not known, `NonFiniteError` for NaN or inf).

A check of values (a 0/1 mask, finite numbers, token ids in range) reads a result back from the
tensors' device: on a GPU each is a synchronisation that stalls the queue of kernels. Within
`deferred()` those checks record their result on the device instead, and `Deferred.raise_first()`
reads them all at once and raises the first failure's error: a trainer checks each mini-batch's
micro-batches so, with one synchronisation for all their checks (`entroprl.train.update`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch
from torch import Tensor

from entroprl.errors import InputError, NonFiniteError


class Deferred:
    """Value checks recorded on the device, read back together by `raise_first`."""

    def __init__(self) -> None:
        self.failed: list[Tensor] = []
        self.errors: list[Exception] = []

    def add(self, failed: Tensor, error: Exception) -> None:
        """Record a check whose 0-d bool `failed` raises `error` when True."""
        self.failed.append(failed.reshape(()))
        self.errors.append(error)

    def raise_first(self) -> None:
        """Read every recorded check in one transfer; raise the first failed one's error."""
        if not self.failed:
            return
        failed = torch.stack([f.to(self.failed[0].device) for f in self.failed]).tolist()
        self.failed, errors, self.errors = [], self.errors, []
        for bad, error in zip(failed, errors, strict=True):
            if bad:
                raise error


_DEFERRED: ContextVar[Deferred | None] = ContextVar("deferred_checks", default=None)


@contextlib.contextmanager
def deferred() -> Iterator[Deferred]:
    """Within: the value checks of this module (and those that use `fail_if`) are recorded
    instead of read at once; the caller calls `raise_first()` before it uses the results."""
    checks = Deferred()
    token = _DEFERRED.set(checks)
    try:
        yield checks
    finally:
        _DEFERRED.reset(token)


def deferring() -> bool:
    """Whether value checks are deferred here (`deferred`)."""
    return _DEFERRED.get() is not None


def fail_if(failed: Tensor, error: Exception) -> None:
    """Raise `error` if the 0-d bool `failed` is True: at once, or when the `deferred()` checks
    in force are read."""
    checks = _DEFERRED.get()
    if checks is not None:
        checks.add(failed, error)
    elif bool(failed):
        raise error


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
    fail_if(((mask != 0) & (mask != 1)).any(), ValueError(f"{what} must hold only 0 and 1"))
    return mask != 0


def check_finite(name: str, tensor: Tensor, mask: Tensor | None = None) -> None:
    """Raise NonFiniteError if `tensor` holds NaN or inf (only where `mask` is set, when given)."""
    bad = ~torch.isfinite(tensor)
    if mask is not None:
        bad = bad & mask.bool()
    if deferring():
        fail_if(bad.any(), NonFiniteError(f"{name} contains NaN or inf"))
    elif bool(bad.any()):
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
