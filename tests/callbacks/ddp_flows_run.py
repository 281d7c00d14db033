"""Train the test regressor with FlowMonitor on 1 or 2 CPU processes (gloo).

Usage: python ddp_flows_run.py OUTPUT.json DEVICES. Rank zero writes the history.
"""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_eos.callbacks import FlowMonitor
from tests.callbacks.modules import (
    Regressor,
    half_squared_error,
    loader,
    regression_data,
)


def main(output: str, devices: int) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    module = Regressor(lr=1.0)
    monitor = FlowMonitor(
        loss_fn=half_squared_error, sharpness_every_n_steps=None, candidate_tol=1e-6
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_steps=36,
        callbacks=[monitor],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    # Each process trains on its half of the 64 examples: the same full-batch step.
    trainer.fit(module, loader(regression_data(), batch_size=64 // devices))
    if trainer.global_rank == 0:
        history = [
            {
                name: {
                    "loss": r.flows[name].loss,
                    "sharpness": r.flows[name].sharpness,
                    "critical": r.flows[name].critical,
                    "loss_average": r.flows[name].loss_average,
                }
                for name in r.flows
            }
            for r in monitor.history
        ]
        local = [len(chunk[0]) for chunk in monitor.probe.chunks]
        Path(output).write_text(json.dumps({"history": history, "chunks": local}))
    torch.set_num_threads(threads)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
