"""Facts about a CUDA device that do not change while the process runs, cached per device.

The launch code asks them on every call: uncached, ``torch.cuda.get_device_capability`` and
``get_device_properties`` cost 2.5-4.6 µs of host time each on the H200's host
(``scripts/host_cost.py``), several per linear call.
"""

from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=None)
def compute_capability(device: torch.device) -> tuple[int, int]:
    """``(major, minor)`` of a CUDA device."""
    return torch.cuda.get_device_capability(device)


@lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """The streaming multiprocessors of a CUDA device."""
    return torch.cuda.get_device_properties(device).multi_processor_count
