"""Cost of SharpnessMonitor on the main job, and its warm-started product counts.

    python benchmarks/monitor_overhead.py [--steps 2000]

Runs the main job (examples/digits_eos.yaml) three times in this process — without
the callback, and with it every 10 and every 100 steps — and reports the wall time of
each run relative to the run without, with the median number of Hessian-vector
products of the warm-started measurements (the cold first one excluded).
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import yaml

from lightning_eos.callbacks import SharpnessMonitor
from lightning_eos.cli import main as cli_main

CONFIG = Path(__file__).resolve().parents[1] / "examples" / "digits_eos.yaml"


class _Keep(pl.Callback):
    """Finds the SharpnessMonitor of a CLI run, to read its history afterwards."""

    monitor: SharpnessMonitor | None = None

    def on_train_end(self, trainer, pl_module):
        for callback in trainer.callbacks:
            if isinstance(callback, SharpnessMonitor):
                _Keep.monitor = callback


def run(steps: int, every: int | None, directory: Path) -> tuple[float, list[int]]:
    config = yaml.safe_load(CONFIG.read_text())
    callbacks = [
        c
        for c in config["trainer"]["callbacks"]
        if "StepProgressBar" not in c["class_path"]
    ]
    if every is None:
        callbacks = []
    else:
        callbacks[0]["init_args"]["every_n_steps"] = every
    callbacks.append({"class_path": f"{__name__}._Keep"})
    config["trainer"].update(
        callbacks=callbacks,
        max_steps=steps,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    _Keep.monitor = None
    start = time.perf_counter()
    cli_main(["fit", "--config", str(path)])
    elapsed = time.perf_counter() - start
    products = [r.num_products for r in _Keep.monitor.history] if _Keep.monitor else []
    return elapsed, products


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2000)
    steps = parser.parse_args().steps
    with tempfile.TemporaryDirectory() as directory:
        base, _ = run(steps, None, Path(directory) / "none")
        rows = []
        for every in (10, 100):
            elapsed, products = run(steps, every, Path(directory) / f"every{every}")
            rows.append((every, elapsed, products))
    print(f"main job, {steps} steps: {base:.1f} s without SharpnessMonitor")
    print("every_n_steps  seconds  overhead  median warm products")
    for every, elapsed, products in rows:
        warm = statistics.median(products[1:]) if len(products) > 1 else float("nan")
        print(f"{every:>13} {elapsed:>8.1f} {elapsed / base - 1:>9.0%} {warm:>21}")


if __name__ == "__main__":
    main()
