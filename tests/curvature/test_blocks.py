import warnings

import pytest
import torch
from torch.func import functional_call

from lightning_eos.curvature.blocks import reduced_derivatives
from tests.curvature.cases import make_case

GENERATOR = torch.Generator().manual_seed(7)
C = torch.randn(5, generator=GENERATOR, dtype=torch.float64)
Q = torch.randn(5, 5, generator=GENERATOR, dtype=torch.float64)
Q = Q + Q.T
SPLIT = [2, 3]


def polynomial(a, b):
    x = torch.cat([a, b])
    return (C * x**3).sum() + 0.5 * x @ Q @ x


def random_blocks(shapes, seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes]


def block_directions(blocks):
    """One direction per tensor, zero on the others (the grouped layout)."""
    return [
        [b if j == i else None for j in range(len(blocks))]
        for i, b in enumerate(blocks)
    ]


def test_polynomial_matches_its_analytic_derivatives():
    a = torch.tensor([0.4, -1.2], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.7, 0.1, -0.5], dtype=torch.float64, requires_grad=True)
    blocks = random_blocks([(2,), (3,)], seed=1)
    result = reduced_derivatives(
        [a, b], block_directions(blocks), loss=polynomial(a, b)
    )

    x = torch.cat([a, b]).detach()
    d = [
        torch.cat([blocks[0], torch.zeros(3, dtype=torch.float64)]),
        torch.cat([torch.zeros(2, dtype=torch.float64), blocks[1]]),
    ]
    gradient = 3 * C * x**2 + Q @ x
    hessian = Q + torch.diag(6 * C * x)
    expected_h = torch.tensor(
        [[float(di @ hessian @ dj) for dj in d] for di in d], dtype=torch.float64
    )
    torch.testing.assert_close(
        result.gradient,
        torch.stack([gradient @ di for di in d]),
        rtol=1e-13,
        atol=1e-13,
    )
    torch.testing.assert_close(result.hessian, expected_h, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(
        result.third_order,
        torch.stack([(6 * C * di**3).sum() for di in d]),
        rtol=1e-13,
        atol=1e-13,
    )
    assert (result.num_hvps, result.num_third_order) == (2, 2)


def dense_reduced(loss_of_flat, theta, directions):
    """Derivatives of φ(t) = L(θ + D t) by nested dense autograd, at t = 0."""
    D = torch.stack(directions, dim=1)

    def phi(t):
        return loss_of_flat(theta + D @ t)

    t0 = torch.zeros(D.shape[1], dtype=torch.float64)
    gradient = torch.autograd.functional.jacobian(phi, t0)
    hessian = torch.autograd.functional.hessian(phi, t0)
    third = torch.autograd.functional.jacobian(
        lambda t: torch.autograd.functional.hessian(phi, t, create_graph=True), t0
    )
    return gradient, hessian, torch.diagonal(torch.diagonal(third, dim1=0, dim2=1))


@pytest.mark.parametrize("layout", ["one-per-tensor", "overlapping"])
def test_network_matches_dense_derivatives_of_the_restricted_loss(layout):
    case = make_case("mlp")
    names = [n for n, _ in case.model.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in case.model.parameters()]

    def loss_of(tensors):
        state = dict(zip(names, tensors, strict=True))
        return case.loss_fn(
            functional_call(case.model, state, (case.inputs,)), case.targets
        )

    def loss_of_flat(flat):
        pieces = torch.split(flat, [p.numel() for p in params])
        return loss_of([q.view_as(p) for q, p in zip(pieces, params, strict=True)])

    blocks = random_blocks([p.shape for p in params], seed=2)
    if layout == "one-per-tensor":
        directions = block_directions(blocks)
    else:  # two dense directions over every tensor
        directions = [blocks, random_blocks([p.shape for p in params], seed=3)]
    flat = [
        torch.cat(
            [
                (b if b is not None else torch.zeros_like(p)).reshape(-1)
                for b, p in zip(d, params, strict=True)
            ]
        )
        for d in directions
    ]
    theta = torch.cat([p.detach().reshape(-1) for p in params])

    result = reduced_derivatives(params, directions, loss=loss_of(params))
    gradient, hessian, third = dense_reduced(loss_of_flat, theta, flat)
    torch.testing.assert_close(result.gradient, gradient, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(result.hessian, hessian, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(result.third_order, third, rtol=1e-9, atol=1e-11)


def test_gradient_from_backward_equals_gradient_from_loss():
    a = torch.tensor([0.4, -1.2], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.7, 0.1, -0.5], dtype=torch.float64, requires_grad=True)
    directions = block_directions(random_blocks([(2,), (3,)], seed=1))
    from_loss = reduced_derivatives([a, b], directions, loss=polynomial(a, b))
    with warnings.catch_warnings():  # PyTorch warns of the .grad reference cycle
        warnings.simplefilter("ignore")
        polynomial(a, b).backward(create_graph=True)
    from_grad = reduced_derivatives([a, b], directions, gradient=[a.grad, b.grad])
    for x, y in zip(
        (from_loss.gradient, from_loss.hessian, from_loss.third_order),
        (from_grad.gradient, from_grad.hessian, from_grad.third_order),
        strict=True,
    ):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_bad_arguments_are_refused():
    a = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="exactly one"):
        reduced_derivatives([a], [[torch.ones(2)]])
    with pytest.raises(ValueError, match=r"directions\[0\]\[0\]"):
        reduced_derivatives([a], [[torch.ones(3)]], loss=(a**2).sum())
    with pytest.raises(ValueError, match="one per parameter"):
        reduced_derivatives([a], [[torch.ones(2), None]], loss=(a**2).sum())
