"""Where a number lives across processes, decided in one place.

The callbacks ask three questions, all answered here:

- **Can this run be monitored correctly?** :func:`check_strategy` refuses, at fit start and with a message
  that says what is supported, the set-ups whose numbers would be wrong (DeepSpeed, FSDP1 without
  ``use_orig_params``, tensor parallelism).
- **Which part of a parameter does this rank hold?** :func:`plan_slices` asks each parameter how it is
  placed (a DTensor's ``placements`` under FSDP2, FSDP1's flat-shard offsets) and returns, per monitored
  slice, how to read this rank's share of it from the local tensor, cut by *global* indices so that a
  fused projection split across a shard boundary still adds up.
- **Who evaluates a lens callback?** :func:`check_lens_sharding`: rank zero alone on a whole model (one
  process, DDP); every rank, with the same forwards, on an FSDP2 model, whose units :func:`gathered`
  unshards for a decoder used outside a forward; refused where no forward could give whole values.
- **How are per-rank values pooled?** :func:`sum_over_ranks` (one all-reduce) and :func:`pool_over_ranks`
  (one all-gather, for sums and maxima together). Both are called on every rank, in the same order.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_heatmaps.layers import ParamRef
from lightning_heatmaps.reductions import squared_norms


def _first_class(*places: str) -> type | None:
    """The class at the first importable ``module:Name`` of ``places`` (torch moved several), else None."""
    for place in places:
        module, name = place.split(":")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    return None


def _dtensor_class() -> type | None:
    return _first_class("torch.distributed.tensor:DTensor", "torch.distributed._tensor:DTensor")  # torch < 2.4


def is_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a DTensor (a parameter or gradient sharded by FSDP2 or tensor parallelism).

    Example:
        >>> is_dtensor(torch.zeros(2))
        False
    """
    cls = _dtensor_class()
    return cls is not None and isinstance(tensor, cls)


def local_tensor(tensor: Tensor) -> Tensor:
    """This rank's part of ``tensor`` (the tensor itself unless it is a DTensor)."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def distributed_world() -> int:
    """The number of processes in the default group (1 without torch.distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


# --- Strategies ---------------------------------------------------------------------------------

SUPPORTED = (
    "Supported: one process, DDP (any flavour), FSDP2 (`fully_shard`, e.g. through "
    "ModelParallelStrategy(tensor_parallel_size=1)), and FSDPStrategy with use_orig_params=True"
)


def _strategy_names(strategy: Any) -> set[str]:
    return {cls.__name__ for cls in type(strategy).__mro__}


def check_strategy(trainer: Any, owner: str) -> None:
    """Refuse a strategy whose numbers this package could not compute correctly.

    Raises:
        ValueError: DeepSpeed (ZeRO partitions gradients outside ``param.grad``), FSDP1 with
            ``use_orig_params=False`` (the original parameters are not visible) or tensor parallelism.
    """
    strategy = trainer.strategy
    names = _strategy_names(strategy)
    if "DeepSpeedStrategy" in names:
        raise ValueError(
            f"{owner} does not support DeepSpeedStrategy: ZeRO keeps gradients partitioned outside `param.grad` "
            f"(it is None or partial), so the heatmaps would be zeros. {SUPPORTED}."
        )
    if "FSDPStrategy" in names and not getattr(strategy, "kwargs", {}).get("use_orig_params", True):
        raise ValueError(
            f"{owner} needs FSDPStrategy(use_orig_params=True) (got use_orig_params=False): without it the "
            f"original parameters are hidden inside flat parameters and cannot be read per layer. {SUPPORTED}."
        )
    mesh = getattr(strategy, "device_mesh", None) if "ModelParallelStrategy" in names else None
    names_of_dims = getattr(mesh, "mesh_dim_names", None) or ()
    if "tensor_parallel" in names_of_dims and mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            f"{owner} does not support tensor parallelism (ModelParallelStrategy with tensor_parallel_size="
            f"{mesh['tensor_parallel'].size()}): column-parallel outputs are sharded across ranks and row-parallel "
            f"ones are replicated, so activations and fused projections would be mis-counted. Use "
            f"ModelParallelStrategy(tensor_parallel_size=1) with fully_shard (FSDP2). {SUPPORTED}."
        )


def check_tensor_placement(refs: Sequence[ParamRef], owner: str) -> None:
    """Refuse parameters sharded over more than one mesh dimension or with partial placements."""
    for ref in refs:
        param = ref.param
        if not is_dtensor(param):
            continue
        if any(placement.is_partial() for placement in param.placements):
            raise ValueError(f"{owner}: parameter {ref.name} has a Partial placement {param.placements}; {SUPPORTED}.")
        if param.device_mesh.size() != distributed_world():
            raise ValueError(
                f"{owner}: parameter {ref.name} lives on a device mesh of {param.device_mesh.size()} ranks, not all "
                f"{distributed_world()}; {SUPPORTED}."
            )
        sharded = [p for p in param.placements if p.is_shard()]
        if len(sharded) > 1:
            raise ValueError(
                f"{owner}: parameter {ref.name} is sharded over {len(sharded)} mesh dimensions {param.placements} "
                f"(tensor parallelism or 2-D sharding); {SUPPORTED}."
            )


def is_sharded_model(refs: Sequence[ParamRef]) -> bool:
    """Whether any monitored parameter is split across ranks (FSDP2 DTensor, or an FSDP1 flat shard)."""
    return any(is_dtensor(ref.param) or _fsdp1_info(ref.param) is not None for ref in refs)


LENS_SUPPORTED = (
    "Supported for lens heatmaps: one process, DDP (rank zero evaluates alone) and FSDP2 (`fully_shard`, e.g. "
    "through ModelParallelStrategy(tensor_parallel_size=1); every rank evaluates)"
)


def _fsdp1_refusal(owner: str) -> str:
    return (
        f"{owner} does not support FSDPStrategy (FSDP1): evaluating a sharded model is implemented for FSDP2 "
        f"only (an FSDP1 model's decoder would need its flat parameters summoned outside the wrapped forward, "
        f"which is not done). {LENS_SUPPORTED}."
    )


def check_lens_strategy(trainer: Any, owner: str) -> None:
    """:func:`check_strategy`, and FSDPStrategy (FSDP1) refused for a lens callback (see :func:`check_lens_sharding`).

    Raises:
        ValueError: as :func:`check_strategy`, or the strategy is an ``FSDPStrategy``.
    """
    check_strategy(trainer, owner)
    if "FSDPStrategy" in _strategy_names(trainer.strategy):
        raise ValueError(_fsdp1_refusal(owner))


def _fsdp2_module_class() -> type | None:
    return _first_class("torch.distributed.fsdp:FSDPModule",
                        "torch.distributed._composable.fsdp:FSDPModule")  # torch < 2.6


def _fsdp2_units(model: nn.Module) -> dict[nn.Module, nn.Module | None]:
    """Every submodule of ``model`` mapped to the FSDP2 unit that manages its own parameters: the
    module itself or its nearest ``fully_shard``-ed ancestor (``None`` where there is none)."""
    cls = _fsdp2_module_class()
    units: dict[nn.Module, nn.Module | None] = {}

    def visit(module: nn.Module, unit: nn.Module | None) -> None:
        unit = module if cls is not None and isinstance(module, cls) else unit
        units[module] = unit
        for child in module.children():
            if child not in units:
                visit(child, unit)

    visit(model, None)
    return units


def check_lens_sharding(model: nn.Module, owner: str) -> bool:
    """Whether every rank must take part in a lens callback's evaluation of ``model``.

    ``False``: the model is whole on every rank (one process, DDP), so rank zero evaluates alone.
    ``True``: it is sharded by FSDP2 (``fully_shard`` on a 1-D data-parallel mesh; HSDP's replicate x shard
    mesh passes the same checks but has not been run): every rank runs the same forwards, in which FSDP2
    all-gathers each unit's parameters, so each rank computes one process's values from the same fixed
    probe set.

    Raises:
        ValueError: a layout whose evaluation cannot be exact: FSDP1 (``FSDPStrategy``), a DTensor parameter
            that no ``fully_shard`` manages (tensor parallelism), sharded over more than one mesh dimension
            (tensor parallelism with FSDP2) or with a Partial placement.

    Example:
        >>> check_lens_sharding(nn.Linear(2, 2), "LogitLensHeatmap")
        False
    """
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover
        FullyShardedDataParallel = ()  # type: ignore[assignment]
    if any(isinstance(module, FullyShardedDataParallel) for module in model.modules()):
        raise ValueError(_fsdp1_refusal(owner))
    units = _fsdp2_units(model)
    sharded = False
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not is_dtensor(param):
                continue
            where = f"{module_name}.{name}" if module_name else name
            placements = tuple(param.placements)
            if units.get(module) is None:
                raise ValueError(
                    f"{owner} does not support tensor parallelism: parameter {where} is a DTensor {placements} that "
                    f"no `fully_shard` manages, so its forward outputs and decoded logits may be shards, not the "
                    f"whole values. {LENS_SUPPORTED}."
                )
            if any(placement.is_partial() for placement in placements) or sum(p.is_shard() for p in placements) > 1:
                raise ValueError(
                    f"{owner} does not support tensor parallelism with FSDP2: parameter {where} is sharded as "
                    f"{placements}; FSDP2 gathers only its own mesh dimension, so a forward would leave it split. "
                    f"{LENS_SUPPORTED}."
                )
            sharded = True
    return sharded


def fsdp2_units_of(model: nn.Module, modules: Sequence[Any]) -> list[nn.Module]:
    """The FSDP2 units (``fully_shard``-ed modules of ``model``) that manage the parameters of ``modules``,
    in ``model``'s module order (the same on every rank). Modules outside ``model`` and anything that is not
    a module (a plain callable) add none.

    Example:
        >>> fsdp2_units_of(nn.Sequential(nn.Linear(2, 2)), [nn.Linear(2, 2)])
        []
    """
    units = _fsdp2_units(model)
    wanted = {units.get(sub) for module in modules if isinstance(module, nn.Module) for sub in module.modules()
              if any(True for _ in sub.parameters(recurse=False))}
    return [module for module in model.modules() if module in wanted]


@contextmanager
def gathered(units: Sequence[nn.Module]) -> Iterator[None]:
    """Whole parameters of the FSDP2 ``units`` on every rank, for direct use outside their forward (a
    decoder applied to hidden states). An all-gather per unit: every rank must enter it, with the same
    ``units`` in the same order. Resharding on exit is local (no collective), so an error inside cannot
    leave a rank waiting.

    Example:
        >>> with gathered([]):  # no sharded unit: nothing to gather
        ...     pass
    """
    try:
        for unit in units:
            unit.unshard()
        yield
    finally:
        for unit in units:
            unit.reshard()


@contextmanager
def resharded_after(model: nn.Module) -> Iterator[None]:
    """Reshard every FSDP2 unit of ``model`` on exit: an evaluation's forward leaves the root unit gathered
    (FSDP2 does not reshard the root after forward, expecting a backward), which would hold its whole
    parameters until the next training step. Local, no collective.

    Example:
        >>> with resharded_after(nn.Linear(2, 2)):
        ...     pass
    """
    try:
        yield
    finally:
        cls = _fsdp2_module_class()
        for module in model.modules():
            if cls is not None and isinstance(module, cls):
                module.reshard()


# --- This rank's share of a parameter ------------------------------------------------------------


@dataclass(frozen=True)
class LocalSlice:
    """How this rank reads one :class:`~lightning_heatmaps.layers.ParamRef` from its local tensor.

    ``how`` is ``"view"`` (the ref's own view of the local tensor: it is not cut along the split dimension),
    ``"narrow"`` (``start``, ``length`` along ``dim``), ``"index"`` (``index`` along ``dim``) or ``"empty"``
    (this rank holds none of it). ``weight`` is ``1 / replicas``: a value held whole by several ranks is
    counted once when the ranks' sums are added.

    Example:
        >>> LocalSlice("narrow", dim=0, start=1, length=2).take(torch.arange(4.0))
        tensor([1., 2.])
    """

    how: str
    ref: ParamRef | None = None
    dim: int = 0
    start: int = 0
    length: int = 0
    index: Tensor | None = None
    weight: float = 1.0

    def take(self, local: Tensor) -> Tensor:
        if self.how == "view":
            return local if self.ref is None else self.ref.view(local)
        if self.how == "narrow":
            return local.narrow(self.dim, self.start, self.length)
        if self.how == "index":
            assert self.index is not None
            return local.index_select(self.dim, self.index)
        return local.new_zeros(0)


def local_selection(indices: Tensor, start: int, length: int) -> tuple[str, int, int, Tensor | None]:
    """Which of the sorted global ``indices`` fall in ``[start, start + length)``, as local positions.

    Returns ``(how, start, length, index)`` for :class:`LocalSlice`: a contiguous run is a ``narrow``.

    Example:
        >>> local_selection(torch.tensor([0, 1, 6, 7]), 4, 4)
        ('narrow', 2, 2, None)
        >>> local_selection(torch.tensor([0, 1, 6, 7]), 0, 3)
        ('narrow', 0, 2, None)
        >>> local_selection(torch.tensor([1, 3, 5]), 0, 6)[0]
        'index'
    """
    inside = indices[(indices >= start) & (indices < start + length)] - start
    if inside.numel() == 0:
        return "empty", 0, 0, None
    first, count = int(inside[0]), inside.numel()
    if int(inside[-1]) - first + 1 == count:
        return "narrow", first, count, None
    return "index", 0, 0, inside


def _local_shape_and_offset(param: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    except ImportError:  # torch < 2.4
        from torch.distributed._tensor._utils import compute_local_shape_and_global_offset
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return tuple(shape), tuple(offset)


def _fsdp1_info(param: Any) -> tuple[torch.Size, int, int] | None:
    """``(full shape, first, last flat index held here)`` of an FSDP1 ``use_orig_params`` parameter, else None.

    FSDP1 tags each original parameter with its flat parameter; the shard's offsets come from there.
    """
    return getattr(param, "_lightning_heatmaps_fsdp1", None)


def register_fsdp1_shards(model: nn.Module) -> bool:
    """Tag the original parameters of FSDP1 (``use_orig_params=True``) units with their global shape and
    the range of flat indices this rank holds; returns whether any unit was found."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        return False
    found = False
    for module in model.modules():
        if not isinstance(module, FullyShardedDataParallel):
            continue
        handle = getattr(module, "_handle", None)
        flat = getattr(handle, "flat_param", None)
        if flat is None or getattr(flat, "_params", None) is None:
            continue
        for param, shape, info in zip(flat._params, flat._shapes, flat._shard_param_infos):
            found = True
            if info.in_shard:
                start, end = int(info.intra_param_start_idx), int(info.intra_param_end_idx) + 1
            else:
                start = end = 0
            param._lightning_heatmaps_fsdp1 = (torch.Size(shape), start, end)
    return found


def global_shape(param: Any) -> torch.Size:
    """The full shape of a parameter, however it is sharded."""
    info = _fsdp1_info(param)
    return info[0] if info is not None else param.shape


def plan_slices(refs: Sequence[ParamRef], world: int) -> list[LocalSlice]:
    """How this rank reads each ref from its local tensors (see :class:`LocalSlice`).

    Plain tensors in a sharded model are taken as replicated on every rank (``weight = 1 / world``).
    """
    slices = []
    for ref in refs:
        param = ref.param
        fsdp1 = _fsdp1_info(param)
        if fsdp1 is not None:
            shape, first, last = fsdp1
            flat = torch.arange(math.prod(shape)).view(shape)
            indices = ref.view(flat).flatten().sort().values
            how, start, length, index = local_selection(indices, first, last - first)
            slices.append(LocalSlice(how, ref, 0, start, length, None if index is None else index.to(param.device)))
            continue
        if not is_dtensor(param):
            slices.append(LocalSlice("view", ref, weight=1.0 / world))
            continue
        replicas = math.prod(param.device_mesh.size(i) for i, p in enumerate(param.placements) if p.is_replicate())
        weight = 1.0 / replicas
        if ref.part is None:
            slices.append(LocalSlice("view", ref, weight=weight))
            continue
        dim = ref.dim % param.dim()
        local_shape, offset = _local_shape_and_offset(param)
        if local_shape[dim] == param.shape[dim]:  # not cut along the split dimension: split the local tensor
            slices.append(LocalSlice("view", ref, weight=weight))
            continue
        indices = ref.global_indices(param.shape[dim])
        assert indices is not None
        how, start, length, index = local_selection(indices, offset[dim], local_shape[dim])
        device = param.to_local().device
        slices.append(LocalSlice(how, ref, dim, start, length, None if index is None else index.to(device), weight))
    return slices


class SlotSquares:
    """Per-slot sums of squares of monitored parameter slices, as this rank holds them.

    Planned once (at fit start) from ``refs`` and the slot each belongs to. A read takes one local tensor
    per distinct parameter (the parameter, its gradient, an update, in :meth:`params` order) and returns
    the per-slot sums with one grouped kernel, on the device. Under sharding (:attr:`sharded`) each rank's
    sums are its own share, to be added over ranks; otherwise each ref counts ``replicated_weight`` times
    (1 when one rank reads alone, ``1 / world`` when every rank adds the same value).

    Example:
        >>> from lightning_heatmaps.layers import ParamRef
        >>> layer = nn.Linear(2, 2)
        >>> with torch.no_grad():
        ...     _ = layer.weight.fill_(1.0), layer.bias.fill_(2.0)
        >>> squares = SlotSquares([ParamRef("w", layer, "weight"), ParamRef("b", layer, "bias")], [0, 1], 2)
        >>> [round(v, 4) for v in squares.sums(squares.local(lambda param: param.detach())).tolist()]
        [4.0, 8.0]
    """

    def __init__(self, refs: Sequence[ParamRef], ref_slots: Sequence[int], slot_count: int,
                 replicated_weight: float = 1.0) -> None:
        keys: dict[tuple[int, str], int] = {}
        # Several refs can slice one parameter (fused q/k/v, experts): each parameter is read once.
        self._ref_param = [keys.setdefault((id(ref.module), ref.attribute), len(keys)) for ref in refs]
        self._param_refs = list({index: ref for ref, index in zip(refs, self._ref_param)}.values())
        self._param_positions = [[k for k, index in enumerate(self._ref_param) if index == param]
                                 for param in range(len(self._param_refs))]
        self.sharded = is_sharded_model(refs)
        self._slices = plan_slices(refs, distributed_world()) if self.sharded else [
            LocalSlice("view", ref, weight=replicated_weight) for ref in refs]
        self.device = local_tensor(refs[0].param).device
        self._ref_slot = torch.tensor(list(ref_slots), device=self.device)
        weights = [piece.weight for piece in self._slices]
        self._ref_weight = None if all(w == 1.0 for w in weights) else torch.tensor(weights, device=self.device)
        self.slot_count = slot_count

    def params(self) -> list[Tensor]:
        """The distinct monitored parameters, as their modules hold them now."""
        return [ref.param for ref in self._param_refs]

    def local(self, tensor_of: Any) -> list[Tensor]:
        """``tensor_of(param)`` for each distinct parameter, as this rank holds it (``None`` reads as zeros)."""
        result = []
        for param in self.params():
            tensor = tensor_of(param)
            result.append(local_tensor(tensor) if tensor is not None else torch.zeros_like(local_tensor(param.detach())))
        return result

    def sums(self, per_param: Sequence[Tensor]) -> Tensor:
        """Per-slot sums of squares of this rank's share of each ref's slice of the per-parameter tensors."""
        pieces = [piece.take(per_param[index]) for piece, index in zip(self._slices, self._ref_param)]
        return self._pool(squared_norms(pieces))

    def streamed_sums(self, tensor_of: Callable[[int], Tensor]) -> Tensor:
        """As :meth:`sums`, for tensors made one parameter at a time: ``tensor_of(index)`` gives the tensor of the
        ``index``-th of :meth:`params`, which is read and dropped before the next one is made.

        For tensors that would cost memory to hold all at once (the change of every weight since a snapshot):
        besides one tensor of one parameter (and a slice of it copied where a sharded fused projection is not
        contiguous), only one 0-d norm per ref is kept. The result equals :meth:`sums` of the same tensors bit
        for bit: the same norms, pooled by the same operations in the same order.

        Example:
            >>> from lightning_heatmaps.layers import ParamRef
            >>> layer = nn.Linear(2, 2)
            >>> squares = SlotSquares([ParamRef("w", layer, "weight"), ParamRef("b", layer, "bias")], [0, 0], 1)
            >>> squares.streamed_sums(lambda index: torch.ones_like(squares.params()[index])).tolist()
            [6.0]
        """
        norms: list[Tensor | None] = [None] * len(self._slices)
        for index, positions in enumerate(self._param_positions):
            tensor = tensor_of(index)
            values = squared_norms([self._slices[position].take(tensor) for position in positions])
            del tensor  # gone before the next parameter's tensor is made
            for position, value in zip(positions, values):
                norms[position] = value
        return self._pool(torch.stack(norms))

    def _pool(self, per_ref: Tensor) -> Tensor:
        if self._ref_weight is not None:
            per_ref = per_ref * self._ref_weight
        totals = torch.zeros(self.slot_count, dtype=per_ref.dtype, device=per_ref.device)
        return totals.index_add_(0, self._ref_slot, per_ref)


# --- Pooling ------------------------------------------------------------------------------------


def sum_over_ranks(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over all ranks with one all-reduce (in place; every rank must call it)."""
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


def pool_over_ranks(rows: Tensor, max_rows: Sequence[int]) -> Tensor:
    """Pool ``(statistics, slots)`` over ranks with one collective: rows in ``max_rows`` by max, others by sum.

    One all-gather carries every rank's rows; the sums and maxima are then taken on the device.
    """
    world = torch.distributed.get_world_size()
    gathered = rows.new_empty((world * rows.shape[0], *rows.shape[1:]))  # ranks stacked along the first dim
    torch.distributed.all_gather_into_tensor(gathered, rows.contiguous())
    gathered = gathered.view(world, *rows.shape)
    pooled = gathered.sum(dim=0)
    if max_rows:
        pooled[list(max_rows)] = gathered[:, list(max_rows)].amax(dim=0)
    return pooled


def append_payload(rows: Tensor, payload: Tensor) -> Tensor:
    """``rows`` (``(statistics, slots)``) with ``payload`` (1-D) appended as zero-padded rows of the same width.

    So that values of another consumer ride along in a sample's one collective (summed over ranks, never
    maxed): :func:`split_payload` takes them back out.

    Example:
        >>> append_payload(torch.zeros(1, 3), torch.tensor([1.0, 2.0, 3.0, 4.0])).tolist()
        [[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [4.0, 0.0, 0.0]]
    """
    width = rows.shape[1]
    extra = -(-payload.numel() // width)
    padded = rows.new_zeros(extra * width)
    padded[: payload.numel()] = payload.reshape(-1).to(padded)
    return torch.cat([rows, padded.view(extra, width)])


def split_payload(pooled: Tensor, row: int, length: int) -> tuple[Tensor, int]:
    """The ``length`` payload values appended at row ``row`` of ``pooled`` (see :func:`append_payload`), and
    the row after them.

    Example:
        >>> split_payload(torch.tensor([[0.0, 0.0], [1.0, 2.0], [3.0, 0.0]]), 1, 3)
        (tensor([1., 2., 3.]), 3)
    """
    extra = -(-length // pooled.shape[1])
    return pooled[row : row + extra].reshape(-1)[:length], row + extra


def mean_over_ranks(values: Tensor) -> Tensor:
    """The mean of ``values`` over ranks, with one all-reduce (every rank must call it; a copy is reduced).

    A NaN or infinity on any rank makes the result non-finite on every rank, so a decision taken from it
    (e.g. :class:`~lightning_heatmaps.SpikeAlert`'s on a NaN loss) is the same everywhere.
    """
    total = values.detach().clone()
    torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM)
    return total / torch.distributed.get_world_size()


def local_grad_sumsq(parameters: Sequence[Tensor]) -> tuple[Tensor | None, bool]:
    """The sum of squares of this rank's part of the parameters' gradients, and whether they are sharded.

    Sharded (DTensor) gradients are summed over ranks to give the whole model's; replicated ones (one
    process, DDP) are the same on every rank. ``None`` when no parameter has a gradient.
    """
    grads = [local_tensor(p.grad).detach() for p in parameters if p.grad is not None]
    if not grads:
        return None, False
    sharded = any(is_dtensor(p.grad) for p in parameters if p.grad is not None)
    return torch.stack([g.float().square().sum() for g in grads]).sum(), sharded
