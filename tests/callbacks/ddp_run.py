"""Train the test regressor with SharpnessMonitor on 1 or 2 CPU processes (gloo).

Usage: python ddp_run.py OUTPUT.json DEVICES. Rank zero writes the history.
"""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_eos.callbacks import SharpnessMonitor
from tests.callbacks.modules import (
    Regressor,
    half_squared_error,
    loader,
    regression_data,
)


def main(output: str, devices: int) -> None:
    pl.seed_everything(0, verbose=False)
    module = Regressor(lr=0.2)
    # 33 probe examples: the shards hold 17 and 16 examples, i.e. 2 and 1 chunks.
    monitor = SharpnessMonitor(
        k=2,
        every_n_steps=3,
        probe_size=33,
        chunk_size=16,
        tol=1e-10,
        loss_fn=half_squared_error,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_steps=9,
        callbacks=[monitor],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader(regression_data(), batch_size=64))
    if trainer.global_rank == 0:
        history = [
            {"step": r.step, "eigenvalues": r.eigenvalues, "products": r.num_products}
            for r in monitor.history
        ]
        local = [len(chunk[0]) for chunk in monitor.probe.chunks]
        Path(output).write_text(json.dumps({"history": history, "chunks": local}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
