"""The interface every results sink implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any


class Sink(ABC):
    """Receives one record per finished session, plus that session's row of the accuracy matrix.

    ``open`` is given the records of sessions finished before a resume (empty for a fresh run):
    a sink must end up holding each session exactly once.
    """

    @abstractmethod
    def open(
        self,
        run_dir: Path,
        run_info: dict[str, Any],
        config: dict[str, Any],
        previous: list[tuple[dict[str, Any], list[dict[str, Any]]]],
    ) -> None: ...

    @abstractmethod
    def write(self, record: dict[str, Any], matrix_rows: list[dict[str, Any]]) -> None: ...

    @abstractmethod
    def close(self, summary: dict[str, Any]) -> None: ...
