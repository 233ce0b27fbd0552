"""Float comparisons with tolerances scaled to the values compared.

The same fp32 computation rounds differently through torch's AVX-512, AVX2 and default kernels. Rounding errors of a
sum scale with the magnitude of its largest terms, not with each output element: an element that cancels to ~0 out of
terms of ~100 carries an error of ~100 * eps. So the absolute tolerance here is `rtol` times the largest magnitude of
the expected tensor, plus `rtol` of each element; never a fixed `atol` that means nothing at another scale.
"""
from __future__ import annotations

import torch


def scaled_atol(expected: torch.Tensor | float, rtol: float) -> float:
    """`rtol` times the magnitude of `expected` (its largest absolute element); 0 for an all-zero tensor."""
    expected = torch.as_tensor(expected).detach()
    return rtol * float(expected.abs().max()) if expected.numel() else 0.0


def close(actual, expected, rtol: float = 1e-5) -> bool:
    """True where `actual` equals `expected` up to `rtol` of the elements' and of the tensor's magnitude."""
    actual, expected = torch.as_tensor(actual).detach(), torch.as_tensor(expected).detach()
    return actual.shape == expected.shape and torch.allclose(actual, expected, rtol=rtol,
                                                             atol=scaled_atol(expected, rtol))


def assert_close(actual, expected, rtol: float = 1e-5, name: str = "", scale_rtol: float | None = None) -> None:
    """`torch.testing.assert_close` with the scaled tolerance of `close`; `name` goes into the message.
    `scale_rtol` (default `rtol`): the fraction of the tensor's magnitude allowed on every element, for values
    whose noise follows the tensor's scale rather than each element's (Adam updates, sums that cancel)."""
    actual, expected = torch.as_tensor(actual).detach(), torch.as_tensor(expected).detach()
    atol = scaled_atol(expected, rtol if scale_rtol is None else scale_rtol)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol,
                               msg=(lambda m: f"{name}: {m}") if name else None)
