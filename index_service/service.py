"""The index service's resources, built once per process in the app's lifespan and passed to handlers."""

from __future__ import annotations

import logging
import threading
from typing import Any

import redis

from bucketlens.keys import Keys
from bucketlens.redis_client import connect
from bucketlens.s3 import make_client
from bucketlens.settings import Settings
from workers.embedders import Embedder, load_embedder
from workers.embedders.efficientnet import DIMS

from .merger import Merger
from .vector_index import VectorIndex

log = logging.getLogger(__name__)


class Service:
    def __init__(self, settings: Settings, embedder: Embedder | None = None) -> None:
        self.settings = settings
        self.keys = Keys(settings.namespace)
        self.redis = connect(settings.redis_url)
        self.presigner = make_client(settings, endpoint=settings.presign_endpoint)
        self.embedder = embedder
        self.index = VectorIndex(settings.model, DIMS[settings.model], generation=1)
        self.merger = Merger(self.redis, self.keys, self._index_for, batch=settings.merge_batch)
        self._loader = threading.Thread(target=self._load, name="loader", daemon=True)

    def start(self) -> None:
        self._loader.start()

    def _load(self) -> None:
        """Heavy start-up off the event loop: the model (warmed up) and the replay of the stream."""
        try:
            self.redis.hsetnx(self.keys.generations, str(self.index.generation), self.index.model)
        except redis.RedisError as exc:
            log.warning("cannot register the serving generation yet: %s", exc)
        self.merger.start()
        if self.embedder is None:
            self.embedder = load_embedder(self.settings)

    def _index_for(self, generation: int) -> VectorIndex | None:
        return self.index if generation == self.index.generation else None

    def ready(self) -> tuple[bool, str]:
        if self.embedder is None:
            return False, "loading the model"
        if not self.merger.caught_up.is_set():
            return False, "replaying the result stream"
        try:
            self.redis.ping()
        except redis.RedisError as exc:
            return False, f"Redis unreachable: {exc}"
        return True, "ready"

    def presign(self, bucket: str, key: str) -> str:
        url: str = self.presigner.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=3600
        )
        return url

    def stats(self) -> dict[str, Any]:
        return {
            "vectors": len(self.index),
            "model": self.index.model,
            "dim": self.index.dim,
            "index_type": self.index.index_type,
            "generation": self.index.generation,
            "last_applied_id": self.merger.last_id,
            "applied_entries": self.merger.applied,
            "last_snapshot": None,
        }

    def close(self) -> None:
        self.merger.stop()
        self.redis.close()
