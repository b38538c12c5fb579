"""Fixed-memory history of samples: a ring buffer of ``(step, matrix)`` pairs.

Two policies share one fixed allocation:

- ``"recent"``: the last ``capacity`` samples; the oldest is overwritten, O(1) per append.
- ``"whole_run"``: the whole run at decreasing resolution. When full, every other sample is dropped
  and from then on only every ``stride``-th offered sample is kept, so a 300k-step run still fits
  on one heatmap, evenly spaced. Appends are O(1) amortised.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

POLICIES = ("recent", "whole_run")


class RingBuffer:
    """Fixed-capacity history of ``(step, values)`` samples, values being arrays of one shape.

    Args:
        capacity: samples kept (``>= 2``).
        shape: shape of each sample's values.
        policy: ``"recent"`` or ``"whole_run"`` (see module docstring).

    Example:
        >>> buffer = RingBuffer(capacity=2, shape=(1,))
        >>> for step in (0, 10, 20):
        ...     _ = buffer.append(step, np.array([step / 10]))
        >>> steps, values = buffer.ordered()
        >>> steps.tolist(), values[:, 0].tolist()
        ([10, 20], [1.0, 2.0])
    """

    def __init__(self, capacity: int, shape: tuple[int, ...], policy: str = "recent") -> None:
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 2:
            raise ValueError(f"Invalid value for capacity={capacity!r}: must be an integer >= 2.")
        if policy not in POLICIES:
            raise ValueError(f"Invalid value for policy={policy!r}: must be one of {POLICIES}.")
        self.capacity = capacity
        self.shape = tuple(shape)
        self.policy = policy
        self._values = np.full((capacity, *self.shape), np.nan)
        self._steps = np.zeros(capacity, dtype=np.int64)
        self._start = 0  # index of the oldest sample ("recent")
        self._size = 0
        self._stride = 1  # keep every stride-th offered sample ("whole_run")
        self._offered = 0  # samples offered over the whole run ("whole_run")

    def __len__(self) -> int:
        return self._size

    @property
    def stride(self) -> int:
        """In ``whole_run`` mode, the number of offered samples each kept sample stands for."""
        return self._stride

    def append(self, step: int, values: np.ndarray) -> bool:
        """Offer one sample; returns whether it was kept (``whole_run`` mode may skip it)."""
        values = np.asarray(values, dtype=np.float64)
        if values.shape != self.shape:
            raise ValueError(f"Sample shape {values.shape} does not match the buffer's shape {self.shape}.")
        if self.policy == "whole_run":
            return self._append_thinning(int(step), values)
        index = (self._start + self._size) % self.capacity
        self._values[index] = values
        self._steps[index] = step
        if self._size < self.capacity:
            self._size += 1
        else:
            self._start = (self._start + 1) % self.capacity
        return True

    def _append_thinning(self, step: int, values: np.ndarray) -> bool:
        # Sample number n (counted over the whole run) is kept iff n % stride == 0, so the kept
        # samples stay evenly spaced however often the buffer has been thinned.
        number = self._offered
        self._offered += 1
        if number % self._stride:
            return False
        if self._size == self.capacity:
            self._values[: (self._size + 1) // 2] = self._values[0 : self._size : 2]
            self._steps[: (self._size + 1) // 2] = self._steps[0 : self._size : 2]
            self._size = (self._size + 1) // 2
            self._stride *= 2
            if number % self._stride:
                return False
        self._values[self._size] = values
        self._steps[self._size] = step
        self._size += 1
        return True

    def ordered(self) -> tuple[np.ndarray, np.ndarray]:
        """Copies of ``(steps, values)``, oldest first."""
        index = (self._start + np.arange(self._size)) % self.capacity
        return self._steps[index].copy(), self._values[index].copy()

    def latest(self) -> tuple[int, np.ndarray] | None:
        """The newest ``(step, values)``, or ``None`` when empty."""
        if self._size == 0:
            return None
        index = (self._start + self._size - 1) % self.capacity
        return int(self._steps[index]), self._values[index].copy()

    def state_dict(self) -> dict[str, Any]:
        """Plain types and tensors only, so checkpoints load with ``torch.load(weights_only=True)``."""
        steps, values = self.ordered()
        return {
            "capacity": self.capacity,
            "shape": list(self.shape),
            "policy": self.policy,
            "steps": torch.from_numpy(steps),
            "values": torch.from_numpy(values),
            "stride": self._stride,
            "offered": self._offered,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a saved history; samples beyond this buffer's capacity keep the newest (``recent``)."""
        if tuple(state["shape"]) != self.shape:
            raise ValueError(f"Saved sample shape {tuple(state['shape'])} does not match this buffer's {self.shape}.")
        steps, values = np.asarray(state["steps"]), np.asarray(state["values"], dtype=np.float64)
        self._start, self._size, self._stride, self._offered = 0, 0, 1, 0
        if self.policy == "whole_run" and state.get("policy") == "whole_run" and len(steps) <= self.capacity:
            self._size = len(steps)
            self._values[: self._size] = values
            self._steps[: self._size] = steps
            self._stride, self._offered = int(state["stride"]), int(state["offered"])
            return
        for step, value in zip(steps, values):
            self.append(int(step), value)
