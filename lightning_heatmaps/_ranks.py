"""Rank-zero messages without Lightning (the core and the lower layers use these)."""

from __future__ import annotations

import logging
import os
import warnings

import torch


def process_rank() -> int:
    """This process's global rank: from ``torch.distributed`` when it is initialised, else ``RANK`` (0 by default)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)) or 0)


def rank_zero_warn(message: str, stacklevel: int = 2) -> None:
    """``warnings.warn(message)`` on global rank zero only (the core's equivalent of Lightning's helper).

    Example:
        >>> rank_zero_warn("something to act on")  # doctest: +SKIP
    """
    if process_rank() == 0:
        warnings.warn(message, UserWarning, stacklevel=stacklevel + 1)


_logger = logging.getLogger("lightning_heatmaps")
if not logging.getLogger().hasHandlers() and not _logger.handlers:
    # As Lightning does for its own logger: INFO reports are shown unless the application configures logging.
    _logger.setLevel(logging.INFO)
    _logger.addHandler(logging.StreamHandler())
    _logger.propagate = False


def rank_zero_info(message: str) -> None:
    """Log ``message`` at INFO level, on global rank zero only, to the ``lightning_heatmaps`` logger (shown on
    stderr unless the application configured logging)."""
    if process_rank() == 0:
        _logger.info(message)
