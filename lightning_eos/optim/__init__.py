"""Curvature-aware optimizers for Lightning's automatic optimization.

Every optimizer here is a ``torch.optim.Optimizer`` that takes ``params`` first and
typed keyword arguments, so LightningCLI builds it from the ``optimizer:``
section of a configuration. They call the training closure several times per
step (see :class:`~lightning_eos.optim._closure.ClosureCalls` for what is done
about the side effects). The second-order ones compute exact Hessian-vector
products from the gradient's graph, which a module provides with one line::

    from lightning_eos.optim import backward_with_graph

    class MyModule(LightningModule):
        backward = backward_with_graph
"""

from lightning_eos.optim._base import ClosureOptimizer
from lightning_eos.optim._closure import backward_with_graph, closure_backward
from lightning_eos.optim.cubic import CubicNewton
from lightning_eos.optim.gauss_newton import GaussNewton
from lightning_eos.optim.grouped_newton import GroupedNewton
from lightning_eos.optim.gsam import GSAM
from lightning_eos.optim.hessian_free import HessianFree
from lightning_eos.optim.newton_cg import NewtonCG
from lightning_eos.optim.sam import SAM

__all__ = [
    "GSAM",
    "SAM",
    "ClosureOptimizer",
    "CubicNewton",
    "GaussNewton",
    "GroupedNewton",
    "HessianFree",
    "NewtonCG",
    "backward_with_graph",
    "closure_backward",
]
