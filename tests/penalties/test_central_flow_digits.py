"""On digits, the central-flow penalty holds a small-step run at 2/η_target."""

import warnings

import lightning.pytorch as pl
import pytest
import torch

from lightning_eos.callbacks import SharpnessMonitor
from lightning_eos.data import DigitsDataModule
from lightning_eos.models import MLP
from lightning_eos.penalties import CentralFlowPenalty, PenaltyCallback

# A narrow MLP (64-32-32-10, tanh, ½‖f − y‖²) keeps the test short. Full-batch GD
# with η = 0.2: λ₁ ≈ 2.94 at initialization falls to 2.15 by step 60, then sharpens
# past 3.2 near step 235 (time η·steps ≈ 47) and reaches about 4.3 by step 340.
STEP, THRESHOLD, STEPS, EVERY = 0.2, 3.2, 340, 20


class SmallStepMLP(MLP):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=STEP)


def run(callbacks):
    pl.seed_everything(0, verbose=False)
    module = SmallStepMLP(hidden_dims=(32, 32))
    monitor = SharpnessMonitor(every_n_steps=EVERY, tol=1e-4, extra_vectors=0)
    trainer = pl.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        callbacks=[monitor, *callbacks],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, DigitsDataModule(test_fraction=0.2))
    return {r.step: r.eigenvalues[0] for r in monitor.history}


@pytest.mark.slow
def test_central_flow_penalty_holds_the_sharpness_at_the_target():
    plain = run([])
    penalty = PenaltyCallback(CentralFlowPenalty(target_lr=2 / THRESHOLD))
    held = run([penalty])

    # The plain small-step run sharpens well past the threshold.
    assert max(plain[step] for step in plain if step <= 200) < THRESHOLD
    assert plain[STEPS] > 1.25 * THRESHOLD
    # The penalty switches on when the run reaches the threshold, and not before:
    # until then both runs are the same run.
    start = next(r.step for r in penalty.history if r.added)
    crossing = min(step for step, value in plain.items() if value >= THRESHOLD)
    assert crossing - EVERY <= start <= crossing
    assert STEPS - start >= 80
    for step, value in plain.items():
        if step <= start:
            assert held[step] == pytest.approx(value, rel=1e-6)
    # From then on, λ₁ stays within 5 % of 2/η_target: measured independently by
    # the monitor, and at every step by the penalty's own eigensolver.
    after = [value for step, value in held.items() if step > start]
    assert all(abs(value / THRESHOLD - 1) < 0.05 for value in after)
    own = [r.metrics["lambda_1"] for r in penalty.history if r.step > start]
    assert max(abs(value / THRESHOLD - 1) for value in own) < 0.05
    # Most of the time the multiplier is active: it balances progressive sharpening.
    active = [r.added for r in penalty.history if r.step > start]
    assert sum(active) > 0.5 * len(active)
