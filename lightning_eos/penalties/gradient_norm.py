"""Implicit gradient regularization as an explicit penalty, full-batch and minibatch."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_eos._validation import check_bool, check_int, check_seed
from lightning_eos.curvature._batches import (
    batch_size,
    concat_batches,
    map_tensors,
    slice_batch,
)
from lightning_eos.curvature.hessian import HessianOperator
from lightning_eos.curvature.objective import ProbeObjective
from lightning_eos.penalties._base import (
    Coefficient,
    Penalty,
    PenaltyResult,
    check_coefficient,
    resolve_coefficient,
)
from lightning_eos.penalties._terms import GradientNormTerm


class GradientNormPenalty(Penalty):
    r"""Implicit gradient regularization: :math:`P = \frac{c}{4}\|\nabla L(\theta)\|^2`.

    Gradient descent with step :math:`\eta` follows, to second order in
    :math:`\eta`, the gradient flow of the modified loss
    :math:`L + \frac{\eta}{4}\|\nabla L\|^2` rather than that of :math:`L`
    (Barrett and Dherin 2021): one step matches that flow over a time
    :math:`\eta` up to :math:`O(\eta^3)`, while it matches the flow of :math:`L`
    only up to :math:`O(\eta^2)`. This penalty makes the term explicit. Its
    gradient is

    .. math::
        \nabla P = \frac{c}{2} H \nabla L, \qquad H = \nabla^2 L(\theta),

    one exact Hessian-vector product with the gradient (Pearlmutter's trick),
    computed by differentiating the first backward pass a second time.

    The coefficient. ``coefficient="lr"`` sets :math:`c` to the learning rate of the
    step the penalty is added to, doubling gradient descent's own implicit term. To
    make gradient descent with a small step :math:`h` follow the modified flow of a
    larger step :math:`\eta`, take ``coefficient = η − h``: the explicit and the
    implicit terms then add up to :math:`\frac{\eta}{4}\|\nabla L\|^2`.

    The loss :math:`L` is the objective the penalty is evaluated on: with
    :class:`~lightning_eos.penalties.PenaltyCallback` and ``data="batch"``, the
    loss of the examples the optimizer step is made of. With minibatches, this is
    the per-step form of the SGD regularizer of Smith et al. (2021): averaged over
    an epoch, the penalty is the mean over minibatches of
    :math:`\frac{c}{4}\|\nabla L_B\|^2`; :class:`MinibatchGradientNormPenalty`
    evaluates that mean at once.

    Cost: one gradient evaluation with graph and one Hessian-vector product on
    the objective's data (about 2.4 gradient evaluations on the digits MLP).

    Args:
        coefficient: :math:`c`, a finite number at least 0, or ``"lr"``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_eos.curvature import ProbeObjective
        >>> model = nn.Linear(1, 1, bias=False).double()
        >>> _ = model.weight.data.fill_(2.0)
        >>> batch = (torch.ones(1, 1, dtype=torch.float64),) * 2
        >>> objective = ProbeObjective(model, [batch], loss_fn=nn.MSELoss())
        >>> result = GradientNormPenalty(coefficient=0.1).evaluate(objective)
        >>> round(result.value, 6), result.gradient.tolist()  # L = (w − 1)², w = 2
        (0.1, [0.2])

    References:
        Barrett, Dherin (2021). Implicit gradient regularization. ICLR.
        Smith, Dherin, Barrett, De (2021). On the origin of implicit regularization
        in stochastic gradient descent. ICLR.
    """

    name = "gradient_norm"
    has_term = True

    def __init__(self, coefficient: Coefficient = "lr") -> None:
        self.coefficient = check_coefficient("coefficient", coefficient, True)

    @property
    def needs_step_size(self) -> bool:
        """Whether the coefficient is the learning rate."""
        return self.coefficient == "lr"

    def evaluate(
        self, objective: ProbeObjective, step_size: float | None = None
    ) -> PenaltyResult:
        r"""Return :math:`\frac{c}{4}\|\nabla L\|^2` and :math:`\frac{c}{2}H\nabla L`.

        Args:
            objective: The loss :math:`L`.
            step_size: The learning rate, used when the coefficient is "lr".
        """
        c = resolve_coefficient(self.coefficient, step_size, type(self).__name__)
        operator = HessianOperator(objective)
        gradient = operator.gradient()
        squared_norm = float(gradient.square().sum())

        active = c != 0
        product = operator.matvec(gradient) if active else torch.zeros_like(gradient)
        local = objective.all_reduce is None
        return PenaltyResult(
            value=c / 4 * squared_norm,
            gradient=c / 2 * product,
            active=active,
            metrics={"coefficient": c, "loss_gradient_norm": squared_norm**0.5},
            num_products=operator.num_products,
            term=GradientNormTerm([objective], [c / 4]) if active and local else None,
        )

    def _arguments(self) -> dict[str, Any]:
        return {"coefficient": self.coefficient}


class MinibatchGradientNormPenalty(Penalty):
    r"""The SGD regularizer, the minibatch mean of :math:`\frac{c}{4}\|\nabla L_B\|^2`.

    Smith, Dherin, Barrett and De (2021) show that stochastic gradient descent with
    step :math:`\eta` over an epoch of :math:`m` minibatches :math:`B_1 … B_m`
    follows, to second order, the gradient flow of

    .. math::
        L + \frac{\eta}{4m}\sum_{k=1}^m \|\nabla L_{B_k}(\theta)\|^2,

    where :math:`L_B` is the mean loss over the minibatch :math:`B`. This penalty
    evaluates that mean for a partition of the objective's data into minibatches of
    ``batch_size`` examples (the last one smaller when the size does not divide),
    each weighted equally:

    .. math::
        P = \frac{c}{4m}\sum_k \|\nabla L_{B_k}\|^2,
        \qquad \nabla P = \frac{c}{2m}\sum_k H_{B_k}\nabla L_{B_k},

    one gradient with graph and one Hessian-vector product per minibatch, each
    minibatch evaluated in chunks no larger than the objective's (so that the
    memory is that of one chunk, whatever ``batch_size``). It adds
    the implicit regularizer of minibatch SGD to a full-batch (or large-batch) run.
    During minibatch training itself, the per-step form is
    :class:`GradientNormPenalty` on the current batch.

    The minibatches are consecutive slices of the objective's data in its order
    (``shuffle=False``), or of a random permutation drawn every evaluation from
    this penalty's own generator (``shuffle=True``), which makes the penalty an
    unbiased estimate of its mean over random partitions. Under data parallelism
    each process partitions the examples it holds, and the mean runs over the
    minibatches of all processes: the partition, and so the value, depends on the
    number of processes.

    Args:
        batch_size: Examples per minibatch, at least 1.
        coefficient: :math:`c`, a finite number at least 0, or ``"lr"``.
        shuffle: Draw a new random partition at every evaluation.
        seed: Seed of the generator of the partitions, in ``[0, 2**32 - 1]``.

    References:
        Smith, Dherin, Barrett, De (2021). On the origin of implicit regularization
        in stochastic gradient descent. ICLR.
    """

    name = "minibatch_gradient_norm"
    has_term = True

    def __init__(
        self,
        batch_size: int,
        coefficient: Coefficient = "lr",
        shuffle: bool = False,
        seed: int = 0,
    ) -> None:
        self.batch_size = check_int("batch_size", batch_size)
        self.coefficient = check_coefficient("coefficient", coefficient, True)
        self.shuffle = check_bool("shuffle", shuffle)
        self.seed = check_seed("seed", seed)
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def needs_step_size(self) -> bool:
        """Whether the coefficient is the learning rate."""
        return self.coefficient == "lr"

    def evaluate(
        self, objective: ProbeObjective, step_size: float | None = None
    ) -> PenaltyResult:
        r"""Return the mean of :math:`\frac{c}{4}\|\nabla L_B\|^2` and its gradient."""
        c = resolve_coefficient(self.coefficient, step_size, type(self).__name__)
        active = c != 0
        squared_norms = torch.zeros((), dtype=objective.dtype, device=objective.device)
        products = torch.zeros(
            objective.dim, dtype=objective.dtype, device=squared_norms.device
        )
        count, spent = 0, 0
        minibatches = self.minibatches(objective)
        for minibatch in minibatches:
            operator = HessianOperator(
                objective.with_chunks(_in_chunks(minibatch, objective))
            )
            gradient = operator.gradient()
            squared_norms = squared_norms + gradient.square().sum()
            if active:
                products += operator.matvec(gradient)
            count += 1
            spent += operator.num_products

        # One collective for everything, whatever the number of local minibatches.
        packed = torch.cat(
            [
                squared_norms.reshape(1),
                squared_norms.new_full((1,), float(count)),
                products,
            ]
        )
        packed = objective._reduce(packed)
        total = float(packed[1])
        term = None
        if active and objective.all_reduce is None:
            term = GradientNormTerm(
                [
                    objective.with_chunks(_in_chunks(minibatch, objective))
                    for minibatch in minibatches
                ],
                [c / (4 * total)] * len(minibatches),
            )
        return PenaltyResult(
            value=c / 4 * float(packed[0]) / total,
            gradient=c / 2 * packed[2:] / total,
            active=active,
            metrics={"coefficient": c, "minibatches": total},
            num_products=spent,
            term=term,
        )

    def minibatches(self, objective: ProbeObjective) -> list[Any]:
        """The minibatches of this process's data, in the order they are used."""
        data = concat_batches(objective.chunks)
        size = batch_size(data)
        if self.shuffle:
            order = torch.randperm(size, generator=self.generator)
            data = _take(data, order)
        return [
            slice_batch(data, start, start + self.batch_size)
            for start in range(0, size, self.batch_size)
        ]

    def state_dict(self) -> dict[str, Any]:
        """The generator of the partitions."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the generator of the partitions."""
        self.generator.set_state(state_dict["generator"])

    def _arguments(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "coefficient": self.coefficient,
            "shuffle": self.shuffle,
        }


def _in_chunks(minibatch: Any, objective: ProbeObjective) -> list[Any]:
    """The minibatch in chunks no larger than the objective's, bounding memory."""
    width = max(objective.local_sizes)
    size = batch_size(minibatch)
    return [
        slice_batch(minibatch, start, start + width) for start in range(0, size, width)
    ]


def _take(batch: Any, order: Tensor) -> Any:
    """The examples of ``batch`` in the order ``order``."""
    return map_tensors(batch, lambda t: t[order.to(t.device)] if t.dim() > 0 else t)
