"""Train the test regressor with the probe callbacks on 1 or 2 CPU processes (gloo).

Usage: python ddp_probes.py OUTPUT.json DEVICES. Rank zero writes the histories.
"""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_eos.callbacks import (
    HessianTraceMonitor,
    MinibatchSharpnessMonitor,
    PreconditionedSharpnessMonitor,
    SpectralDensityMonitor,
    ThirdOrderMonitor,
)
from tests.callbacks.modules import (
    Regressor,
    half_squared_error,
    loader,
    regression_data,
)


def main(output: str, devices: int) -> None:
    pl.seed_everything(0, verbose=False)
    module = Regressor(lr=0.05, optimizer="adam")
    # 33 probe examples: the shards hold 17 and 16 examples, i.e. 2 and 1 chunks.
    common = {
        "every_n_steps": 3,
        "probe_size": 33,
        "chunk_size": 16,
        "loss_fn": half_squared_error,
    }
    probes = [
        ThirdOrderMonitor(k=2, tensor=True, threshold=0.5, tol=1e-10, **common),
        HessianTraceMonitor(method="hutchinson", num_products=6, **common),
        SpectralDensityMonitor(num_probes=2, num_steps=8, **common),
        MinibatchSharpnessMonitor(num_batches=2, batch_size=16, tol=1e-10, **common),
        PreconditionedSharpnessMonitor(tol=1e-10, **common),
    ]
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_steps=6,
        callbacks=probes,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader(regression_data(), batch_size=64))
    if trainer.global_rank == 0:
        third, trace, density, minibatch, preconditioned = probes
        histories = {
            "third": [
                [r.step, r.sharpness, r.grad_sharpness_norm, r.alpha, r.x, r.y]
                + r.tensor.reshape(-1).tolist()
                + (r.blocks.hessian.reshape(-1).tolist() if r.blocks else [])
                for r in third.history
            ],
            "trace": [[r.step, r.trace, r.stderr] for r in trace.history],
            "density": [
                [r.step, *r.density.nodes.reshape(-1).tolist()] for r in density.history
            ],
            "minibatch": [
                [r.step, r.full_sharpness, *r.minibatch_sharpness, *r.batch_sharpness]
                for r in minibatch.history
            ],
            "preconditioned": [
                [r.step, *r.eigenvalues] for r in preconditioned.history
            ],
        }
        Path(output).write_text(json.dumps(histories))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
