"""A persistent B+tree of mappings keyed by IOVA: the storage of address maps and kernel units.

A domain may hold 100k mappings and change thousands of times a second, and a
transaction reads a snapshot without the engine's lock. So every change
returns a new tree that shares all but the O(log n) nodes on the path it
changed (path copying), and nodes are never modified once built: a snapshot
stays valid for ever, at no cost.

The tree stores mappings sorted by IOVA and trusts its caller that they do not
overlap (AddressMap and the plan check it); it neither merges nor splits them.
"""

from __future__ import annotations

from array import array
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Sequence
from itertools import chain
from operator import attrgetter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vdpad.iotlb.space import Mapping

#: Most items in a node: wide enough for a shallow tree (4 levels at 100k),
#: small enough that copying a node's tuple on a change stays cheap.
FANOUT = 32
_LEAST = FANOUT // 2  # a node below this is merged with, or refilled from, a neighbour


class _Node:
    """Leaf: mappings. Inner node: child nodes. `keys` are the first IOVA of each item (`first`, of
    the node's first); `quads`, the node's mappings packed once asked for (MappingTree.update_quads)."""

    __slots__ = ("keys", "first", "items", "leaf", "count", "nbytes", "quads")

    def __init__(self, items: tuple, leaf: bool):
        self.items, self.leaf, self.quads = items, leaf, None
        if leaf:
            self.keys = tuple(map(_IOVA, items))
            self.count = len(items)
            self.nbytes = sum(map(_SIZE, items))
        else:
            self.keys = tuple(map(_FIRST, items))
            self.count = sum(map(_COUNT, items))
            self.nbytes = sum(map(_NBYTES, items))
        self.first = self.keys[0]


_IOVA, _SIZE, _FIRST, _COUNT, _NBYTES = (attrgetter(name) for name in ("iova", "size", "first", "count", "nbytes"))

#: A mapping as the words of its UPDATE, in the order the C side takes them.
UPDATE_QUAD = attrgetter("iova", "size", "uaddr", "perm")


def _nodes(items: Sequence, leaf: bool) -> list[_Node]:
    """`items` cut into the fewest nodes of at most FANOUT, all of about the same size."""
    parts = -(-len(items) // FANOUT)
    return [_Node(tuple(items[i * len(items) // parts:(i + 1) * len(items) // parts]), leaf) for i in range(parts)]


def _insert(node: _Node, entry: Mapping) -> tuple[_Node, ...]:
    """The node with `entry` added: one node, or two when it overflowed."""
    if node.leaf:
        index = bisect_right(node.keys, entry.iova)
        items = (*node.items[:index], entry, *node.items[index:])
        keys = (*node.keys[:index], entry.iova, *node.keys[index:])
    else:
        index = max(bisect_right(node.keys, entry.iova) - 1, 0)
        parts = _insert(node.items[index], entry)
        items = (*node.items[:index], *parts, *node.items[index + 1:])
        keys = (*node.keys[:index], *map(_FIRST, parts), *node.keys[index + 1:])
    if len(items) <= FANOUT:  # the common case: the node's sums are its old ones and the entry's
        grown = _Node.__new__(_Node)
        grown.items, grown.leaf, grown.quads, grown.keys, grown.first = items, node.leaf, None, keys, keys[0]
        grown.count, grown.nbytes = node.count + 1, node.nbytes + entry.size
        return (grown,)
    half = len(items) // 2
    return _Node(items[:half], node.leaf), _Node(items[half:], node.leaf)


def _delete(node: _Node, entry: Mapping) -> _Node | None:
    """The node without `entry` (None when nothing is left); KeyError if it is not there."""
    index = bisect_right(node.keys, entry.iova) - 1
    if index < 0:
        raise KeyError(entry)
    if node.leaf:
        if node.items[index] is not entry and node.items[index] != entry:
            raise KeyError(entry)
        items = node.items[:index] + node.items[index + 1:]
        return _Node(items, True) if items else None
    child = _delete(node.items[index], entry)
    if child is None:
        replacement: tuple[_Node, ...] = ()
        first, last = index, index
    elif len(child.items) >= _LEAST or len(node.items) == 1:
        replacement = (child,)
        first, last = index, index
    else:  # too small: share a neighbour's items, as one node or two halves
        first, last = (index - 1, index) if index > 0 else (index, index + 1)
        left, right = (node.items[first], child) if first < index else (child, node.items[last])
        replacement = tuple(_nodes(left.items + right.items, child.leaf))
    items = node.items[:first] + replacement + node.items[last + 1:]
    return _Node(items, False) if items else None


def _leaves(node: _Node) -> Iterator[_Node]:
    """The leaves in order (iterating their items through one chain is far cheaper than nested yields)."""
    if node.leaf:
        yield node
    else:
        for child in node.items:
            yield from _leaves(child)


def _quads(node: _Node) -> bytes:
    if node.quads is None:
        node.quads = (array("Q", chain.from_iterable(map(UPDATE_QUAD, node.items))).tobytes() if node.leaf
                      else b"".join(map(_quads, node.items)))
    return node.quads


def _walk(node: _Node) -> Iterator[Mapping]:
    return chain.from_iterable(leaf.items for leaf in _leaves(node))


def _walk_from(node: _Node, iova: int) -> Iterator[Mapping]:
    """The entries from the last one that starts at or before `iova` (or the first) onwards."""
    index = max(bisect_right(node.keys, iova) - 1, 0)
    if node.leaf:
        yield from node.items[index:]
        return
    yield from _walk_from(node.items[index], iova)
    for child in node.items[index + 1:]:
        yield from _walk(child)


class MappingTree:
    """An immutable sorted collection of non-overlapping mappings; changes return new trees.

    It reads like a tuple of its mappings in IOVA order (and equals that tuple);
    lookups, inserts and removals are O(log n), `len` and `nbytes` O(1).
    """

    __slots__ = ("_root",)

    def __init__(self, entries: Iterable[Mapping] = ()):
        """From mappings already sorted by IOVA, in O(n)."""
        level = _nodes(list(entries), True)
        while len(level) > 1:
            level = _nodes(level, False)
        self._root: _Node | None = level[0] if level else None

    @classmethod
    def _of(cls, root: _Node | None) -> MappingTree:
        # A root with one child is one level too deep: a search would pay for it every time.
        while root is not None and not root.leaf and len(root.items) == 1:
            root = root.items[0]
        tree = cls.__new__(cls)
        tree._root = root
        return tree

    @classmethod
    def of(cls, entries: Iterable[Mapping]) -> MappingTree:
        """A tree as it is, or one built from mappings in any order."""
        if isinstance(entries, MappingTree):
            return entries
        return cls(sorted(entries, key=lambda m: m.iova))

    # -- reading ---------------------------------------------------------------------
    def __iter__(self) -> Iterator[Mapping]:
        root = self._root
        if root is None:
            return iter(())
        return iter(root.items) if root.leaf else _walk(root)  # a small map is one leaf: no generators

    def __len__(self) -> int:
        return self._root.count if self._root is not None else 0

    def __bool__(self) -> bool:
        return self._root is not None

    @property
    def nbytes(self) -> int:
        """The bytes the mappings cover."""
        return self._root.nbytes if self._root is not None else 0

    def __eq__(self, other: object) -> bool:
        if isinstance(other, MappingTree):
            if other._root is self._root:
                return True
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        if isinstance(other, (tuple, list)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self))  # the hash of the tuple it equals

    def __repr__(self) -> str:
        return f"MappingTree({list(self)!r})"

    def update_quads(self) -> bytes:
        """The mappings in IOVA order as the u64 words of their UPDATEs (UPDATE_QUAD), back to back.

        Each node keeps its packing once made (nodes never change), so the tree
        after a change packs in O(log n) Python steps: only the nodes on the
        changed path join their children's bytes anew. The price is memory: a
        packed tree holds its 32 bytes per mapping once per level (4 levels at
        100k mappings).
        """
        return _quads(self._root) if self._root is not None else b""

    def at(self, index: int) -> Mapping:
        """The mapping `index` places along in IOVA order (as update_quads has it), in O(log n)."""
        if not 0 <= index < len(self):
            raise IndexError(f"mapping {index} of a tree of {len(self)}")
        node = self._root
        while not node.leaf:
            for child in node.items:
                if index < child.count:
                    node = child
                    break
                index -= child.count
        return node.items[index]

    def floor(self, iova: int) -> Mapping | None:
        """The last mapping that starts at or before `iova`."""
        node = self._root
        if node is None:
            return None
        while True:
            index = bisect_right(node.keys, iova) - 1
            if index < 0:
                return None
            if node.leaf:
                return node.items[index]
            node = node.items[index]

    def following(self, iova: int) -> Mapping | None:
        """The first mapping that starts at or after `iova`."""
        return next(self.starting_from(iova), None)

    def starting_from(self, iova: int) -> Iterator[Mapping]:
        """The mappings that start at or after `iova`, in order."""
        if self._root is None:
            return iter(())
        return (m for m in _walk_from(self._root, iova) if m.iova >= iova)

    def overlapping(self, iova: int, end: int) -> list[Mapping]:
        """The mappings that intersect [iova, end), in order."""
        # A loop down and along the leaves, not nested generators: most calls find one or two.
        node = self._root
        if node is None:
            return []
        path: list[tuple[_Node, int]] = []  # the inner nodes above the leaf, and which child it is
        while not node.leaf:
            index = max(bisect_right(node.keys, iova) - 1, 0)
            path.append((node, index))
            node = node.items[index]
        index = max(bisect_right(node.keys, iova) - 1, 0)
        found: list[Mapping] = []
        while True:
            items = node.items
            for at in range(index, len(items)):
                entry = items[at]
                if entry.iova >= end:
                    return found
                if entry.end > iova:
                    found.append(entry)
            while path:  # on to the next leaf
                parent, child = path.pop()
                if child + 1 < len(parent.items):
                    path.append((parent, child + 1))
                    node = parent.items[child + 1]
                    while not node.leaf:
                        path.append((node, 0))
                        node = node.items[0]
                    break
            else:
                return found
            index = 0

    # -- changing (new trees) ------------------------------------------------------------
    def inserted(self, entry: Mapping) -> MappingTree:
        if self._root is None:
            return MappingTree._of(_Node((entry,), True))
        parts = _insert(self._root, entry)
        return MappingTree._of(parts[0] if len(parts) == 1 else _Node(parts, False))

    def removed(self, entry: Mapping) -> MappingTree:
        """This tree without `entry`, which must be in it (KeyError otherwise)."""
        if self._root is None:
            raise KeyError(entry)
        return MappingTree._of(_delete(self._root, entry))
