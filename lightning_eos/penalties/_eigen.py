"""The top eigenpair of the Hessian, warm-started from one evaluation to the next."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_eos._validation import check_int, check_number, check_seed
from lightning_eos.curvature.lanczos import (
    Eigenpairs,
    SymmetricOperator,
    lanczos,
    warm_start,
)


class WarmTopEigenpair:
    """Top eigenpair by Lanczos, started from the previous eigenvectors.

    Between two optimizer steps the parameters move little, so the previous top
    eigenvector (and the ``extra_vectors`` Ritz vectors ranked after it) is nearly
    an invariant subspace of the new Hessian: the solve usually stops after one
    block of products. The extra vectors let an eigenvalue that overtakes the top
    one be found, which a single start vector would miss.
    """

    def __init__(
        self, tol: float, max_iter: int, extra_vectors: int, seed: int
    ) -> None:
        self.tol = check_number("tol", tol, low=0.0, high=1.0, low_open=True)
        self.max_iter = check_int("max_iter", max_iter)
        self.extra_vectors = check_int("extra_vectors", extra_vectors, low=0)
        self.seed = check_seed("seed", seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.vectors: Tensor | None = None

    def solve(self, operator: SymmetricOperator) -> Eigenpairs:
        """The top eigenpair; keeps the eigenvectors for the next call if finite."""
        init = warm_start(self.vectors, operator.dim)
        if init is not None:
            init = init.to(dtype=operator.dtype, device=operator.device)
        result = lanczos(
            operator,
            1,
            tol=self.tol,
            max_iter=self.max_iter,
            init=init,
            block_size=1 + self.extra_vectors,
            generator=self.generator,
            extra=self.extra_vectors,
        )
        if result.finite:
            self.vectors = torch.cat([result.eigenvectors, result.extra_vectors])
        return result

    def state_dict(self) -> dict[str, Any]:
        """Generator and eigenvectors, on the CPU."""
        return {
            "generator": self.generator.get_state(),
            "vectors": None if self.vectors is None else self.vectors.cpu(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.generator.set_state(state_dict["generator"])
        self.vectors = state_dict["vectors"]
