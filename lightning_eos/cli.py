"""The ``lightning-eos`` command line, a ``LightningCLI`` over the whole package.

Models, data modules and callbacks are chosen by class path in the YAML or on the
command line, and the optimizer and the learning-rate scheduler come from
LightningCLI's top-level ``optimizer:`` and ``lr_scheduler:`` sections::

    lightning-eos fit --model lightning_eos.models.MLP \
        --data lightning_eos.data.DigitsDataModule \
        --optimizer torch.optim.SGD --optimizer.lr 0.05

    lightning-eos fit --config experiment.yaml
"""

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import ArgsType, LightningCLI

# Imported so that their classes resolve by class path, and by short name
# (``--model MLP``), in configurations.
from lightning_eos import callbacks, data, models, penalties  # noqa: F401

__all__ = ["main"]


def main(args: ArgsType = None) -> None:
    """Run the ``lightning-eos`` command line.

    Args:
        args: The arguments, for example ``["fit", "--config", "run.yaml"]``;
            ``None`` reads them from ``sys.argv``.
    """
    LightningCLI(
        model_class=LightningModule,
        datamodule_class=LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
