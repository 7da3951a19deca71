"""Class-incremental scenarios as data: a class order and a list of session sizes.

Follows the reference protocol (docs/methods.md §0.2): the class order is a numpy permutation seeded
with the run seed (1993 by default), the natural order, or an explicit list; labels are remapped so
that class ``order[i]`` becomes label ``i``; session ``t`` then holds the contiguous label range
``[known_t, known_t + size_t)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import numpy as np

from pilot.errors import ConfigError


def make_class_order(num_classes: int, order: str | Sequence[int], seed: int) -> list[int]:
    """The original class ids in the order they are learned.

    ``order``: ``"shuffle"`` -> ``np.random.seed(seed); np.random.permutation(num_classes)`` (the
    legacy global-RNG call of PyCIL/LAMDA-PILOT, stable across numpy versions); ``"natural"`` ->
    ``0..num_classes-1``; a list -> used as given after checking it is a permutation.
    """
    if isinstance(order, str):
        if order == "shuffle":
            np.random.seed(seed)
            return [int(c) for c in np.random.permutation(num_classes)]
        if order == "natural":
            return list(range(num_classes))
        raise ConfigError(f"scenario.class_order={order!r} is not 'shuffle', 'natural' or a list of class ids")
    explicit = [int(c) for c in order]
    if sorted(explicit) != list(range(num_classes)):
        missing = sorted(set(range(num_classes)) - set(explicit))[:5]
        raise ConfigError(
            f"scenario.class_order must list each of the {num_classes} class ids exactly once; "
            f"got {len(explicit)} ids (missing e.g. {missing}, duplicates or out-of-range ids otherwise)"
        )
    return explicit


def make_session_sizes(num_classes: int, init_cls: int, increment: int) -> list[int]:
    """``[init_cls]``, then ``increment`` while the running sum plus one more increment stays below
    ``num_classes``, then one final session with the remainder (docs/methods.md §0.2)."""
    if init_cls < 1 or increment < 1:
        raise ConfigError(f"scenario.init_cls={init_cls} and scenario.increment={increment} must both be >= 1")
    if init_cls > num_classes:
        raise ConfigError(
            f"scenario.init_cls={init_cls} exceeds the {num_classes} classes of the dataset; "
            f"choose init_cls <= {num_classes}"
        )
    sizes = [init_cls]
    while sum(sizes) + increment < num_classes:
        sizes.append(increment)
    if sum(sizes) < num_classes:
        sizes.append(num_classes - sum(sizes))
    return sizes


@dataclass(frozen=True)
class SessionInfo:
    """What a learner knows about a session before seeing its data."""

    index: int
    known: int  # classes learned before this session
    total: int  # classes seen once this session is learned

    @property
    def num_new(self) -> int:
        return self.total - self.known

    @property
    def new_classes(self) -> range:
        return range(self.known, self.total)


@dataclass(frozen=True)
class Scenario:
    """A class order and the session sizes over it. Labels in the run are positions in the order."""

    class_order: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_order)

    @property
    def num_sessions(self) -> int:
        return len(self.sizes)

    @cached_property
    def sessions(self) -> tuple[SessionInfo, ...]:
        bounds = np.concatenate([[0], np.cumsum(self.sizes)])
        return tuple(SessionInfo(t, int(bounds[t]), int(bounds[t + 1])) for t in range(len(self.sizes)))

    @cached_property
    def session_of_label(self) -> np.ndarray:
        """``session_of_label[y]`` = the session in which (remapped) label ``y`` is learned."""
        return np.repeat(np.arange(len(self.sizes)), self.sizes)

    def remap(self, original_labels: np.ndarray) -> np.ndarray:
        """Original dataset labels -> positions in the class order."""
        position = np.empty(self.num_classes, dtype=np.int64)
        position[list(self.class_order)] = np.arange(self.num_classes)
        return position[np.asarray(original_labels)]

    @property
    def name(self) -> str:
        """``B{init}Inc{increment}`` with B0 when the first session is as large as the others."""
        first = self.sizes[0]
        inc = self.sizes[1] if len(self.sizes) > 1 else first
        base = 0 if first == inc else first
        return f"B{base}Inc{inc}"


def make_scenario(
    num_classes: int,
    init_cls: int,
    increment: int,
    class_order: str | Sequence[int] = "shuffle",
    order_seed: int = 1993,
) -> Scenario:
    """Build a :class:`Scenario` from the ``scenario`` config group (``num_classes`` from the dataset)."""
    order = make_class_order(num_classes, class_order, order_seed)
    return Scenario(tuple(order), tuple(make_session_sizes(num_classes, init_cls, increment)))
