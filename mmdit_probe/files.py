"""Files that are whole or absent: write to a temporary name beside the target, then rename onto it."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def written_atomically(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed onto `path` when the block succeeds and
    removed when it fails, so a crash never leaves `path` half-written.

    >>> with written_atomically("out/scores.parquet") as temporary:
    ...     pq.write_table(table, temporary)
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
