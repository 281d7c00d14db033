"""Train with SAM on 1 or 2 CPU processes (gloo) and save the final parameters.

Usage: python ddp_sam.py OUTPUT.pt DEVICES. The global batch is the same 32
examples either way: one batch of 32, or two shards of 16.
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_eos.optim import SAM
from tests.optim.modules import Recorder, loader


def main(output: str, devices: int) -> None:
    pl.seed_everything(0, verbose=False)
    module = Recorder(
        lambda p: SAM(
            p, torch.optim.SGD, rho=0.05, lr=0.1, base_kwargs={"momentum": 0.9}
        )
    )
    data = loader(32)
    if devices > 1:
        data = torch.utils.data.DataLoader(data.dataset, batch_size=16)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, data)
    if trainer.global_rank == 0:
        torch.save(
            {
                "params": [p.detach() for p in module.parameters()],
                "calls": module.calls,
            },
            output,
        )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
