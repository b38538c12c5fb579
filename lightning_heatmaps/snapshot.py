"""Reference copies of weights, kept off the accelerator: what ``update_ratio`` and ``weight_drift`` compare against.

A 7B-parameter model in bf16 holds 14 GB of weights; a copy on the accelerator for each of the two metrics
would cost as much again. A :class:`HostSnapshot` keeps its copies in host memory instead (pinned under
CUDA, so the copies in both directions are asynchronous and need no synchronisation: CUDA orders them on
the stream, before the optimizer's update and after it) and gives the change since the snapshot back one
tensor at a time, each streamed back to the device just before it is needed. On the device, at most one
tensor the size of the largest snapshotted one is alive at a time.

On a CPU-only run there is no accelerator memory to save: the "host copy" is simply a copy in RAM.
Under sharding (FSDP2, FSDP1) the snapshotted tensors are this rank's local shards, so each rank keeps
only its own share.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class HostSnapshot:
    """Host copies of ``tensors`` (e.g. the local weights), taken now; compared later one tensor at a time.

    The copies are exact (a copy, no conversion). Under CUDA they go to pinned memory with a non-blocking
    copy: the host never reads them, they only travel back to the device on the same stream, so no
    synchronisation is needed in either direction. On other accelerators the copies are blocking.

    Args:
        tensors: the tensors to copy, on any device.

    Example:
        >>> weights = [torch.ones(3), torch.zeros(2)]
        >>> snapshot = HostSnapshot(weights)
        >>> _ = weights[0].mul_(3.0)
        >>> snapshot.change(0, weights[0])
        tensor([2., 2., 2.])
        >>> snapshot.nbytes
        20
    """

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        self._copies: list[Tensor | None] = []
        for tensor in tensors:
            pinned = tensor.device.type == "cuda"
            copy = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pinned)
            copy.copy_(tensor, non_blocking=pinned)
            self._copies.append(copy)

    def __len__(self) -> int:
        return len(self._copies)

    @property
    def nbytes(self) -> int:
        """Host bytes held by the copies not yet released."""
        return sum(copy.numel() * copy.element_size() for copy in self._copies if copy is not None)

    def change(self, index: int, current: Tensor, release: bool = False) -> Tensor:
        """``current - snapshot[index]`` on ``current``'s device, in its dtype (the same op as a subtraction
        of two device tensors, so the same values bit for bit).

        Args:
            index: which snapshotted tensor.
            current: the tensor now, with the snapshotted tensor's shape and dtype.
            release: drop the host copy (it cannot be compared again). On the CPU its memory then holds the
                result, so no new tensor is allocated.

        Returns:
            A new tensor the size of ``current``: on an accelerator, the only device memory this uses.

        Raises:
            ValueError: ``index`` was released, or ``current`` does not match the snapshot's shape or dtype.

        Example:
            >>> snapshot = HostSnapshot([torch.tensor([1.0, 2.0])])
            >>> snapshot.change(0, torch.tensor([1.5, 2.0]), release=True)
            tensor([0.5000, 0.0000])
        """
        copy = self._copies[index]
        if copy is None:
            raise ValueError(f"Invalid value for index={index}: that snapshot was released by an earlier change().")
        if copy.shape != current.shape or copy.dtype != current.dtype:
            raise ValueError(
                f"Invalid value for current (shape {tuple(current.shape)}, {current.dtype}): must match snapshot {index} "
                f"(shape {tuple(copy.shape)}, {copy.dtype})."
            )
        if release:
            self._copies[index] = None
        # Pinned host memory freed while its copy is in flight is not reused before the copy ends (torch's
        # caching host allocator records the copy's stream), so releasing here is safe.
        moved = copy.to(current.device, non_blocking=copy.is_pinned())
        if moved is copy and not release:  # on the host already, and still needed: a new tensor for the result
            return torch.sub(current, copy)
        return torch.sub(current, moved, out=moved)
