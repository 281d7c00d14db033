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

FLAG = "`{}` must be True or False, got {}"
POSITIVE = r"must be a finite number in \(0, inf\)"
SEED = r"must be an integer in \[0, 4294967295\]"
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
        r"`very_successful_ratio` must be at least `accept_ratio` \(0.5\)",
    ),
    "cubic-accept-above-default": (
        CubicNewton,
        {"accept_ratio": 0.95},
        "raise it together with `accept_ratio`",
    ),
    "cubic-subproblem": (CubicNewton, {"subproblem": "exact"}, "`subproblem`"),
    "gn-negative-damping": (GaussNewton, {"damping": -1e-3}, "`damping`"),
    "grouped-negative-regularization": (
        GroupedNewton,
        {"regularization": -1.0},
        "`regularization`",
    ),
    "grouped-grouping": (GroupedNewton, {"grouping": "layer"}, "`grouping`"),
    "sam-adaptive-str": (SAM, {"adaptive": "abc"}, FLAG.format("adaptive", "'abc'")),
    "sam-adaptive-none": (SAM, {"adaptive": None}, FLAG.format("adaptive", "None")),
    "sam-adaptive-list": (SAM, {"adaptive": [1]}, FLAG.format("adaptive", r"\[1\]")),
    "sam-adaptive-int": (SAM, {"adaptive": 1}, FLAG.format("adaptive", "1")),
    "sam-zero-lr": (SAM, {"lr": 0}, rf"`lr` {POSITIVE}, got 0\."),
    "sam-negative-lr": (SAM, {"lr": -0.1}, rf"`lr` {POSITIVE}, got -0.1"),
    "sam-nan-lr": (SAM, {"lr": float("nan")}, rf"`lr` {POSITIVE}, got nan"),
    "gsam-adaptive-str": (GSAM, {"adaptive": "abc"}, FLAG.format("adaptive", "'abc'")),
    "gsam-zero-lr": (GSAM, {"lr": 0.0}, rf"`lr` {POSITIVE}, got 0.0"),
    "grouped-adaptive-str": (
        GroupedNewton,
        {"adaptive": "abc"},
        FLAG.format("adaptive", "'abc'"),
    ),
    "grouped-adaptive-none": (
        GroupedNewton,
        {"adaptive": None},
        FLAG.format("adaptive", "None"),
    ),
    "hf-adapt-damping-str": (
        HessianFree,
        {"adapt_damping": "abc"},
        FLAG.format("adapt_damping", "'abc'"),
    ),
    "hf-adapt-damping-list": (
        HessianFree,
        {"adapt_damping": [1]},
        FLAG.format("adapt_damping", r"\[1\]"),
    ),
    "newton-negative-seed": (NewtonCG, {"seed": -1}, f"`seed` {SEED}, got -1"),
    "newton-nan-seed": (NewtonCG, {"seed": float("nan")}, f"`seed` {SEED}, got nan"),
    "cubic-negative-seed": (CubicNewton, {"seed": -1}, f"`seed` {SEED}, got -1"),
    "cubic-str-seed": (CubicNewton, {"seed": "abc"}, f"`seed` {SEED}, got 'abc'"),
    "cubic-none-seed": (CubicNewton, {"seed": None}, f"`seed` {SEED}, got None"),
    "cubic-huge-seed": (CubicNewton, {"seed": 2**64}, f"`seed` {SEED}, got 1844"),
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


def test_sam_groups_are_checked_too():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=FLAG.format("adaptive", "'yes'")):
        SAM([{"params": [a]}, {"params": [b], "adaptive": "yes"}], lr=0.1)


LR_ELSEWHERE = {
    "base-kwargs": ({"base_kwargs": {"lr": 0.2}}, 0.2),
    "base-kwargs-zero": ({"base_kwargs": {"lr": 0.0}}, 0.0),
    "callable": ({"base_optimizer": lambda p: torch.optim.SGD(p, lr=0.2)}, 0.2),
    "callable-zero": ({"base_optimizer": lambda p: torch.optim.SGD(p, lr=0.0)}, 0.0),
}


@pytest.mark.parametrize(("options", "lr"), LR_ELSEWHERE.values(), ids=LR_ELSEWHERE)
@pytest.mark.parametrize("optimizer_class", [SAM, GSAM], ids=["sam", "gsam"])
def test_a_learning_rate_of_the_base_optimizer_is_left_to_it(
    optimizer_class, options, lr
):
    params = [torch.nn.Parameter(torch.zeros(2))]
    optimizer = optimizer_class(params, **options)
    assert optimizer.param_groups[0]["lr"] == lr
    assert optimizer.base_optimizer.param_groups[0]["lr"] == lr


STATS_LOGGER = {
    "every_n_steps-zero": ({"every_n_steps": 0}, "`every_n_steps`"),
    "prefix-none": ({"prefix": None}, "`prefix` must be a string, got None"),
    "prefix-int": ({"prefix": -1}, "`prefix` must be a string, got -1"),
    "counters-str": ({"counters": "abc"}, FLAG.format("counters", "'abc'")),
    "counters-none": ({"counters": None}, FLAG.format("counters", "None")),
}


@pytest.mark.parametrize(
    ("options", "message"), STATS_LOGGER.values(), ids=STATS_LOGGER
)
def test_stats_logger_arguments(options, message):
    with pytest.raises(ValueError, match=message):
        OptimizerStatsLogger(**options)
