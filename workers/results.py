"""Write what a batch produced to Redis: one stream entry per embedded object, failure records, stage timings."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Sequence

import redis

from bucketlens.keys import STAGE_BUCKETS, Keys, stage_bucket_field
from bucketlens.schemas import ObjectRef, ResultEntry, failure_record

if TYPE_CHECKING:
    from .pipeline import Embedded


# KEYS[1]: failure records, KEYS[2]: pending marks; ARGV[1]: n, then n (object id, etag, order) of embedded versions,
# then (object id, etag) of versions settled otherwise (failed, skipped). A success clears a failure record of its
# version (its etag: a listing orders the same version a little apart from its event) or of an older one, never a
# newer version's (a late success of v1 deleted corrupt v2's record); a settled version drops its own pending mark,
# never another version's (a skipped v1 dropped v2's, and a lost v2 task was then never sent again). Orders are
# decimal strings, compared as such: Lua's numbers lose digits past 2^53.
_SETTLE = """
local function not_newer(order, than)
  if #order ~= #than then return #order < #than end
  return order <= than
end
local function read(raw)  -- a record that is not ours (no JSON object with an etag) goes, as any record did before
  local ok, record = pcall(cjson.decode, raw)
  if ok and type(record) == 'table' and type(record['etag']) == 'string' then return record end
  return nil
end
local n = tonumber(ARGV[1])
for i = 2, 3 * n, 3 do
  local raw = redis.call('HGET', KEYS[1], ARGV[i])
  if raw then
    local record = read(raw)
    if not record or record['etag'] == ARGV[i + 1] or not_newer(tostring(record['order'] or '0'), ARGV[i + 2]) then
      redis.call('HDEL', KEYS[1], ARGV[i])
    end
  end
end
for i = 3 * n + 2, #ARGV, 2 do
  local raw = redis.call('HGET', KEYS[2], ARGV[i])
  if raw then
    local mark = read(raw)
    if not mark or mark['etag'] == ARGV[i + 1] then
      redis.call('HDEL', KEYS[2], ARGV[i])
    end
  end
end
"""


class ResultWriter:
    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.redis = client
        self.keys = keys
        self._settle = client.register_script(_SETTLE)

    def write(
        self,
        embedded: Sequence[Embedded],
        failed: Sequence[tuple[ObjectRef, str, str]],
        skipped: Sequence[ObjectRef],
        timings: dict[str, float],
        attempts: int = 1,
    ) -> None:
        """One pipeline: stream entries, cleared or new failure records, pending marks, timings."""
        now = time.time()
        pipe = self.redis.pipeline(transaction=True)
        for item in embedded:
            ref = item.ref
            entry = ResultEntry("upsert", ref.bucket, ref.key, ref.etag, ref.sequencer, ref.order,
                                ref.generation, item.model, item.vector, item.features, item.pixels, item.labels,
                                ref.modified)
            pipe.xadd(self.keys.results, entry.to_fields())
        for ref, op in [(r, "failed") for r, _, _ in failed] + [(r, "skipped") for r in skipped]:
            note = ResultEntry(op, ref.bucket, ref.key, ref.etag, ref.sequencer, ref.order, ref.generation)
            pipe.xadd(self.keys.results, note.to_fields())
        for ref, reason, message in failed:
            pipe.hset(self.keys.failures, ref.object_id, failure_record(ref, reason, message, attempts, now))
            pipe.hincrby(self.keys.counters, f"failed:{reason}", 1)
        settled = [r for r, _, _ in failed] + list(skipped)
        if embedded or settled:
            succeeded = [x for item in embedded for x in (item.ref.object_id, item.ref.etag, str(item.ref.order))]
            others = [x for ref in settled for x in (ref.object_id, ref.etag)]
            self._settle(keys=[self.keys.failures, self.keys.pending], args=[len(embedded), *succeeded, *others],
                         client=pipe)
        if embedded:
            pipe.hincrby(self.keys.counters, "embedded", len(embedded))
        self._observe(pipe, timings)
        pipe.execute()

    def record_timings(self, timings: dict[str, float]) -> None:
        """Stage timings measured after the batch was written (the write stage itself)."""
        pipe = self.redis.pipeline(transaction=True)
        self._observe(pipe, timings)
        pipe.execute()

    def _observe(self, pipe: redis.client.Pipeline, timings: dict[str, float]) -> None:
        """Add one observation per stage to its histogram in ``Keys.stages`` (the index service exports it)."""
        for stage, seconds in timings.items():
            pipe.hincrbyfloat(self.keys.stages, f"{stage}:seconds", seconds)
            pipe.hincrby(self.keys.stages, f"{stage}:count", 1)
            for bound in STAGE_BUCKETS:
                if seconds <= bound:
                    pipe.hincrby(self.keys.stages, stage_bucket_field(stage, bound), 1)
