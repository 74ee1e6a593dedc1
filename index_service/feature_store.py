"""Each object's local features (``vision.local_features``), one SQLite file per index generation, on the index
service's own disk (the bucket stays read-only to bucketlens).

Rows are keyed by object and carry the etag they were computed from: a search uses a row only when its etag is
the one the index holds, so a missing or outdated row costs a verification, never a wrong answer. The store is
written in the same merge batch as the index, and committed before the batch's stream entries are acknowledged,
so it is at least as new as any snapshot; a replay after a crash writes the same rows again. Snapshots therefore
name the store rather than copy it (tens of KB per object would make every snapshot rewrite gigabytes).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path
from typing import Iterable, Sequence

log = logging.getLogger(__name__)


class FeatureStore:
    """``path`` None keeps the rows in memory (tests, and indexes built without a state folder)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path) if path is not None else ":memory:", check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # committed means on disk: the stream entry is acked after
        self._db.execute("CREATE TABLE IF NOT EXISTS features (oid TEXT PRIMARY KEY, etag TEXT, data BLOB)")
        self._lock = threading.Lock()  # one connection, shared by the merger and the search threads

    def write(self, puts: Sequence[tuple[str, str, bytes]], deletes: Iterable[str]) -> None:
        """One transaction: ``puts`` are ``(object id, etag, features)``; objects in ``deletes`` lose their row."""
        removed = [(oid,) for oid in deletes]
        if not puts and not removed:
            return
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany("DELETE FROM features WHERE oid = ?", removed)
                self._db.executemany("INSERT OR REPLACE INTO features VALUES (?, ?, ?)", puts)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def get(self, wanted: Sequence[tuple[str, str]]) -> dict[str, bytes]:
        """The features of each ``(object id, etag)`` whose row has that etag."""
        if not wanted:
            return {}
        etags = dict(wanted)
        marks = ",".join("?" * len(etags))
        with self._lock:
            rows = self._db.execute(f"SELECT oid, etag, data FROM features WHERE oid IN ({marks})", list(etags))
            return {oid: bytes(data) for oid, etag, data in rows if etags.get(oid) == etag}

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM features").fetchone()[0])

    def close(self, remove: bool = False) -> None:
        """Close; ``remove`` also deletes the file (a retired or abandoned generation)."""
        with self._lock:
            self._db.close()
        if remove and self.path is not None:
            for suffix in ("", "-wal", "-shm"):
                Path(str(self.path) + suffix).unlink(missing_ok=True)
