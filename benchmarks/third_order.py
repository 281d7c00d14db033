"""Cost of third-order products and of the third-order callback, in gradients.

Measures, on the digits MLP of the main job (64-200-200-10 tanh, half squared error,
the 1,797 training images in one chunk, float32), the time of each route to the
third-order vector T[u, u] = ∇(uᵀH(θ)u) relative to one gradient evaluation, and
the time the ThirdOrderMonitor adds to a measurement when it shares the
eigenpairs of a SharpnessMonitor, relative to one T[u, u]. Every ratio is the
median over interleaved repetitions (gradient, then the route, again and again), so
that the load of a shared machine affects both alike.

    python benchmarks/third_order.py [--repeats 15] [--threads N]

Targets: T[u, u] at most 4 gradients; the callback at most 2 third-order vectors
per eigenvector measured.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import lightning.pytorch as pl
import torch
from torch.func import grad, jvp

from lightning_eos.callbacks import SharpnessMonitor, ThirdOrderMonitor
from lightning_eos.curvature import (
    HessianOperator,
    ProbeObjective,
    block_derivatives,
    sharpness_gradient,
)
from lightning_eos.data import DigitsDataModule
from lightning_eos.models import MLP


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def ratios(reference, routes: dict, repeats: int) -> dict[str, float]:
    """Median of time(route) / time(reference), interleaved."""
    for function in [reference, *routes.values()]:
        function()  # warm up
    samples: dict[str, list[float]] = {name: [] for name in routes}
    for _ in range(repeats):
        for name, function in routes.items():
            base = timed(reference)
            samples[name].append(timed(function) / base)
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    data = DigitsDataModule(batch_size=None)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    model = MLP(hidden_dims=[200, 200], activation="tanh", loss="mse")
    objective = ProbeObjective(
        model, [batch], batch_loss=lambda module, b: module.curvature_loss(b)
    )
    theta = objective.point()
    u = torch.randn(objective.dim)
    u /= u.norm()

    def gradient():
        leaves = [t.detach().requires_grad_() for t in objective.split(theta)]
        return torch.autograd.grad(next(objective.chunk_losses(leaves)), leaves)

    def loss(flat):
        return next(objective.chunk_losses(flat))

    kept = HessianOperator(objective)
    kept.matvec(u)  # builds and keeps the graph of the first backward pass

    def forward_forward_reverse():
        return jvp(lambda t: jvp(grad(loss), (t,), (u,))[1], (theta,), (u,))[1]

    def reverse_forward_forward():
        leaf = theta.detach().requires_grad_()
        second = jvp(lambda t: jvp(loss, (t,), (u,))[1], (leaf,), (u,))[1]
        return torch.autograd.grad(second, leaf)[0]

    def reverse_forward_reverse():
        leaf = theta.detach().requires_grad_()
        hv = jvp(grad(loss), (leaf,), (u,))[1]
        return torch.autograd.grad(hv @ u, leaf)[0]

    routes = {
        "Hessian-vector product, kept graph": lambda: kept.matvec(u),
        "T[u,u] reverse x3, kept graph (used)": lambda: kept.third_order(u, u),
        "T[u,u] reverse x3, fresh graph": lambda: HessianOperator(
            objective
        ).third_order(u, u),
        "T[u,u] forward-over-forward-over-reverse": forward_forward_reverse,
        "T[u,u] reverse-over-forward-over-reverse": reverse_forward_reverse,
        "T[u,u] reverse-over-forward-over-forward": reverse_forward_forward,
    }
    print(f"digits MLP, {objective.dim} parameters, {torch.get_num_threads()} threads")
    print("time / one gradient evaluation (median):")
    for name, value in ratios(gradient, routes, args.repeats).items():
        print(f"  {name:<48} {value:6.2f}")

    # Several pairs: T[u_a, u_b], a ≤ b, for three vectors; grouped by u_b.
    basis = torch.linalg.qr(torch.randn(objective.dim, 3))[0].T.contiguous()
    pairs = [(a, b) for b in range(3) for a in range(b + 1)]
    left = torch.stack([basis[a] for a, _ in pairs])
    right = torch.stack([basis[b] for _, b in pairs])
    pair_routes = {
        "6 pairs, grouped by shared vector": lambda: kept.third_order(left, right),
        "6 pairs, one at a time": lambda: [
            kept.third_order(a, b) for a, b in zip(left, right, strict=True)
        ],
    }
    single = lambda: kept.third_order(u, u)  # noqa: E731
    print("time / one T[u,u] (median):")
    for name, value in ratios(single, pair_routes, max(3, args.repeats // 3)).items():
        print(f"  {name:<48} {value:6.2f}")

    # Block derivatives along the gradient, one group per parameter tensor.
    direction = -kept.gradient()
    blocks = {
        "block derivatives, 6 groups, diagonal third": lambda: block_derivatives(
            objective, direction
        ),
        "block derivatives, 6 groups, no third": lambda: block_derivatives(
            objective, direction, third_order="none"
        ),
        "sharpness gradient and projections (k=1)": lambda: sharpness_gradient(
            HessianOperator(objective), u
        ),
    }
    print("time / one T[u,u] (median):")
    for name, value in ratios(single, blocks, max(3, args.repeats // 3)).items():
        print(f"  {name:<48} {value:6.2f}")

    callback_cost(data, single, args.repeats)


class _Trained(MLP):
    """The main job's model and optimizer (full-batch gradient descent, η = 0.2)."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2)


def callback_cost(data: DigitsDataModule, single, repeats: int) -> None:
    """The ThirdOrderMonitor's time per measurement, eigenpairs shared, in T[u,u]."""
    for k in (1, 2):
        torch.manual_seed(0)
        sharpness = SharpnessMonitor(
            k=2, every_n_steps=1, probe_size=1797, chunk_size=1797, tol=1e-2
        )
        third = ThirdOrderMonitor(
            k=k,
            tensor=k > 1,
            every_n_steps=1,
            probe_size=1797,
            chunk_size=1797,
            block_direction="none",
        )
        third.measure = _timed_measure(third.measure, sharpness, single, spent := [])
        trainer = pl.Trainer(
            max_steps=repeats,
            callbacks=[sharpness, third],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            devices=1,
        )
        model = _Trained(hidden_dims=[200, 200], activation="tanh", loss="mse")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(model, data.train_dataloader())
        per_vector = statistics.median(spent[1:]) / k
        print(
            f"ThirdOrderMonitor(k={k}{', tensor' if k > 1 else ''}), eigenpairs "
            f"shared: {per_vector:.2f} T[u,u] per eigenvector measured"
        )


def _timed_measure(original, sharpness, single, spent):
    def measure(trainer, module):
        sharpness.eigenpairs(trainer, module)  # the shared solve, not counted
        spent.append(timed(lambda: original(trainer, module)) / timed(single))
        return {}

    return measure


if __name__ == "__main__":
    main()
