import pytest
import torch

from lightning_eos.curvature.thresholds import stability_threshold

SETTINGS = {
    "gd": {"lr": 0.1},
    "heavy-ball": {"lr": 0.1, "momentum": 0.9},
    "nesterov": {"lr": 0.1, "momentum": 0.9, "nesterov": True},
    "ema": {"lr": 0.1, "momentum": 0.8, "dampening": 0.8},
    "dampening": {"lr": 0.05, "momentum": 0.5, "dampening": 0.3},
    "weight-decay": {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.5},
}
PAPER_VALUES = {  # thresholds written out from the table, not from the code
    "gd": 2 / 0.1,
    "heavy-ball": (2 + 1.8) / 0.1,
    "nesterov": (2 + 1.8) / ((1 + 1.8) * 0.1),
    "ema": (2 + 1.6) / (0.2 * 0.1),
    "dampening": 3 / (0.7 * 0.05),
    "weight-decay": (2 + 1.8) / 0.1 - 0.5,
}


def run_on_quadratic(settings, curvature, steps=1500):
    """|w| after GD-like steps on L(w) = ½ curvature · w²."""
    w = torch.ones(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.SGD([w], **settings)
    for _ in range(steps):
        optimizer.zero_grad()
        (0.5 * curvature * w**2).sum().backward()
        optimizer.step()
    return w.detach().abs().item()


@pytest.mark.parametrize("name", SETTINGS)
def test_threshold_matches_the_table(name):
    w = torch.zeros(1, requires_grad=True)
    threshold = stability_threshold(torch.optim.SGD([w], **SETTINGS[name]))
    assert threshold.value == pytest.approx(PAPER_VALUES[name], rel=1e-12)


@pytest.mark.parametrize("name", SETTINGS)
def test_iteration_diverges_exactly_above_the_threshold(name):
    w = torch.zeros(1, requires_grad=True)
    value = stability_threshold(torch.optim.SGD([w], **SETTINGS[name])).value
    below = run_on_quadratic(SETTINGS[name], value * (1 - 1e-2))
    above = run_on_quadratic(SETTINGS[name], value * (1 + 1e-2))
    assert below < 1e-3
    assert above > 1e3


@pytest.mark.parametrize(
    ("optimizer", "reason"),
    [
        (lambda p: torch.optim.Adam(p), "preconditioned Hessian"),
        (lambda p: torch.optim.LBFGS(p), "no stability threshold is known for LBFGS"),
        (lambda p: torch.optim.SGD(p, lr=0.1, maximize=True), "ascends the loss"),
        (lambda p: torch.optim.SGD(p, lr=0.0), "the learning rate is 0.0"),
        (
            lambda p: torch.optim.SGD(
                [{"params": p[:1], "lr": 0.1}, {"params": p[1:], "lr": 0.2}]
            ),
            "parameter groups of SGD differ",
        ),
    ],
    ids=["adam", "lbfgs", "maximize", "zero-lr", "groups"],
)
def test_no_threshold_comes_with_a_reason(optimizer, reason):
    params = [torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)]
    threshold = stability_threshold(optimizer(params))
    assert threshold.value is None
    assert reason in threshold.reason


def test_optimizer_can_declare_its_threshold():
    class Declared(torch.optim.SGD):
        def stability_threshold(self):
            return 7.5

    w = torch.zeros(1, requires_grad=True)
    assert stability_threshold(Declared([w], lr=0.1)).value == 7.5
