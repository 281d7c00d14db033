"""Bad hyperparameters are refused at construction, with the argument named."""

import pytest
import torch

from lightning_eos.callbacks import OptimizerStatsLogger
from lightning_eos.optim import (
    GSAM,
    SAM,
    CubicNewton,
    GaussNewton,
    GroupedNewton,
    HessianFree,
    NewtonCG,
)

BAD = {
    "sam-negative-rho": (SAM, {"rho": -0.1}, "`rho`"),
    "sam-nan-rho": (SAM, {"rho": float("nan")}, "`rho`"),
    "sam-negative-eta": (SAM, {"eta": -1.0}, "`eta`"),
    "sam-perturb": (SAM, {"perturb": "biases"}, "`perturb`"),
    "sam-not-an-optimizer": (
        SAM,
        {"base_optimizer": torch.nn.Linear},
        "`base_optimizer`",
    ),
    "sam-not-a-class": (SAM, {"base_optimizer": 3}, "`base_optimizer`"),
    "sam-closure-base": (
        SAM,
        {"base_optimizer": torch.optim.LBFGS},
        "`base_optimizer`",
    ),
    "sam-lr-twice": (SAM, {"lr": 0.1, "base_kwargs": {"lr": 0.2}}, "twice"),
    "sam-lr-with-callable": (
        SAM,
        {"base_optimizer": lambda p: torch.optim.SGD(p, lr=0.1), "lr": 0.1},
        "inside it",
    ),
    "sam-unknown-path": (
        SAM,
        {"base_optimizer": "torch.optim.Nope"},
        "`base_optimizer`",
    ),
    "gsam-negative-alpha": (GSAM, {"alpha": -0.5}, "`alpha`"),
    "newton-negative-damping": (NewtonCG, {"damping": -1.0}, "`damping`"),
    "newton-zero-lr": (NewtonCG, {"lr": 0.0}, "`lr`"),
    "newton-cg-tol": (NewtonCG, {"cg_tol": 1.5}, "`cg_tol`"),
    "newton-max-cg-iter": (NewtonCG, {"max_cg_iter": 0}, "`max_cg_iter`"),
    "newton-products": (NewtonCG, {"hessian_products": "approx"}, "`hessian_products`"),
    "newton-seed": (NewtonCG, {"seed": 1.5}, "`seed`"),
    "hf-negative-damping": (HessianFree, {"damping": -0.1}, "`damping`"),
    "hf-curvature": (HessianFree, {"curvature": "fisher"}, "`curvature`"),
    "hf-gn-fd": (
        HessianFree,
        {"curvature": "gauss_newton", "hessian_products": "finite_difference"},
        "`hessian_products`",
    ),
    "hf-cg-decay": (HessianFree, {"cg_decay": 2.0}, "`cg_decay`"),
    "cubic-zero-sigma": (CubicNewton, {"sigma": 0.0}, "`sigma`"),
    "cubic-negative-sigma": (CubicNewton, {"sigma": -1.0}, "`sigma`"),
    "cubic-increase": (CubicNewton, {"sigma_increase": 1.0}, "`sigma_increase`"),
    "cubic-ratios": (
        CubicNewton,
        {"accept_ratio": 0.5, "very_successful_ratio": 0.2},
        "`very_successful_ratio`",
    ),
    "cubic-subproblem": (CubicNewton, {"subproblem": "exact"}, "`subproblem`"),
    "gn-negative-damping": (GaussNewton, {"damping": -1e-3}, "`damping`"),
    "grouped-negative-regularization": (
        GroupedNewton,
        {"regularization": -1.0},
        "`regularization`",
    ),
    "grouped-grouping": (GroupedNewton, {"grouping": "layer"}, "`grouping`"),
}


@pytest.mark.parametrize(
    ("optimizer_class", "options", "message"), BAD.values(), ids=BAD
)
def test_bad_hyperparameter_is_refused_and_named(optimizer_class, options, message):
    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match=message):
        optimizer_class(params, **options)


def test_second_order_groups_must_share_settings():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="share every setting"):
        NewtonCG([{"params": [a]}, {"params": [b], "damping": 1.0}])


def test_parameters_of_mixed_types_are_refused():
    a, b = (
        torch.nn.Parameter(torch.zeros(2)),
        torch.nn.Parameter(torch.zeros(2).double()),
    )
    with pytest.raises(ValueError, match="one type"):
        CubicNewton([a, b])


def test_stats_logger_arguments():
    with pytest.raises(ValueError, match="`every_n_steps`"):
        OptimizerStatsLogger(every_n_steps=0)
