from lightning_eos.callbacks import SharpnessMonitor, StepProgressBar

from .modules import Regressor, half_squared_error, loader, regression_data, trainer


def test_step_bar_spans_the_run_and_shows_sharpness(tmp_path):
    bar = StepProgressBar()
    monitor = SharpnessMonitor(every_n_steps=2, loss_fn=half_squared_error)
    run = trainer(tmp_path, [bar, monitor], 6, enable_progress_bar=True)
    run.fit(Regressor(), loader(regression_data(), batch_size=64))

    assert run.progress_bar_callback is bar
    assert bar.train_progress_bar.total == 6
    assert bar.train_progress_bar.n == 6
    shown = bar.get_metrics(run, run.lightning_module)
    assert shown["λ₁"] == monitor.history[-1].eigenvalues[0]
    assert shown["threshold"] == 20.0
    assert "v_num" not in shown
