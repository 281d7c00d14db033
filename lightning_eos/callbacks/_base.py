"""What every curvature callback shares: the schedule, the probe set, state, logging."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from typing_extensions import override

from lightning_eos._validation import check_choice, check_int, check_number, check_seed
from lightning_eos.callbacks._probe_set import ProbeSet, draw_probe_set
from lightning_eos.curvature.objective import ProbeObjective

try:  # optional strategies; absent classes simply cannot be in use
    from lightning.pytorch.strategies import (
        DeepSpeedStrategy,
        FSDPStrategy,
        ModelParallelStrategy,
    )

    _SHARDING: tuple[type, ...] = (
        DeepSpeedStrategy,
        FSDPStrategy,
        ModelParallelStrategy,
    )
except ImportError:  # pragma: no cover - depends on the Lightning version
    _SHARDING = ()

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
#: The Custom Scalars layout written to each TensorBoard logger so far.
_LAYOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def check_eigensolver(k: Any, tol: Any, max_iter: Any) -> tuple[int, float, int]:
    """Check the eigensolver settings of a monitor.

    Args:
        k: Number of top eigenpairs, an integer of at least 1.
        tol: Relative residual tolerance of Lanczos, a number in (0, 1).
        max_iter: Most Lanczos steps, an integer of at least 1.

    Returns:
        ``(k, tol, max_iter)``, with ``tol`` as a float.

    Raises:
        ValueError: For a setting outside its range, naming it.
    """
    return (
        check_int("k", k),
        check_number("tol", tol, low=0.0, high=1.0, low_open=True, high_open=True),
        check_int("max_iter", max_iter),
    )


def check_k_fits(k: int, pl_module: pl.LightningModule, owner: str) -> None:
    """Refuse ``k`` eigenpairs of a module with fewer trainable parameters.

    Raises:
        ValueError: If ``k`` exceeds the number of trainable parameters.
    """
    count = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
    if k > count:
        raise ValueError(
            f"{owner}: `k` = {k} exceeds the number of trainable parameters ({count})."
        )


class CurvatureCallback(Callback):
    """Base of the curvature callbacks: when to measure, on which data, and logging.

    Every ``every_n_steps`` optimizer steps, and once before the first step, the
    subclass's :meth:`measure` runs on the module's current parameters; it must not
    change training (it works on copies, see :class:`ProbeObjective`). The probe
    set is drawn once when training starts and kept on the module's device.

    The loss is ``loss_fn(module(inputs), targets)`` for batches ``(inputs, targets,
    ...)`` when ``loss_fn`` is given, and otherwise the module's own
    ``curvature_loss(batch)`` method, which must return the batch's loss exactly as
    ``training_step`` computes it, without logging.
    """

    def __init__(
        self,
        every_n_steps: int,
        probe_size: int,
        chunk_size: int,
        loss_fn: Callable[[Any, Any], Tensor] | None,
        mode: Literal["train", "eval"],
        dtype: Literal["float32", "float64"] | None,
        seed: int,
    ) -> None:
        self.every_n_steps = check_int("every_n_steps", every_n_steps)
        self.probe_size = check_int("probe_size", probe_size)
        self.chunk_size = check_int("chunk_size", chunk_size)
        if mode not in ("train", "eval"):
            raise ValueError(f"`mode` must be 'train' or 'eval', got {mode!r}.")
        check_choice("dtype", dtype, (None, *_DTYPES))
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(
                f"`loss_fn` must be callable, got {type(loss_fn).__name__}."
            )
        check_seed("seed", seed)
        self.loss_fn = loss_fn
        self.mode = mode
        self.dtype = dtype
        self.seed = seed
        self.probe: ProbeSet | None = None
        self.generator = torch.Generator().manual_seed(seed)
        self._restored_indices: Tensor | None = None
        self._last_measured_step = -1
        self._last_seen_step = -1
        self._warned: set[str] = set()
        #: Latest values shown by :class:`StepProgressBar`, set by subclasses.
        self.progress_bar_metrics: dict[str, float] = {}

    # -- hooks -----------------------------------------------------------------------

    @override
    def setup(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str
    ) -> None:
        if stage != "fit":
            return
        self.probe = None  # drawn again for every fit (or restored from a checkpoint)
        name = type(self).__name__
        if _SHARDING and isinstance(trainer.strategy, _SHARDING):
            raise MisconfigurationException(
                f"{name} needs every parameter on every process, but the strategy "
                f"{type(trainer.strategy).__name__} shards them. Use a single device "
                "or the 'ddp' strategy."
            )
        if not any(p.requires_grad for p in pl_module.parameters()):
            raise MisconfigurationException(
                f"{name}: the module {type(pl_module).__name__} has no trainable "
                "parameter (none with requires_grad=True)."
            )
        if self.loss_fn is None and not callable(
            getattr(pl_module, "curvature_loss", None)
        ):
            raise MisconfigurationException(
                f"{name} needs the loss: pass `loss_fn=` (a criterion applied to "
                "module(inputs) and targets) or define `curvature_loss(self, batch)` "
                f"on {type(pl_module).__name__}."
            )
        if self.mode == "train" and any(
            isinstance(m, nn.SyncBatchNorm) for m in pl_module.modules()
        ):
            raise MisconfigurationException(
                f"{name} cannot probe SyncBatchNorm in train mode: its forward runs "
                "collectives per chunk, and processes hold different numbers of "
                "chunks. Use mode='eval'."
            )

    @override
    def on_train_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> None:
        self.prepare(trainer, pl_module)
        self._last_seen_step = trainer.global_step
        if trainer.global_step != self._last_measured_step:
            self._measure(trainer, pl_module)

    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Draw the probe set and call :meth:`on_prepare`, once per fit.

        Runs when training starts, or earlier when another callback asks this one
        for a measurement from its own ``on_train_start`` (callbacks run in the
        order they were given).
        """
        if self.probe is not None:
            return
        self.probe = draw_probe_set(
            trainer,
            type(self).__name__,
            self.probe_size,
            self.chunk_size,
            self.generator,
            self.seed,
            indices=self._restored_indices,
        )
        if self.mode == "train" and any(
            isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0
            for m in pl_module.modules()
        ):
            self.warn_once(
                "dropout",
                f"{type(self).__name__} probes the module in train mode with dropout: "
                "each measurement fixes one dropout mask per chunk, so it measures the "
                "Hessian of one sampled loss. Use mode='eval' to measure without "
                "dropout.",
            )
        self.on_prepare(trainer, pl_module)

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step
        if step == self._last_seen_step:  # a micro-batch of gradient accumulation
            return
        self._last_seen_step = step
        # A callback that shares this one's results may have asked for this step's
        # measurement already.
        if step % self.every_n_steps == 0 and step != self._last_measured_step:
            self._measure(trainer, pl_module)

    # -- what subclasses implement ----------------------------------------------------

    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> dict[str, float]:
        """Measure at the current parameters; return the scalars to log."""
        raise NotImplementedError

    def on_prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Set up what measurements need once the probe set is drawn (optional)."""

    # -- services for subclasses ------------------------------------------------------

    def objective(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        normalization: Literal["native", "plain"] = "native",
        chunks: list[Any] | None = None,
    ) -> ProbeObjective:
        """The loss on the probe set (or on ``chunks``) at this step, all processes.

        Args:
            trainer: The trainer.
            pl_module: The module.
            normalization: ``"plain"`` for objectives differentiated three times
                (see :class:`~lightning_eos.curvature.ProbeObjective`).
            chunks: Batches to use instead of the probe set's chunks.
        """
        if chunks is None:
            assert self.probe is not None, "the probe set is drawn when training starts"
            chunks = self.probe.chunks
        self.check_layer_modes(pl_module)
        if self.loss_fn is not None:
            loss = {"loss_fn": self.loss_fn}
        else:
            loss = {"batch_loss": lambda module, batch: module.curvature_loss(batch)}
        return ProbeObjective(
            pl_module,
            chunks,
            **loss,
            dtype=_DTYPES[self.dtype] if self.dtype else None,
            train_mode=self.mode == "train",
            seed=self.seed * 1_000_003 + trainer.global_step,
            normalization=normalization,
            all_reduce=_all_reduce(trainer),
        )

    def check_layer_modes(self, pl_module: pl.LightningModule) -> None:
        """Warn once if ``mode="train"`` would run layers the module trains in eval."""
        if self.mode != "train" or not pl_module.training:
            return
        frozen = [
            name
            for name, layer in pl_module.named_modules()
            if name and not layer.training and _depends_on_mode(layer)
        ]
        if frozen:
            shown = ", ".join(frozen[:3]) + (", …" if len(frozen) > 3 else "")
            self.warn_once(
                "eval-layers",
                f"{type(self).__name__}(mode='train') evaluates every layer in "
                f"train mode, but the module trains with {shown} in eval mode: for "
                "layers whose output may depend on the mode (BatchNorm with running "
                "statistics, dropout, layers of one's own) its loss is not the one "
                "being trained. mode='eval' puts every layer in eval mode instead.",
            )

    def warn_once(self, key: str, message: str) -> None:
        """Warn on rank zero, once per ``key`` and callback."""
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

    @staticmethod
    def log_metrics(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        """Write scalars to every logger at the optimizer step.

        The loggers are called directly, so every measurement is written whatever
        ``Trainer(log_every_n_steps=...)`` is.
        """
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    @staticmethod
    def add_charts(
        trainer: pl.Trainer, category: str, charts: dict[str, list[str]]
    ) -> None:
        """Add multi-line charts (title → tag regexes) to TensorBoard's Custom Scalars.

        The layouts of all callbacks are merged on the logger, since TensorBoard
        shows the last layout written to a run.
        """
        for logger in trainer.loggers:
            if not isinstance(logger, TensorBoardLogger) or trainer.global_rank != 0:
                continue
            layout = _LAYOUTS.setdefault(logger, {})
            layout.setdefault(category, {}).update(
                {title: ["Multiline", tags] for title, tags in charts.items()}
            )
            logger.experiment.add_custom_scalars(layout)

    # -- checkpoint state -------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self.generator.get_state(),
            "probe_indices": self.probe.indices if self.probe is not None else None,
            "last_measured_step": self._last_measured_step,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.generator.set_state(state_dict["generator"])
        self._restored_indices = state_dict["probe_indices"]
        self._last_measured_step = state_dict["last_measured_step"]

    # -- internals --------------------------------------------------------------------

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = self.measure(trainer, pl_module)
        self._last_measured_step = trainer.global_step
        if metrics:
            self.log_metrics(trainer, metrics)


def _all_reduce(trainer: pl.Trainer) -> Callable[[Tensor], Tensor] | None:
    if trainer.world_size == 1:
        return None
    return lambda tensor: trainer.strategy.reduce(tensor, reduce_op="sum")


def _depends_on_mode(layer: nn.Module) -> bool:
    """Whether a layer's output may depend on its train/eval flag.

    Among PyTorch's layers: normalization with running statistics, dropout and
    RReLU. A leaf layer from outside PyTorch may read ``self.training`` and is
    counted; a container is judged by its layers.
    """
    if isinstance(layer, nn.modules.batchnorm._NormBase):
        return layer.track_running_stats
    if isinstance(layer, (nn.modules.dropout._DropoutNd, nn.RReLU)):
        return True
    own = not type(layer).__module__.startswith("torch.")
    return own and next(layer.children(), None) is None
