"""A least-recently-used store of tensors within a byte budget, for per-image state of backends.

Why it exists: backends keep expensive per-image results (CLIP activations,
SAM embeddings) so that many prompt sets cost one encoder run per image; the
store must stay within a memory budget on long datasets, and two backends that
differ only in cheap options may share one store (``with_options``).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Hashable

import torch


def tensor_bytes(value: Any) -> int:
    """Bytes of the tensors in a tensor, in a (nested) tuple / list of them, or an object's ``nbytes``
    (other items count 0)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(tensor_bytes(v) for v in value)
    return int(getattr(value, "nbytes", 0) or 0)


class TensorLRU:
    """Key → value (tensors, or tuples / lists holding them), evicting the least recently used past ``budget`` bytes.

    The most recent entry is always kept, even when it alone exceeds the budget.
    """

    def __init__(self, budget: int) -> None:
        self.budget = int(budget)
        self.nbytes = 0
        self._items: OrderedDict[Hashable, Any] = OrderedDict()

    def get(self, key: Hashable) -> Any | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: Hashable, value: Any) -> None:
        if key in self._items:
            self.nbytes -= tensor_bytes(self._items.pop(key))
        self._items[key] = value
        self.nbytes += tensor_bytes(value)
        while self.nbytes > self.budget and len(self._items) > 1:
            _, old = self._items.popitem(last=False)
            self.nbytes -= tensor_bytes(old)

    def pop(self, key: Hashable) -> Any | None:
        value = self._items.pop(key, None)
        self.nbytes -= tensor_bytes(value)
        return value

    def keys(self) -> list[Hashable]:
        return list(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        self._items.clear()
        self.nbytes = 0


__all__ = ["TensorLRU", "tensor_bytes"]
