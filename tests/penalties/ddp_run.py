"""Train the test regressor with three penalties on 1 or 2 CPU processes (gloo).

Usage: python ddp_run.py OUTPUT.json DEVICES. Rank zero writes the results.
"""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_eos.penalties import (
    CentralFlowPenalty,
    GradientNormPenalty,
    PenaltyCallback,
    TracePenalty,
)
from tests.callbacks.modules import (
    Regressor,
    half_squared_error,
    loader,
    regression_data,
)


def main(output: str | None, devices: int) -> dict:
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    module = Regressor(lr=0.05)
    callbacks = [
        # The examples of the step: 64 in one process, 32 + 32 in two.
        PenaltyCallback(GradientNormPenalty(0.5), loss_fn=half_squared_error),
        PenaltyCallback(TracePenalty(0.01, seed=2), loss_fn=half_squared_error),
        # A probe set of 33 examples, sharded 17 + 16, in chunks of 8; the
        # threshold 2/1.5 lies below the sharpness, so the penalty is active.
        PenaltyCallback(
            CentralFlowPenalty(target_lr=1.5, tol=1e-10),
            data="probe",
            probe_size=33,
            chunk_size=8,
            loss_fn=half_squared_error,
        ),
    ]
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_steps=3,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader(regression_data(), batch_size=64 // devices))
    result = {
        "parameters": torch.cat(
            [p.detach().reshape(-1) for p in module.parameters()]
        ).tolist(),
        "values": [[r.value for r in c.history] for c in callbacks],
        "added": [[r.added for r in c.history] for c in callbacks],
    }
    if output is not None and trainer.global_rank == 0:
        Path(output).write_text(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
