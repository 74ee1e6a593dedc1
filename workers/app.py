"""``create_celery(settings)``: the worker's Celery app, its tasks and its per-process resources."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal

from celery import Celery
from celery.exceptions import Reject
from celery.signals import (
    task_postrun,
    task_prerun,
    task_received,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
)

from bucketlens.celery_config import celery_config
from bucketlens.keys import Keys
from bucketlens.redis_client import connect
from bucketlens.settings import Settings

from .celery_logging import log_outages_once
from .heartbeat import Deliveries, Request
from .pipeline import Pipeline
from .tasks import register_tasks

log = logging.getLogger(__name__)
# Set by a pool process that cannot load its model, before it stops the worker: shared memory made before the pool
# forks, read by the main process once Celery returns (``bucketlens worker`` exits 1: it exited 0, which systemd's
# Restart=on-failure and a shell's `&&` read as a clean stop: review 86).
MODEL_FAILED = multiprocessing.Value("b", 0, lock=False)


def create_celery(settings: Settings) -> Celery:
    app = Celery("bucketlens")
    app.conf.update(celery_config(settings))
    log_outages_once()
    resources: dict[str, Pipeline] = {}

    def pipeline() -> Pipeline:
        # Built in the process that runs tasks (after the prefork pool forks), once.
        if "pipeline" not in resources:
            resources["pipeline"] = Pipeline(settings)
        return resources["pipeline"]

    @worker_process_init.connect(weak=False)
    def warm_up(**_: object) -> None:
        try:
            pipeline().heartbeat.start()  # load and warm the model before the first task arrives, then say so
        except Exception:
            # A worker that cannot embed (no CUDA where asked, a broken model file) must not take tasks: each
            # would fail at once and be acknowledged, lost. The main process shuts down and gives back what it
            # holds; tasks already handed to this process go back too (``ready_pipeline``).
            log.critical("this worker cannot load its model and shuts down; its tasks go back to the queue",
                         exc_info=True)
            MODEL_FAILED.value = 1
            os.kill(os.getppid(), signal.SIGTERM)

    def ready_pipeline() -> Pipeline:
        try:
            return pipeline()
        except Exception as exc:
            raise Reject(f"this worker cannot load its model: {type(exc).__name__}: {exc}", requeue=True) from exc

    @task_prerun.connect(weak=False)
    def batch_started(args: tuple[object, ...] = (), **_: object) -> None:
        refs = args[0] if args else []
        if "pipeline" in resources:  # not when it could not be built: the task gives the batch back
            resources["pipeline"].heartbeat.busy(len(refs) if isinstance(refs, list) else 0)  # GET /queues shows it

    @task_postrun.connect(weak=False)
    def batch_ended(**_: object) -> None:
        if "pipeline" in resources:
            resources["pipeline"].heartbeat.idle()

    @worker_process_shutdown.connect(weak=False)
    def leave(**_: object) -> None:
        if "pipeline" in resources:
            resources["pipeline"].heartbeat.stop()  # leave the live-worker list at once

    # The main process receives, acknowledges and requeues tasks: it says which deliveries it holds.
    deliveries = Deliveries(connect(settings.redis_url), Keys(settings.namespace))

    @worker_ready.connect(weak=False)
    def listed(**_: object) -> None:
        deliveries.start()

    @task_received.connect(weak=False)
    def held(request: Request | None = None, **_: object) -> None:
        if request is not None:
            deliveries.hold(request)

    @worker_shutdown.connect(weak=False)
    def gone(**_: object) -> None:
        deliveries.stop()  # kombu restores what it still holds as it closes the channel

    register_tasks(app, settings, ready_pipeline)
    return app
