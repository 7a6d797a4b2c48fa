r"""Error feedback (EF): a client remembers what its lossy codec failed to send and sends it later.

With a lossy codec :math:`C`, client k sends :math:`C(\Delta_k + e_k)` and keeps the residual

.. math::  e_k \leftarrow (\Delta_k + e_k) - C(\Delta_k + e_k),

so no part of an update is lost forever, only delayed (Seide et al. 2014; Karimireddy et al. 2019).
A client that is not sampled keeps its residual until it next participates, so under partial
participation the residual it adds can be several rounds stale.
"""

from __future__ import annotations

from typing import Mapping

import torch

__all__ = ["ErrorFeedback"]


class ErrorFeedback:
    """Per-client residual memory, kept on the client side (the server never sees it)."""

    def __init__(self) -> None:
        self.residuals: dict[int, dict[str, torch.Tensor]] = {}

    def compensate(self, client_id: int, update: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Return :math:`\\Delta_k + e_k` (just :math:`\\Delta_k` the first time)."""
        res = self.residuals.get(client_id)
        if res is None:
            return dict(update)
        return {name: t + res[name] for name, t in update.items()}

    def remember(self, client_id: int, intended: Mapping[str, torch.Tensor],
                 sent: Mapping[str, torch.Tensor]) -> None:
        """Store :math:`e_k = \\text{intended} - \\text{sent}` for the client's next round."""
        self.residuals[client_id] = {name: intended[name] - sent[name] for name in intended}

    def residual_norm(self, client_id: int) -> float:
        """L2 norm of a client's residual (0 if it has none yet)."""
        res = self.residuals.get(client_id)
        if res is None:
            return 0.0
        return float(torch.sqrt(sum((t.float() ** 2).sum() for t in res.values())))
