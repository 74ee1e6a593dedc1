"""One writer per namespace: the index service replicas that share a Milvus index all answer queries, and the one
holding this Redis lease merges the result stream (issue 10, "many API replicas, one writer").

The lease is a key holding the writer's name with a time to live; the writer renews it every third of that time
and checks it before each merge batch, so a writer that was paused past its lease (SIGSTOP, a long GC, a network
partition from Redis) finds it gone before its next write and stops merging. A pause between that check and the
batch's upsert cannot be prevented (Milvus has no conditional write): the stale batch may overwrite newer versions
the new writer applied meanwhile (seen in tests/test_replicas.py). So the writer checks again after each batch, and
a writer that lost the lease during one rewinds the stream for the new writer to apply again (``Merger``), where
the order rule puts the newer versions back; what a checkpoint trimmed meanwhile is left to reconcile.
"""

from __future__ import annotations

import redis

from bucketlens.redis_client import text

# KEYS[1] the lease, ARGV[1] the holder, ARGV[2] the TTL in ms: extend it if we hold it.
_RENEW = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


class WriterLease:
    def __init__(self, client: redis.Redis, key: str, holder: str, ttl_s: float) -> None:
        assert ttl_s > 0, "a lease needs a positive time to live"
        self.redis, self.key, self.holder = client, key, holder
        self.ttl_ms = int(ttl_s * 1000)

    def acquire(self, force: bool = False) -> bool:
        """Take the lease if nobody holds it, or keep it if we do (the writer calls this to renew: a lease that
        expired while Redis was down, and that nobody took, stays its own); ``force`` takes it from whoever holds it
        (a process whose index is its own: the newest one started is the one that merges)."""
        if force:
            return bool(self.redis.set(self.key, self.holder, px=self.ttl_ms))
        return bool(self.redis.set(self.key, self.holder, nx=True, px=self.ttl_ms)) or self.renew()

    def renew(self) -> bool:
        """Extend the lease; False when another replica holds it now (or nobody: it expired)."""
        return bool(self.redis.eval(_RENEW, 1, self.key, self.holder, self.ttl_ms))

    def release(self) -> None:
        self.redis.eval(_RELEASE, 1, self.key, self.holder)

    def current(self) -> str | None:
        """Who holds the lease now."""
        raw = self.redis.get(self.key)
        return text(raw)
