"""The ``lightning-eos`` command line, a ``LightningCLI`` over the whole package.

Models, data modules and callbacks are chosen by class path in the YAML or on the
command line, and the optimizer and the learning-rate scheduler come from
LightningCLI's top-level ``optimizer:`` and ``lr_scheduler:`` sections::

    lightning-eos fit --model lightning_eos.models.MLP \
        --data lightning_eos.data.DigitsDataModule \
        --optimizer torch.optim.SGD --optimizer.lr 0.05

    lightning-eos fit --config experiment.yaml
"""

import jsonargparse
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import ArgsType, LightningCLI

# Imported so that their classes resolve by class path, and by short name
# (``--model MLP``, ``--optimizer SAM``), in configurations.
from lightning_eos import callbacks, data, models, optim, penalties  # noqa: F401

__all__ = ["main"]


def _google_docstrings() -> None:
    """Read argument help from docstrings as Google style, the package's style.

    jsonargparse otherwise guesses the style of each docstring, and takes one whose
    line starts with a Sphinx role (``:class:`...```) for reStructuredText, which
    loses the descriptions of every argument.
    """
    from docstring_parser import DocstringStyle

    if hasattr(jsonargparse, "set_parsing_settings"):
        jsonargparse.set_parsing_settings(docstring_parse_style=DocstringStyle.GOOGLE)
    else:  # jsonargparse before 4.35
        jsonargparse.set_docstring_parse_options(style=DocstringStyle.GOOGLE)


def main(args: ArgsType = None) -> None:
    """Run the ``lightning-eos`` command line.

    Args:
        args: The arguments, for example ``["fit", "--config", "run.yaml"]``;
            ``None`` reads them from ``sys.argv``.
    """
    _google_docstrings()
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
