"""Read the result stream with a consumer group and apply its entries, batch by batch, to the index."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, cast

import redis

from bucketlens.keys import Keys
from bucketlens.outage import FailureRun
from bucketlens.records import record, remove_unchanged
from bucketlens.redis_client import text
from bucketlens.schemas import NewerVersion, ResultEntry, SchemaError, object_id

log = logging.getLogger(__name__)
# A batch another consumer of the group read this long ago and has not acknowledged is taken over: its reader lost
# the writer lease after reading it (a paused replica wakes, reads, then finds the lease gone) or died holding it.
CLAIM_IDLE_MS = 2000

# Move the group (KEYS[1], ARGV[1]) back to ARGV[2] only if it has gone past it: a writer that lost its lease rewinds
# for the current one, which may not have read that far yet (a FAISS writer replaying from its snapshot): moving it
# forward skipped what lay between, for good. Ids compare as decimal text, exactly, whatever their size.
_REWIND = """
local function after(a, b)
  local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
  if ams ~= bms then
    if #ams ~= #bms then return #ams > #bms end
    return ams > bms
  end
  if #aseq ~= #bseq then return #aseq > #bseq end
  return aseq > bseq
end
for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local fields = {}
  for i = 1, #group, 2 do fields[group[i]] = group[i + 1] end
  if fields['name'] == ARGV[1] then
    if after(fields['last-delivered-id'], ARGV[2]) then
      redis.call('XGROUP', 'SETID', KEYS[1], ARGV[1], ARGV[2])
      return 1
    end
    return 0
  end
end
return 0
"""


class Merger:
    """Runs in its own thread; ``caught_up`` is set once the stream has been replayed to its end.

    ``apply`` receives each batch of decoded entries; ``after`` runs once the batch is acknowledged and
    ``last_id`` covers it (the snapshot policy hooks in there, so a snapshot's stream position is exact).
    ``last_id`` is where this merger's own reads of new entries have reached: a claimed batch lies
    behind the group's position, maybe past entries not yet read (a writer restarted from an older snapshot claims
    the batch it was killed in before it reads the entries in between), so it never moves ``last_id``.
    ``may_write`` is asked before each batch is applied: False (the writer lease is lost) stops the merger, the
    batch unapplied and unacknowledged: the current writer claims it (``CLAIM_IDLE_MS``) and applies it.
    An entry of a later version than this release reads (workers upgraded first) is held, not skipped: left
    unacknowledged, so checkpoints do not trim past it (``Service._oldest_pending``) and the upgraded index service
    claims and applies it. Skipped, it was lost until the object was embedded again.
    """

    def __init__(self, client: redis.Redis, keys: Keys, apply: Callable[[list[ResultEntry]], None],
                 after: Callable[[], None] = lambda: None, start_id: str = "0", batch: int = 512,
                 consumer: str = "index-1", may_write: Callable[[], bool] = lambda: True,
                 idle: Callable[[], None] = lambda: None,
                 owed: Callable[[list[ResultEntry]], set[str]] = lambda entries: set()) -> None:
        self.redis = client
        self.keys = keys
        self.apply = apply
        self.after = after  # after each batch applied
        self.idle = idle  # after each read that found nothing new (every ~0.5 s while the stream is quiet)
        self.last_id = start_id
        self.batch = batch
        self.consumer = consumer
        self.may_write = may_write
        self.owed = owed  # of a batch just applied, the objects whose version another generation still waits for
        self.caught_up = threading.Event()
        self.applied = 0
        self.malformed = 0
        self.held: set[str] = set()  # ids of the entries of a later version, left unacknowledged
        self.failing = StepFailures()  # steps that raised (the features folder's disk full): /readyz, /stats
        self._claim_from = "0-0"  # where the next claim starts: held entries never hide other claimable ones
        self._stop = threading.Event()
        self._rewind = threading.Event()
        self._thread = threading.Thread(target=self._run, name="merger", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def running(self) -> bool:
        """Started and not stopped (a lost lease stops it)."""
        return self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def rewind(self) -> None:
        """Read the stream again from its start: Redis lost its data, and the new stream's ids need not sort after
        the old ones (another server's clock). Entries read twice are applied twice, to the same effect."""
        self._rewind.set()

    def _ensure_group(self) -> None:
        """Position the group at what this process has applied: a restart replays everything after it."""
        try:
            self.redis.xgroup_create(self.keys.results, self.keys.merger_group, id=self.last_id, mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
            self.redis.xgroup_setid(self.keys.results, self.keys.merger_group, id=self.last_id)

    def _run(self) -> None:
        down_since: float | None = None
        delay = 0.1
        grouped = False
        while not self._stop.is_set():
            try:
                if self._rewind.is_set():
                    self._rewind.clear()
                    self.last_id, grouped = "0", False
                    self.held.clear()  # (Redis lost them with the stream)
                    self._claim_from = "0-0"
                if not grouped:
                    self._ensure_group()
                    grouped = True
                self.step(block_ms=500)
                self.failing.worked()
                if down_since is not None:
                    log.info("reachable again after %.1f s; merging resumed", time.monotonic() - down_since)
                    down_since, delay = None, 0.1
            except redis.ResponseError as exc:  # answered, but the stream or its group is gone (Redis lost data)
                log.warning("result stream unreadable, re-creating its consumer group: %s", exc)
                grouped = False
                self._stop.wait(0.5)
            except (redis.RedisError, ConnectionError) as exc:  # ConnectionError: the index server (Milvus)
                if down_since is None:  # once per outage
                    log.warning("merger cannot reach Redis or the index server, retrying with backoff: %s", exc)
                    down_since = time.monotonic()
                grouped = False  # after a Redis restart, re-position the group at what was applied
                self._stop.wait(delay)
                delay = min(delay * 2, 5.0)
            except Exception as exc:
                self.failing.failed(exc)
                grouped = False
                self._stop.wait(1.0)

    def _read(self, block_ms: int | None) -> tuple[list[tuple[Any, dict[bytes, bytes]]], bool]:
        """The next batch and whether it was claimed: entries other consumers read and left unacknowledged for
        ``CLAIM_IDLE_MS`` first (they were delivered, so nobody else would ever apply them), then new ones."""
        # Ids first: the entries held here are claimed again (their idle time restarts) but neither fetched nor
        # handed back as a batch (thousands of them, claimed in turn every 2 s, kept new entries from being read).
        ids: Any = self.redis.xautoclaim(self.keys.results, self.keys.merger_group, self.consumer,
                                         min_idle_time=CLAIM_IDLE_MS, start_id=self._claim_from, count=self.batch,
                                         justid=True)
        # (redis-py drops XAUTOCLAIM's cursor with JUSTID: the next claim starts after the last id a full one gave)
        self._claim_from = stream_after(text(ids[-1])) if len(ids) == self.batch else "0-0"
        if fresh := [i for i in ids if text(i) not in self.held]:
            claimed: Any = self.redis.xclaim(self.keys.results, self.keys.merger_group, self.consumer,
                                             min_idle_time=0, message_ids=fresh)
            if claimed := [(i, fields) for i, fields in claimed if fields is not None]:
                log.warning("claimed %d stream entries read and never acknowledged (a batch that could not be "
                            "applied, or another replica's)", len(claimed))
                return claimed, True
        response: Any = self.redis.xreadgroup(
            self.keys.merger_group, self.consumer, {self.keys.results: ">"}, count=self.batch, block=block_ms
        )
        return (list(response[0][1]) if response else []), False

    def step(self, block_ms: int | None = None) -> int:
        """Read and apply one batch; returns how many entries were read."""
        messages, claimed = self._read(block_ms)
        if not messages:
            self.caught_up.set()
            self.idle()
            return 0
        if not self.may_write():
            log.warning("the writer lease is lost: merging stops before the next batch (another replica writes)")
            self._stop.set()
            return 0
        entries: list[ResultEntry] = []
        held: list[str] = []
        for message_id, fields in messages:
            try:
                entries.append(ResultEntry.from_fields(fields))
            except NewerVersion as exc:
                held.append(text(message_id))
                if held[-1] not in self.held:
                    log.error("holding stream entry %s, unapplied and unacknowledged, until an upgraded index service "
                              "applies it: %s (upgrade the index service; its checkpoints keep the stream from this "
                              "entry on)", held[-1], exc)
            except SchemaError as exc:
                self.malformed += 1
                log.error("skipping malformed stream entry: %s", exc)
        self.held.update(held)
        self.apply(entries)
        if not self.may_write():
            self._yield_after_overlap(messages[0][0])
            return 0
        self._clear_pending(entries)
        ids = [message_id for message_id, _ in messages]
        if done := [i for i in ids if text(i) not in held]:
            self.redis.xack(self.keys.results, self.keys.merger_group, *done)
        newest = text(ids[-1])
        if not claimed and stream_order(newest) > stream_order(self.last_id):
            self.last_id = newest  # (never a claimed batch's: unread entries may lie between, which a checkpoint trims)
        self.applied += len(messages) - len(held)
        if len(messages) < self.batch and not claimed:  # a short read of new entries: the stream's end
            self.caught_up.set()
        self.after()
        return len(messages)

    def _yield_after_overlap(self, first_id: bytes | str) -> None:
        """The lease went while this batch was being written (this process was paused past it): another writer may
        have applied newer entries that the batch just overwrote, and no index server offers a conditional write to
        prevent it. Rewind the group to before the batch and stop: the current writer reads everything from there
        again, and the order rule puts the newer versions back. (If a checkpoint of that writer trimmed them from the
        stream meanwhile, only a reconcile can: logged, and counted as ``writer_overlaps``.)"""
        before = stream_before(text(first_id))
        moved = self.redis.register_script(_REWIND)(keys=[self.keys.results], args=[self.keys.merger_group, before])
        self.redis.hincrby(self.keys.counters, "writer_overlaps", 1)
        if moved:
            log.error("the writer lease was lost while a batch was written; the stream is rewound to %s for the "
                      "current writer to apply again (run a reconcile if its checkpoint trimmed past it)", before)
        else:
            log.error("the writer lease was lost while a batch was written; the current writer has not read past %s "
                      "yet and applies it after this one", before)
        self._stop.set()

    def _clear_pending(self, entries: list[ResultEntry]) -> None:
        """Drop the 'pending' mark of objects whose pending version was just settled, in every generation fed."""
        if not entries:
            return
        oids = [object_id(e.bucket, e.key) for e in entries]
        marks = cast(list[bytes | None], self.redis.hmget(self.keys.pending, oids))  # (the client answers bytes)
        owed = self.owed(entries)
        done = {oid.encode(): mark for oid, mark, e in zip(oids, marks, entries)
                if mark is not None and (found := record(mark)) is not None and _settles(found, e) and oid not in owed}
        if done:  # (only marks still as read: a newer version's, written meanwhile, went too: review 68)
            remove_unchanged(self.redis, self.keys.pending, done)


def _settles(pending: dict[str, str], entry: ResultEntry) -> bool:
    if entry.op == "delete":
        return int(pending["order"]) <= entry.order
    return pending["etag"] == entry.etag


def stream_order(stream_id: str) -> tuple[int, int]:
    """A stream id as a sortable pair (milliseconds, sequence)."""
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def stream_before(stream_id: str) -> str:
    """The greatest id below ``stream_id``: a position from which a read gets ``stream_id`` again."""
    ms, seq = stream_order(stream_id)
    return f"{ms}-{seq - 1}" if seq else f"{ms - 1}-18446744073709551615"


def stream_after(stream_id: str) -> str:
    """The least id above ``stream_id``."""
    ms, seq = stream_order(stream_id)
    return f"{ms}-{seq + 1}"


class StepFailures(FailureRun):
    """A run of merge steps that raised (the features folder's disk full, a bug): the batch stays unacknowledged and
    is tried again every second, its objects searchable but not made durable, and the result stream grows. It was
    a 30-line traceback every second and nothing else: /readyz ready, /stats and `status` quiet (review 20). The first
    failure of a run is logged with its traceback, then one line a minute; ``/readyz`` answers 503 once the run has
    lasted ``snapshot_failure_grace_s`` (``Service.ready``)."""

    def __init__(self) -> None:
        super().__init__()
        self._said = 0.0  # monotonic: the last line logged

    def failed(self, exc: BaseException) -> bool:
        begins = super().failed(exc)
        if begins:
            self._said = time.monotonic()
            log.exception("merge step failed; the batch is tried again every second, its stream entries stay "
                          "unacknowledged meanwhile")
        elif time.monotonic() - self._said >= 60:
            self._said = time.monotonic()
            log.error("merge steps failing for %.0f s: %s", self.failing_s(), self.error)
        return begins

    def worked(self) -> float | None:
        if (lasted := super().worked()) is not None:
            log.warning("merge steps work again after failing for %.0f s", lasted)
        return lasted

    def unready_reason(self, grace_s: float) -> str | None:
        if not self.lasted(grace_s):
            return None
        return (f"merge steps failing for {self.failing_s():.0f} s ({self.error}): new results are searchable but "
                "not stored, and the result stream grows; see the index service's log")
