"""pyslurm.xcollections: MultiClusterMap, a dict of the local cluster's items by id."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


class MultiClusterMap:
    """Items kept as ``{cluster: {id: item}}``; used like a dict of the (first) cluster's items.

    Iterating gives the ids, ``values()`` every item of every cluster, as in the real class.
    """

    def __init__(self) -> None:
        self.data: dict[str, dict[int, Any]] = {}

    def add(self, item: Any) -> None:
        """Add ``item`` under its cluster and id."""
        self.data.setdefault(item.cluster, {})[item.id] = item

    def _local(self) -> dict[int, Any]:
        return next(iter(self.data.values()), {})

    def __getitem__(self, key: int) -> Any:
        return self._local()[key]

    def get(self, key: int, default: Any = None) -> Any:
        """The item with id ``key`` in the local cluster, or ``default``."""
        return self._local().get(key, default)

    def __contains__(self, key: object) -> bool:
        return any(key in items for items in self.data.values())

    def __len__(self) -> int:
        return sum(len(items) for items in self.data.values())

    def __iter__(self) -> Iterator[int]:
        return iter(self.keys())

    def keys(self) -> list[int]:
        """Every id of every cluster."""
        return [key for items in self.data.values() for key in items]

    def values(self) -> list[Any]:
        """Every item of every cluster."""
        return [item for items in self.data.values() for item in items.values()]

    def items(self) -> list[tuple[int, Any]]:
        """``(id, item)`` for every item of every cluster."""
        return [pair for items in self.data.values() for pair in items.items()]
