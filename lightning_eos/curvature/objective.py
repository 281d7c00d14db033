"""The training loss as a function of the parameters, on a fixed probe set in chunks."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_eos.curvature._batches import batch_size, cast_floating
from lightning_eos.curvature.normalization import plain_normalization

#: ``loss_fn(outputs, targets)``: a criterion applied to ``module(inputs)``.
LossFn = Callable[[Any, Any], Tensor]
#: ``batch_loss(module, batch)``: the loss of a whole batch, computed by any code.
BatchLoss = Callable[[nn.Module, Any], Tensor]
#: ``all_reduce(tensor)``: returns the sum of ``tensor`` over processes.
AllReduce = Callable[[Tensor], Tensor]

_GOLDEN = 0x9E3779B97F4A7C15  # spreads consecutive chunk indices over the seed space

_PROBING: ContextVar[bool] = ContextVar("lightning_eos_probing", default=False)


def probing() -> bool:
    """Whether a :class:`ProbeObjective` is evaluating the module right now.

    Forward hooks that record a module's training outputs (the Gauss-Newton
    optimizers do) use it to leave out the forward calls of probes and penalties.
    """
    return _PROBING.get()


class _BatchLossModule(nn.Module):
    """Holds the user's module so that ``functional_call`` can swap its tensors."""

    def __init__(self, module: nn.Module, batch_loss: BatchLoss) -> None:
        super().__init__()
        self.module = module
        self.batch_loss = batch_loss

    def forward(self, batch: Any) -> Tensor:
        return self.batch_loss(self.module, batch)


def criterion_loss(loss_fn: LossFn) -> BatchLoss:
    """Turn ``loss_fn(outputs, targets)`` into a batch loss for ``(inputs, targets)``.

    The batch's first element is fed to the module and its second element is the
    target; any further elements are ignored.
    """

    def batch_loss(module: nn.Module, batch: Any) -> Tensor:
        if not isinstance(batch, (list, tuple)) or len(batch) < 2:
            raise ValueError(
                "loss_fn expects batches of the form (inputs, targets, ...); got a "
                f"{type(batch).__name__}. Give a batch loss instead for other "
                "batches."
            )
        return loss_fn(module(batch[0]), batch[1])

    return batch_loss


@contextmanager
def training_flags(module: nn.Module, training: bool) -> Iterator[None]:
    """Put ``module`` in train or eval mode, then restore every submodule's own flag."""
    flags = [(sub, sub.training) for sub in module.modules()]
    module.train(training)
    try:
        yield
    finally:
        for sub, flag in flags:
            sub.training = flag


@contextmanager
def fixed_randomness(seed: int, device: torch.device) -> Iterator[None]:
    """Seed the default generators of the CPU and ``device``; restore them after."""
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        torch.default_generator.manual_seed(seed)
        if cuda_state is not None:
            index = (
                device.index
                if device.index is not None
                else torch.cuda.current_device()
            )
            torch.cuda.default_generators[index].manual_seed(seed)
        yield
    finally:
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, device)


class ProbeObjective:
    r"""The loss of a module on a fixed probe set, as a function of its parameters.

    The probe set is a sequence of chunks (batches) ``B_1 … B_C`` held by this
    process. With ``reduction="mean"`` the loss of each chunk is taken to be a mean
    over its ``n_c`` examples, and

    .. math::
        L(\theta) = \sum_c \frac{n_c}{N}\, \ell(\theta; B_c),
        \qquad N = \sum_c n_c \text{ (over all processes)},

    which is the mean over the whole probe set whatever the chunk size. With
    ``reduction="sum"`` the chunk losses are added. Memory is that of one chunk's
    forward and backward passes.

    The module is never modified: the loss is evaluated by
    :func:`torch.func.functional_call` on copies of the parameters and buffers, so
    BatchNorm running statistics, ``.grad`` fields and the parameters stay as they
    were. During an evaluation every submodule is put in train mode
    (``train_mode=True``: BatchNorm normalizes with the chunk's own statistics, and the
    result depends on the chunk size) or eval mode (BatchNorm uses its running
    statistics), and each submodule's flag is restored afterwards. The default random
    generators are reseeded from ``seed`` and the chunk index for each evaluation and
    restored afterwards: a stochastic layer such as dropout then draws the same mask
    for a chunk every time the loss is evaluated with the same ``seed``, so the
    Hessian is that of one fixed draw, and the random stream of training is not moved.

    Third derivatives through PyTorch's fused layer, batch (train mode) and instance
    normalization are wrong (see :mod:`lightning_eos.curvature.normalization`);
    ``normalization="plain"`` evaluates those layers with plain tensor operations
    during probes, which is the same function to round-off with exact derivatives of
    every order, and leaves the module and its training untouched.

    Args:
        module: The model. Its trainable parameters (``requires_grad=True``) are the
            variables; frozen parameters and buffers are held constant.
        chunks: The batches of the probe set held by this process.
        loss_fn: A criterion ``loss_fn(module(inputs), targets)`` for batches of the
            form ``(inputs, targets, ...)``.
        batch_loss: Alternatively, ``batch_loss(module, batch)`` computing the scalar
            loss of a batch any way it likes (give exactly one of the two).
        reduction: ``"mean"`` if the batch loss is a mean over the batch's examples,
            ``"sum"`` if it is a sum.
        dtype: Floating-point type of the computation (for example ``torch.float64``
            on a ``float32`` model); ``None`` keeps the parameters' own type.
            Floating-point tensors of the batches are cast to it as well.
        train_mode: Evaluate with every submodule in train mode (``True``) or in eval
            mode (``False``).
        seed: Seed of the randomness of stochastic layers.
        normalization: ``"native"`` evaluates normalization layers with PyTorch's
            fused kernels (exact to second order); ``"plain"`` with plain tensor
            operations (exact to every order, needed for third derivatives).
        all_reduce: Sum over processes, for a probe set sharded across processes
            (for example ``torch.distributed.all_reduce``). Called the same number of
            times on every process, however many chunks each holds.

    Raises:
        ValueError: If both or neither of ``loss_fn`` and ``batch_loss`` are given, if
            ``reduction`` is unknown, if the module has no trainable parameter, or if
            the probe set is empty on every process.
    """

    def __init__(
        self,
        module: nn.Module,
        chunks: Sequence[Any],
        *,
        loss_fn: LossFn | None = None,
        batch_loss: BatchLoss | None = None,
        reduction: Literal["mean", "sum"] = "mean",
        dtype: torch.dtype | None = None,
        train_mode: bool = True,
        seed: int = 0,
        normalization: Literal["native", "plain"] = "native",
        all_reduce: AllReduce | None = None,
    ) -> None:
        if (loss_fn is None) == (batch_loss is None):
            raise ValueError("Give exactly one of `loss_fn` and `batch_loss`.")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"`reduction` must be 'mean' or 'sum', got {reduction!r}.")
        if normalization not in ("native", "plain"):
            raise ValueError(
                f"`normalization` must be 'native' or 'plain', got {normalization!r}."
            )
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"`dtype` must be a floating-point type, got {dtype}.")
        variables = [
            (name, p) for name, p in module.named_parameters() if p.requires_grad
        ]
        if not variables:
            raise ValueError(
                f"The module {type(module).__name__} has no trainable parameter "
                "(none with requires_grad=True): there is no Hessian to probe."
            )

        self.module = module
        self.chunks = list(chunks)
        self.reduction = reduction
        self.train_mode = train_mode
        self.seed = seed
        self.normalization = normalization
        self.all_reduce = all_reduce
        self.names = [name for name, _ in variables]
        self.shapes = [p.shape for _, p in variables]
        self.numels = [p.numel() for _, p in variables]
        self.dim = sum(self.numels)
        self.device = variables[0][1].device
        self.dtype = dtype if dtype is not None else variables[0][1].dtype
        self._cast = dtype
        self._wrapper = _BatchLossModule(
            module, batch_loss if batch_loss is not None else criterion_loss(loss_fn)
        )

        self.local_sizes = [batch_size(chunk) for chunk in self.chunks]
        total = torch.tensor(float(sum(self.local_sizes)), dtype=torch.float64)
        self.num_examples = int(self._reduce(total.to(self.device)).item())
        if self.num_examples == 0:
            raise ValueError("The probe set is empty: there is no loss to probe.")

    def with_chunks(
        self, chunks: Sequence[Any], *, all_reduce: AllReduce | None = None
    ) -> ProbeObjective:
        """The same loss of the same module on other chunks.

        The batch loss, reduction, type, mode, normalization and seed are kept;
        ``all_reduce`` is not (pass it again for a set sharded across processes).
        """
        return ProbeObjective(
            self.module,
            chunks,
            batch_loss=self._wrapper.batch_loss,
            reduction=self.reduction,  # type: ignore[arg-type]
            dtype=self._cast,
            train_mode=self.train_mode,
            seed=self.seed,
            normalization=self.normalization,
            all_reduce=all_reduce,
        )

    def with_normalization(
        self, normalization: Literal["native", "plain"]
    ) -> ProbeObjective:
        """The same loss on the same chunks, with normalization layers evaluated so."""
        if normalization == self.normalization:
            return self
        return ProbeObjective(
            self.module,
            self.chunks,
            batch_loss=self._wrapper.batch_loss,
            reduction=self.reduction,  # type: ignore[arg-type]
            dtype=self._cast,
            train_mode=self.train_mode,
            seed=self.seed,
            normalization=normalization,
            all_reduce=self.all_reduce,
        )

    # -- points of parameter space -------------------------------------------------

    def point(self) -> Tensor:
        """The module's current trainable parameters as one flat vector (a copy)."""
        with torch.no_grad():
            flat = torch.cat(
                [p.detach().reshape(-1) for p in self._variable_tensors()]
            ).to(self.dtype)
        return flat.clone()

    def split(self, flat: Tensor) -> list[Tensor]:
        """Views of a flat vector (or a batch of them) shaped like the parameters."""
        lead = flat.shape[:-1]
        pieces = torch.split(flat, self.numels, dim=-1)
        return [
            piece.reshape((*lead, *shape))
            for piece, shape in zip(pieces, self.shapes, strict=True)
        ]

    @staticmethod
    def flatten(tensors: Sequence[Tensor], batched: bool = False) -> Tensor:
        """Concatenate parameter-shaped tensors into a flat vector (or a batch)."""
        if batched:
            return torch.cat([t.reshape(t.shape[0], -1) for t in tensors], dim=1)
        return torch.cat([t.reshape(-1) for t in tensors])

    # -- evaluation ------------------------------------------------------------------

    def chunk_losses(
        self,
        flat_point: Tensor | Sequence[Tensor],
        constants: tuple[dict[str, Tensor], dict[str, Tensor]] | None = None,
    ) -> Iterator[Tensor]:
        """Yield the weighted loss ``w_c ℓ(θ; B_c)`` of each local chunk, with graph.

        Args:
            flat_point: θ as a flat vector, or as parameter-shaped tensors (pass
                leaf tensors with ``requires_grad=True`` to differentiate).
            constants: The frozen parameters and buffers to use, as returned by
                :meth:`constants`; by default the module's current ones.
        """
        tensors = (
            self.split(flat_point)
            if isinstance(flat_point, Tensor)
            else list(flat_point)
        )
        variables = {f"module.{n}": t for n, t in zip(self.names, tensors, strict=True)}
        frozen, buffers = self.constants() if constants is None else constants
        for index, (chunk, size) in enumerate(
            zip(self.chunks, self.local_sizes, strict=True)
        ):
            batch = cast_floating(chunk, self._cast)
            weight = size / self.num_examples if self.reduction == "mean" else 1.0
            # Fresh copies of the buffers for every chunk: a layer that updates its
            # buffers in place (BatchNorm in train mode) must see the same state in
            # every evaluation, and must never write to the module's own buffers.
            state = {
                **frozen,
                **{k: v.clone() for k, v in buffers.items()},
                **variables,
            }
            with (
                training_flags(self.module, self.train_mode),
                fixed_randomness(self._chunk_seed(index), self.device),
                plain_normalization()
                if self.normalization == "plain"
                else nullcontext(),
            ):
                token = _PROBING.set(True)
                try:
                    loss = functional_call(self._wrapper, state, (batch,))
                finally:
                    _PROBING.reset(token)
            if not isinstance(loss, Tensor) or loss.dim() != 0:
                shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss)
                raise ValueError(
                    "The loss function must return a scalar tensor (a loss reduced "
                    f"over the batch); it returned {shape}."
                )
            yield weight * loss

    def loss(self, flat_point: Tensor | None = None) -> float:
        """L(θ) at ``flat_point`` (default: the module's parameters), all processes."""
        point = self.point() if flat_point is None else flat_point
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        with torch.no_grad():
            for loss in self.chunk_losses(point):
                total = total + loss.detach()
        return float(self._reduce(total).item())

    # -- helpers ---------------------------------------------------------------------

    def _reduce(self, tensor: Tensor) -> Tensor:
        return self.all_reduce(tensor) if self.all_reduce is not None else tensor

    def _chunk_seed(self, index: int) -> int:
        return (self.seed * 1_000_003 + _GOLDEN * (index + 1)) % (2**63 - 1)

    def _variable_tensors(self) -> list[Tensor]:
        params = dict(self.module.named_parameters())
        return [params[name] for name in self.names]

    def constants(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Frozen parameters and buffers, cast to the probe type, keyed for the wrapper.

        They are detached from the module's tensors but share their memory unless
        cast: clone them to keep a snapshot that a later :meth:`chunk_losses`
        call can use whatever happens to the module's buffers in between (running
        statistics moved by a training forward pass).

        Returns:
            The frozen parameters and the buffers, as two dictionaries.
        """
        trainable = set(self.names)
        frozen = {
            f"module.{name}": self._cast_constant(p)
            for name, p in self.module.named_parameters()
            if name not in trainable
        }
        buffers = {
            f"module.{name}": self._cast_constant(b)
            for name, b in self.module.named_buffers()
        }
        return frozen, buffers

    def _cast_constant(self, tensor: Tensor) -> Tensor:
        tensor = tensor.detach()
        if self._cast is not None and tensor.is_floating_point():
            return tensor.to(self._cast)
        return tensor
