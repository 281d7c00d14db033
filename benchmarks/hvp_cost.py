"""Cost of one Hessian-vector product in gradient evaluations, on the digits MLP.

    python benchmarks/hvp_cost.py

Every number is a ratio of median wall times measured in this one run, on the whole
digits set (1,797 examples, 55,210 parameters). "Kept graph" is the product inside one
eigensolve when the probe set is one chunk; "chunked" splits it in 3 chunks, where
each call rebuilds each chunk's graph; "vectorized" uses
``torch.autograd.grad(is_grads_batched=True)`` for a block of vectors. The last
table is the average cost of a product within whole eigensolves as
``SharpnessMonitor`` runs them (top-1 with one guard vector: blocks of 2, tolerance
1e-2, cold start), graph building included.
"""

from functools import partial

import torch
from _common import seconds, trained_model

from lightning_eos.curvature import HessianOperator, ProbeObjective, lanczos
from lightning_eos.losses import half_squared_error


def main() -> None:
    torch.manual_seed(0)
    model, inputs, targets = trained_model("mlp", steps=300)
    params = [p for p in model.parameters()]

    def gradient() -> None:
        loss = half_squared_error(model(inputs), targets)
        torch.autograd.grad(loss, params)

    base = seconds(gradient, repeat=30)
    print(f"gradient evaluation: {1e3 * base:.2f} ms (the unit below)")
    rows = []
    for chunks in (1, 3):
        size = -(-len(inputs) // chunks)
        data = [
            (inputs[i : i + size], targets[i : i + size])
            for i in range(0, len(inputs), size)
        ]
        objective = ProbeObjective(model, data, loss_fn=half_squared_error)
        for block in (1, 2, 4):
            for vectorize in (False, True) if block > 1 else (False,):
                operator = HessianOperator(objective, vectorize=vectorize)
                vectors = torch.randn(block, operator.dim)
                cost = seconds(partial(operator.matmat, vectors), repeat=20) / block
                rows.append((chunks, block, vectorize, cost / base))

    print(
        f"{'chunks':>6} {'block':>5} {'vectorized':>10} {'gradients per product':>22}"
    )
    for chunks, block, vectorize, ratio in rows:
        print(f"{chunks:>6} {block:>5} {vectorize!s:>10} {ratio:>22.2f}")

    print(f"\n{'chunks':>6} {'products':>8} {'gradients per product':>22}")
    for chunks in (1, 3):
        size = -(-len(inputs) // chunks)
        data = [
            (inputs[i : i + size], targets[i : i + size])
            for i in range(0, len(inputs), size)
        ]
        objective = ProbeObjective(model, data, loss_fn=half_squared_error)
        counts = []

        def solve(objective=objective, counts=counts) -> None:
            result = lanczos(
                HessianOperator(objective),
                k=1,
                block_size=2,
                tol=1e-2,
                generator=torch.Generator().manual_seed(0),
            )
            counts.append(result.num_products)

        cost = seconds(solve, repeat=5, warmup=1)
        products = counts[-1]
        print(f"{chunks:>6} {products:>8} {cost / products / base:>22.2f}")


if __name__ == "__main__":
    main()
