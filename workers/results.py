"""Write what a batch produced to Redis: one stream entry per embedded object, failure records, stage timings."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Collection, Sequence

import redis

from bucketlens.keys import STAGE_BUCKETS, Keys, stage_bucket_field
from bucketlens.records import Records
from bucketlens.schemas import ObjectRef, ResultEntry, failure_record

if TYPE_CHECKING:
    from .pipeline import Embedded


class ResultWriter:
    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.redis = client
        self.keys = keys
        self.records = Records(client, keys)

    def write(
        self,
        embedded: Sequence[Embedded],
        failed: Sequence[tuple[ObjectRef, str, str]],
        skipped: Sequence[ObjectRef],
        timings: dict[str, float],
        attempts: int = 1,
        abandoned: Collection[int] = (),
    ) -> None:
        """One pipeline: stream entries, cleared or new failure records, pending marks, timings. A failure of an
        ``abandoned`` generation (a rebuild cancelled or failed while the batch ran) writes no record: it would
        name an object that the serving generation holds as failed, for good (review 57)."""
        now = time.time()
        pipe = self.redis.pipeline(transaction=True)
        for item in embedded:
            ref = item.ref
            entry = ResultEntry("upsert", ref.bucket, ref.key, ref.etag, ref.sequencer, ref.order,
                                ref.generation, item.model, item.vector, item.features, item.pixels, item.labels,
                                ref.modified)
            pipe.xadd(self.keys.results, entry.to_fields())
        for ref, op, reason in [(r, "failed", why) for r, why, _ in failed] + [(r, "skipped", "") for r in skipped]:
            note = ResultEntry(op, ref.bucket, ref.key, ref.etag, ref.sequencer, ref.order, ref.generation,
                               reason=reason)
            pipe.xadd(self.keys.results, note.to_fields())
        self.records.record_failures(pipe, [(ref, failure_record(ref, reason, message, attempts, now))
                                             for ref, reason, message in failed if ref.generation not in abandoned])
        for _, reason, _ in failed:
            pipe.hincrby(self.keys.counters, f"failed:{reason}", 1)
        self.records.settle(pipe, [item.ref for item in embedded], [r for r, _, _ in failed] + list(skipped))
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
