"""Send object references to the workers (Celery, by task name) and delete entries to the result stream."""

from __future__ import annotations

import time
from typing import Iterable

import redis
from celery import Celery

from bucketlens.celery_config import celery_config
from bucketlens.keys import EMBED_TASK, Keys
from bucketlens.records import Records
from bucketlens.schemas import ObjectRef, ResultEntry
from bucketlens.settings import Settings

from .errors import NoGeneration


class Publisher:
    """Everything that writes work into Redis on behalf of ingest, rebuilds and failure retries."""

    def __init__(self, settings: Settings, client: redis.Redis) -> None:
        self.settings = settings
        self.keys = Keys(settings.namespace)
        self.redis = client
        self.records = Records(client, self.keys)
        self.celery = Celery("bucketlens-publisher", set_as_current=False)
        self.celery.conf.update(celery_config(settings))

    def generations(self) -> list[int]:
        """Generations that must receive live events: the serving one and, during a rebuild, the shadow.

        Never guessed: a task tagged with a generation nobody merges would be embedded and then dropped."""
        found = sorted(int(g) for g in self.redis.hkeys(self.keys.generations))
        if not found:
            raise NoGeneration("no index generation is registered in Redis: the index service has not started, "
                               "or Redis lost its data and the index service has not noticed yet")
        return found

    def send_embeds(self, refs: Iterable[ObjectRef], queue: str | None = None) -> int:
        """Queue embed tasks of at most ``batch_size`` references; returns the number of tasks sent.

        Returns only once every task is in Redis, so callers may acknowledge the event.
        """
        refs = list(refs)
        if not refs:
            return 0
        queued = time.time()  # lets the index service tell a lost task from one in flight (index_service/orphans.py)
        for start in range(0, len(refs), 1000):
            pipe = self.redis.pipeline(transaction=False)
            self.records.mark_pending(pipe, refs[start : start + 1000], queued)  # (a resent ref keeps its time)
            pipe.execute()
        size = self.settings.batch_size  # (at least 1: settings.py)
        tasks = 0
        for start in range(0, len(refs), size):
            chunk = [ref.to_json() for ref in refs[start : start + size]]
            self.celery.send_task(EMBED_TASK, args=[chunk], queue=queue or self.keys.live_queue)
            tasks += 1
        return tasks

    def write_deletes(self, refs: Iterable[ObjectRef]) -> None:
        """Deletes need no worker: they go straight to the result stream, 1,000 to a pipeline (a reconcile's 250k
        in one held ~0.5 GB and reached Redis all at once after 22 s: a scale check)."""
        refs = list(refs)
        for start in range(0, len(refs), 1000):
            pipe = self.redis.pipeline(transaction=False)
            for ref in refs[start : start + 1000]:
                entry = ResultEntry("delete", ref.bucket, ref.key, ref.etag, ref.sequencer, ref.order, ref.generation)
                pipe.xadd(self.keys.results, entry.to_fields())
            self.records.settle(pipe, refs[start : start + 1000])  # clears an older version's failure record
            pipe.execute()

    def close(self) -> None:
        self.celery.close()
