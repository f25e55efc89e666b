"""Regression losses applied to balance residuals (torchgfn's ``gfn.gflownet.losses``).

A GFlowNet objective drives residuals ``r`` (TB / DB / SubTB / FM scores) to 0;
its ``loss_fn`` maps residuals to per-item losses, elementwise, same shape.

* ``SquaredLoss``: ``r²``, the default of TB, LPV, DB, SubTB and FM.
* ``HalfSquaredLoss``: ``½ r²`` (gradient ``r``), the default of the relative
  losses (RTB, Relative LPV, Trust-PCL) as in torchgfn 2.4.1 and the RTB paper
  (Venkatraman et al. 2024, arXiv:2405.20971).
"""

from __future__ import annotations

import torch


class RegressionLoss:
    """Elementwise map ``g(r)`` of residuals to losses (``g(0) = 0``, ``g >= 0``)."""

    #: ``g(r)`` is finite iff ``r`` is (lets a loss check finiteness once, on the reduced value).
    finite_iff_input_finite: bool = False

    def __call__(self, residuals: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class SquaredLoss(RegressionLoss):
    """``g(r) = r²``."""

    finite_iff_input_finite = True

    def __call__(self, residuals: torch.Tensor) -> torch.Tensor:
        return residuals.pow(2)


class HalfSquaredLoss(RegressionLoss):
    """``g(r) = ½ r²``: its gradient is the residual itself."""

    finite_iff_input_finite = True

    def __call__(self, residuals: torch.Tensor) -> torch.Tensor:
        return 0.5 * residuals.pow(2)
