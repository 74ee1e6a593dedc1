"""Each object's local features (``vision.local_features``) and the near-duplicate pairs confirmed with them
(``duplicates.py``), one SQLite file per index generation, on the index service's own disk (the bucket stays
read-only to bucketlens).

Rows are keyed by object and carry the etag they were computed from: a search uses a row only when its etag is
the one the index holds, so a missing or outdated row costs a verification, never a wrong answer. The store is
written in the same merge batch as the index, and committed before the batch's stream entries are acknowledged,
so it is at least as new as any snapshot; a replay after a crash writes the same rows again. Snapshots therefore
name the store rather than copy it (tens of KB per object would make every snapshot rewrite gigabytes).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import sqlite3
import threading
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from vision import local_features

log = logging.getLogger(__name__)
# How the pairs' matches were counted (SQLite's user_version). 1: matches could be many-to-one, which linked smooth
# images (few keypoints) to unrelated photos; 2: one-to-one at a plausible scale (``local_features.inliers``); 3:
# objects of equal etags (the same bytes) were linked by pairs of ``local_features.IDENTICAL`` matches (now by
# ``identical``, whatever the version, with no pairs stored: those of a store of version 3 stay, the same links).
# A store below 2 keeps its pairs until the duplicate finder counts them again (``recount_pairs``).
ONE_TO_ONE, PAIRS_VERSION = 2, 3


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
        # Confirmed near-duplicates (a < b), and the objects (at an etag) whose neighbours have been looked at.
        self._db.execute("CREATE TABLE IF NOT EXISTS pairs (a TEXT, b TEXT, matches INTEGER, PRIMARY KEY (a, b))")
        self._db.execute("CREATE INDEX IF NOT EXISTS pairs_b ON pairs (b)")
        self._db.execute("CREATE TABLE IF NOT EXISTS checked (oid TEXT PRIMARY KEY, etag TEXT)")
        self._db.execute("CREATE INDEX IF NOT EXISTS features_etag ON features (etag, oid)")  # (``identical``)
        self.pairs_version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        if self.pairs_version < PAIRS_VERSION and (
                self.pairs_version >= ONE_TO_ONE or self._db.execute("SELECT 1 FROM pairs LIMIT 1").fetchone() is None):
            self._set_pairs_version()  # (else ``recount_pairs`` sets it, once counted)
        self._lock = threading.Lock()  # one connection, shared by the merger and the search threads
        self._closed = False  # a retired generation: searches that started on it still finish, unverified

    def write(self, puts: Sequence[tuple[str, str, bytes]], deletes: Iterable[str]) -> None:
        """One transaction: ``puts`` are ``(object id, etag, features)``; objects in ``deletes`` lose their row.
        Every object written or deleted loses its duplicate pairs: its content changed, they are looked for again."""
        removed = [(oid,) for oid in deletes]
        touched = removed + [(oid,) for oid, _, _ in puts]
        with self._lock:
            if not touched or self._closed:  # closed: a retired or abandoned generation, which nothing reads
                return
            with self._transaction():
                self._db.executemany("DELETE FROM features WHERE oid = ?", removed)
                self._db.executemany("INSERT OR REPLACE INTO features VALUES (?, ?, ?)", puts)
                self._db.executemany("DELETE FROM pairs WHERE a = ?1 OR b = ?1", touched)
                self._db.executemany("DELETE FROM checked WHERE oid = ?", touched)

    def views(self, wanted: Sequence[tuple[str, str]]) -> dict[str, list[local_features.Features]]:
        """``get``, decoded: each object's views (its image's features, then its mirror's). A damaged row is
        logged and left out: the object goes unverified rather than failing a search or a round."""
        found = {}
        for oid, data in self.get(wanted).items():
            try:
                found[oid] = local_features.decode(data)
            except ValueError as exc:
                log.warning("unusable local features of %r: %s", oid, exc)
        return found

    def add_pairs(self, checked: Sequence[tuple[str, str]], pairs: Sequence[tuple[str, str, int, str]]) -> int:
        """Record that each ``(object id, etag)`` in ``checked`` had its neighbours verified, with the confirmed
        ``pairs`` ``(a, b, matches, b's etag)`` found. Objects changed meanwhile (their row has another etag now)
        are left out, with their pairs: they are checked again. A pair whose neighbour changed meanwhile is left
        out too: it was verified against the neighbour's old image, and its re-upload had dropped its pairs
        already, so the stale pair stayed in ``/duplicates`` (an independent review). Returns how many pairs
        were kept."""
        with self._lock:
            if self._closed:
                return 0
            return self._add_pairs(checked, pairs)

    def _add_pairs(self, checked: Sequence[tuple[str, str]], pairs: Sequence[tuple[str, str, int, str]]) -> int:
        with self._transaction():
            current = {oid: etag for oid, etag, _ in self._rows([oid for oid, _ in checked] +
                                                                [x for a, b, _, _ in pairs for x in (a, b)])}
            fresh = [(oid, etag) for oid, etag in checked if current.get(oid) == etag]
            valid = {oid for oid, _ in fresh}
            kept = [(min(a, b), max(a, b), m) for a, b, m, etag in pairs if a in valid and current.get(b) == etag]
            self._db.executemany("INSERT OR REPLACE INTO checked VALUES (?, ?)", fresh)
            self._db.executemany("INSERT OR REPLACE INTO pairs VALUES (?, ?, ?)", kept)
        return len(kept)

    def inherit_pairs(self, old: FeatureStore, chunk: int = 200) -> int:
        """Copy the confirmed pairs of ``old`` (the generation a rebuild's swap retires) whose two objects have the
        same etag and the same local features here: verified on the same views, they hold whatever the model (each
        swap left ``/duplicates`` all but empty until the finder had checked the whole bucket again: 16 groups right
        after it where there had been 872, ~1.5 h at 100k objects: review 81). The objects stay unchecked here, so
        the finder still verifies the neighbours the new model proposes. Returns how many pairs were copied."""
        if old.pairs_version != PAIRS_VERSION:  # (counted the old way: the finder counts them again, or finds them)
            return 0
        copied, after = 0, ("", "")
        while True:
            pairs, before = old._page_of_pairs(after, chunk)
            if not pairs:
                return copied
            after = pairs[-1][:2]
            with self._lock:
                if self._closed:
                    return copied
                with self._transaction():
                    same = {oid for oid, *row in self._rows(list(before)) if before[oid] == tuple(row)}
                    kept = [(a, b, m) for a, b, m in pairs if a in same and b in same]
                    copied += self._db.executemany("INSERT OR IGNORE INTO pairs VALUES (?, ?, ?)", kept).rowcount

    def _page_of_pairs(self, after: tuple[str, str], limit: int
                       ) -> tuple[list[tuple[str, str, int]], dict[str, tuple[str, bytes]]]:
        """Up to ``limit`` pairs past ``after``, and their objects' rows, read together (``write`` drops an object's
        row and its pairs in one transaction)."""
        with self._lock:
            if self._closed:
                return [], {}
            pairs = list(self._db.execute("SELECT a, b, matches FROM pairs WHERE (a, b) > (?, ?) ORDER BY a, b"
                                          " LIMIT ?", (*after, limit)))
            rows = self._rows(sorted({oid for a, b, _ in pairs for oid in (a, b)}))
        return pairs, {oid: (etag, data) for oid, etag, data in rows}

    def recount_pairs(self, recounted: Sequence[tuple[str, str, int]]) -> int:
        """Store the pairs of an older count (``pairs_version`` below ``PAIRS_VERSION``) counted again: each
        ``(a, b, matches)`` keeps its new count, or goes below ``local_features.MIN_INLIERS``. Pairs that changed
        objects dropped meanwhile stay dropped. Returns how many were dropped."""
        dropped = [(a, b) for a, b, m in recounted if m < local_features.MIN_INLIERS]
        with self._lock:
            if self._closed:
                return 0
            with self._transaction():
                self._db.executemany("UPDATE pairs SET matches = ? WHERE a = ? AND b = ?",
                                     [(m, a, b) for a, b, m in recounted])
                self._db.executemany("DELETE FROM pairs WHERE a = ? AND b = ?", dropped)
                self._set_pairs_version()
        return len(dropped)

    def _set_pairs_version(self) -> None:
        self._db.execute(f"PRAGMA user_version = {PAIRS_VERSION}")
        self.pairs_version = PAIRS_VERSION

    def pairs(self, min_matches: int = 0) -> list[tuple[str, str, int]]:
        with self._lock:
            if self._closed:
                return []
            return list(self._db.execute("SELECT a, b, matches FROM pairs WHERE matches >= ?", (min_matches,)))

    def identical(self, within: str = "") -> dict[str, list[str]]:
        """Etag -> the objects of ``within`` (an object id prefix: a bucket's, or a bucket's folder) holding those
        same bytes, where there are two or more, checked by the finder or not: ``groups`` links each set whole
        (through pairs, a set of more copies than a search proposes was grouped in parts: 27 of 898 sets of ~100
        identical files split in two, review 81). 0.3 s at 1M objects, with the store's lock held; a bucket's range
        only where one is given."""
        query = ("SELECT etag, oid FROM features WHERE etag IN (SELECT etag FROM features WHERE etag != '' GROUP BY"
                 " etag HAVING count(*) > 1) ORDER BY etag, oid") if not within else (
                 "SELECT etag, oid FROM features WHERE oid >= ? AND oid < ? AND etag != '' ORDER BY etag, oid")
        with self._lock:
            if self._closed:
                return {}
            rows = self._db.execute(query, (within, within + "\U0010ffff") if within else ())
            sets = {etag: [oid for _, oid in same] for etag, same in itertools.groupby(rows, key=lambda row: row[0])}
        return {etag: oids for etag, oids in sets.items() if len(oids) > 1}

    def checked(self) -> dict[str, str]:
        with self._lock:
            if self._closed:
                return {}
            return dict(self._db.execute("SELECT oid, etag FROM checked"))

    def _rows(self, oids: list[str]) -> list[tuple[str, str, bytes]]:
        rows: list[tuple[str, str, bytes]] = []
        for start in range(0, len(oids), 500):
            part = oids[start : start + 500]
            query = f"SELECT oid, etag, data FROM features WHERE oid IN ({','.join('?' * len(part))})"
            rows += [(o, e, bytes(d)) for o, e, d in self._db.execute(query, part)]
        return rows

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):  # (a COMMIT that failed ended it: "no transaction is active"
                self._db.execute("ROLLBACK")  # hid the disk that was full)
            raise

    def get(self, wanted: Sequence[tuple[str, str]]) -> dict[str, bytes]:
        """The features of each ``(object id, etag)`` whose row has that etag."""
        if not wanted:
            return {}
        etags = dict(wanted)
        with self._lock:
            if self._closed:
                return {}
            return {oid: data for oid, etag, data in self._rows(list(etags)) if etags.get(oid) == etag}

    def __len__(self) -> int:
        with self._lock:
            if self._closed:
                return 0
            return int(self._db.execute("SELECT count(*) FROM features").fetchone()[0])

    def close(self, remove: bool = False) -> None:
        """Close; ``remove`` also deletes the file (a retired or abandoned generation)."""
        with self._lock:
            self._closed = True
            self._db.close()
        if remove and self.path is not None:
            for suffix in ("", "-wal", "-shm"):
                Path(str(self.path) + suffix).unlink(missing_ok=True)
