"""Pending marks and failure records (``Keys.pending``, ``Keys.failures``) name one version of an object (its etag
and order); each writer changes a record only for its own version or an older one, in one Lua call.

Events reach ingest out of order, and workers finish out of order: a late v1 must not replace v2's pending mark
(v2's task, if lost, would never be sent again), a late success of v1 must not clear corrupt v2's failure record,
a skipped v1 must not drop v2's mark (an independent review), and a late failure of v1 must not replace corrupt v2's
record (every reconcile sent v2 again: review 22). A record that is not ours (no JSON object with an
etag) is replaced or dropped rather than failing the caller's write. Orders are decimal strings, compared as such:
Lua's numbers lose digits past 2^53 (AWS sequencers are ~6e18).
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

import redis

from .keys import Keys
from .schemas import CONTENT_REASONS, ObjectRef, json_object

_COMMON = """
local function not_newer(order, than)
  if #order ~= #than then return #order < #than end
  return order <= than
end
local function read(raw)
  local ok, record = pcall(cjson.decode, raw)
  if ok and type(record) == 'table' and type(record['etag']) == 'string' then return record end
  return nil
end
local function replaceable(raw, etag, order)  -- no record, not ours, this version's, or an older version's
  local record = raw and read(raw)
  return not record or record['etag'] == etag or not_newer(tostring(record['order'] or '0'), order)
end
"""

# KEYS[1]: failure records, KEYS[2]: pending marks; ARGV[1]: n, then n (object id, etag, order) of versions that
# succeeded (embedded or deleted), then (object id, etag) of versions settled otherwise (failed, skipped). A success
# clears a failure record of its version (same etag: a listing orders the same version a little apart from its
# event) or of an older one; a settled version drops its own pending mark only.
_SETTLE = _COMMON + """
local n = tonumber(ARGV[1])
for i = 2, 3 * n, 3 do
  local raw = redis.call('HGET', KEYS[1], ARGV[i])
  if raw and replaceable(raw, ARGV[i + 1], ARGV[i + 2]) then redis.call('HDEL', KEYS[1], ARGV[i]) end
end
for i = 3 * n + 2, #ARGV, 2 do
  local raw = redis.call('HGET', KEYS[2], ARGV[i])
  if raw then
    local mark = read(raw)
    if not mark or mark['etag'] == ARGV[i + 1] then redis.call('HDEL', KEYS[2], ARGV[i]) end
  end
end
"""

# KEYS[1]: pending marks or failure records; ARGV: (object id, etag, order, record) per version. A record replaces
# one of the same version (a resend refreshes its time) or an older one's, never a newer version's. Of the same
# version it keeps the higher order: a listing orders a version by its time in ms, a little below its event's
# sequencer, and a record of a rebuild's listing that replaced the event's was sent again below the tombstone that
# the event's failure left, and discarded as older (review 57: `failures --retry` after a cancelled rebuild). A
# rebuild's failure (another generation) of the same version for the same reason of its bytes (``CONTENT_REASONS``:
# it fails again whenever embedded) keeps the record's time: each rebuild rewrote every such record with its own
# time, so records said the rebuild's time, not the upload's, and jumped to the top of the newest-first listing
# while it was paged (review 81: 56 of 297 listed twice, 56 never). A retry's failure (the same generation) says
# when it failed again, and other reasons' times say the last try, which their automatic retries count from.
_PUT = _COMMON + "local KEEPS_TIME = {" + ", ".join(f"{reason} = true" for reason in sorted(CONTENT_REASONS)) + """}
for i = 1, #ARGV, 4 do
  local raw = redis.call('HGET', KEYS[1], ARGV[i])
  if replaceable(raw, ARGV[i + 1], ARGV[i + 2]) then
    local old, new = raw and read(raw), ARGV[i + 3]
    if old and old['etag'] == ARGV[i + 1] then  -- this version's record again
      local ok, record = pcall(cjson.decode, new)  -- (cjson refuses what Python's json writes of a lone surrogate)
      if ok then
        local changed = false
        local kept = type(old['order']) == 'string' and old['order']
        if kept and kept:match('^%d+$') and not not_newer(kept, ARGV[i + 2]) then  -- (an order of ours: digits)
          record['order'] = kept
          changed = true
        end
        if type(record['reason']) == 'string' and record['reason'] == old['reason'] and KEEPS_TIME[record['reason']]
            and type(old['time']) == 'number' and record['generation'] ~= old['generation'] then
          record['time'] = old['time']
          changed = true
        end
        if changed then new = cjson.encode(record) end
      end
    end
    redis.call('HSET', KEYS[1], ARGV[i], new)
  end
end
"""


# KEYS[1]: a hash; ARGV: field, the value read, ... -> the fields removed (those that still held what was read)
_REMOVE_IF_UNCHANGED = """
local removed = {}
for i = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    redis.call('HDEL', KEYS[1], ARGV[i])
    removed[#removed + 1] = ARGV[i]
  end
end
return removed
"""
REMOVE_CHUNK = 500  # fields per Lua call: keeps each call short, Redis serves others in between


def remove_unchanged(client: redis.Redis, key: str, read: Mapping[bytes, bytes]) -> list[bytes]:
    """Delete each field of hash ``key`` that still holds the value ``read`` gives it (a record settled meanwhile
    stays); the fields deleted."""
    script = client.register_script(_REMOVE_IF_UNCHANGED)
    fields = list(read)
    parts = [fields[start : start + REMOVE_CHUNK] for start in range(0, len(fields), REMOVE_CHUNK)]
    return [field for part in parts for field in script(keys=[key], args=[v for f in part for v in (f, read[f])])]


def record(raw: bytes | str | None) -> dict[str, Any] | None:
    """A pending mark or failure record as Python reads it: None for none, and for one that is not ours (not a
    JSON object with an etag: something else wrote into the namespace), which every reader skips (GET /failures
    answered 500 for every page) and the Lua scripts above replace or drop."""
    value = json_object(raw)
    return value if value is not None and isinstance(value.get("etag"), str) else None


class Records:
    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.keys = keys
        self._settle = client.register_script(_SETTLE)
        self._put = client.register_script(_PUT)

    def settle(self, pipe: redis.client.Pipeline, succeeded: Sequence[ObjectRef],
               others: Sequence[ObjectRef] = ()) -> None:
        """Queue on ``pipe``: ``succeeded`` versions clear a failure record of theirs or an older version's;
        ``others`` (failed, skipped) drop their own pending mark."""
        if succeeded or others:
            args: list[str | int] = [len(succeeded)]
            args += [x for r in succeeded for x in (r.object_id, r.etag, str(r.order))]
            args += [x for r in others for x in (r.object_id, r.etag)]
            self._settle(keys=[self.keys.failures, self.keys.pending], args=args, client=pipe)

    def mark_pending(self, pipe: redis.client.Pipeline, refs: Sequence[ObjectRef], queued: float) -> None:
        """Queue on ``pipe``: a pending mark (etag, order, when queued, event time) per ref, unless a newer version's
        is there (orphans.py sends the marked version again if its task is lost)."""
        if refs:
            args = [x for r in refs for x in (r.object_id, r.etag, str(r.order), json.dumps(
                {"etag": r.etag, "order": str(r.order), "queued": queued, "event_time": r.event_time}))]
            self._put(keys=[self.keys.pending], args=args, client=pipe)

    def record_failures(self, pipe: redis.client.Pipeline, records: Sequence[tuple[ObjectRef, str]]) -> None:
        """Queue on ``pipe``: a failure record (``schemas.failure_record``) per ref, unless a newer version's is
        there."""
        if records:
            args = [x for r, raw in records for x in (r.object_id, r.etag, str(r.order), raw)]
            self._put(keys=[self.keys.failures], args=args, client=pipe)
