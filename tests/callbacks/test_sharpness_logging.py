import csv
import glob

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from lightning_eos.callbacks import SharpnessMonitor

from .modules import Regressor, half_squared_error, loader, regression_data, trainer


def read_events(directory):
    (path,) = glob.glob(f"{directory}/**/events.out.tfevents.*", recursive=True)
    events = EventAccumulator(path, size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def test_tensorboard_scalars_and_custom_chart(tmp_path):
    torch.manual_seed(0)
    monitor = SharpnessMonitor(k=2, every_n_steps=4, loss_fn=half_squared_error)
    logger = TensorBoardLogger(tmp_path, name="run")
    run = trainer(tmp_path, [monitor], 12, logger=logger)  # log_every_n_steps stays 50
    run.fit(Regressor(lr=0.05), loader(regression_data()))

    events = read_events(tmp_path / "run")
    tags = set(events.Tags()["scalars"])
    expected = {
        "sharpness/lambda_1",
        "sharpness/lambda_2",
        "sharpness/threshold",
        "sharpness/ratio",
        "sharpness/hvps",
    }
    assert expected <= tags
    steps = [e.step for e in events.Scalars("sharpness/lambda_1")]
    assert steps == [0, 4, 8, 12]
    values = [e.value for e in events.Scalars("sharpness/lambda_1")]
    assert values == pytest.approx(
        [r.eigenvalues[0] for r in monitor.history], rel=1e-6
    )
    ratios = [e.value for e in events.Scalars("sharpness/ratio")]
    assert ratios == pytest.approx([v / 40.0 for v in values], rel=1e-6)

    layout = layout_pb2.Layout()
    layout.ParseFromString(
        events.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0]
    )
    chart = layout.category[0].chart[0]
    assert layout.category[0].title == "sharpness"
    assert list(chart.multiline.tag) == [r"sharpness/lambda_\d+", "sharpness/threshold"]


def test_csv_logger_receives_every_measurement(tmp_path):
    monitor = SharpnessMonitor(every_n_steps=3, loss_fn=half_squared_error)
    logger = CSVLogger(tmp_path, name="csv")
    run = trainer(tmp_path, [monitor], 9, logger=logger)
    run.fit(Regressor(), loader(regression_data()))
    (path,) = glob.glob(f"{tmp_path}/csv/**/metrics.csv", recursive=True)
    with open(path) as handle:
        rows = list(csv.DictReader(handle))
    logged = [
        (int(r["step"]), float(r["sharpness/lambda_1"]))
        for r in rows
        if r["sharpness/lambda_1"]
    ]
    assert logged == [
        (r.step, pytest.approx(r.eigenvalues[0])) for r in monitor.history
    ]
    assert [step for step, _ in logged] == [0, 3, 6, 9]


def run_with_checkpoints(tmp_path, steps, ckpt_path=None):
    torch.manual_seed(0)
    module = Regressor(lr=0.2, momentum=0.5)
    if ckpt_path is None:
        torch.manual_seed(0)
    monitor = SharpnessMonitor(
        k=2, every_n_steps=5, loss_fn=half_squared_error, tol=1e-4
    )
    checkpoint = ModelCheckpoint(
        tmp_path / "ckpt", every_n_train_steps=15, save_top_k=-1
    )
    run = trainer(tmp_path, [monitor, checkpoint], steps, enable_checkpointing=True)
    run.fit(module, loader(regression_data()), ckpt_path=ckpt_path)
    return monitor


def test_resume_continues_as_uninterrupted(tmp_path):
    whole = run_with_checkpoints(tmp_path / "a", 30)
    (checkpoint,) = glob.glob(f"{tmp_path}/a/ckpt/*step=15.ckpt")
    state = torch.load(checkpoint, weights_only=False)["callbacks"][whole.state_key]
    assert state["last_measured_step"] == 15 and state["vectors"].shape[0] == 3

    resumed = run_with_checkpoints(tmp_path / "b", 30, ckpt_path=checkpoint)

    assert [r.step for r in resumed.history] == [20, 25, 30]
    expected = {r.step: r for r in whole.history}
    for record in resumed.history:
        reference = expected[record.step]
        assert record.eigenvalues == pytest.approx(reference.eigenvalues, rel=1e-6)
        assert record.num_products == reference.num_products
    assert torch.equal(resumed.probe.indices, whole.probe.indices)
