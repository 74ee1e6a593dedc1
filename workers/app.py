"""``create_celery(settings)``: the worker's Celery app, its tasks and its per-process resources."""

from __future__ import annotations

import logging

from celery import Celery
from celery.signals import worker_process_init

from bucketlens.celery_config import celery_config
from bucketlens.settings import Settings

from .pipeline import Pipeline
from .tasks import register_tasks

log = logging.getLogger(__name__)


def create_celery(settings: Settings) -> Celery:
    app = Celery("bucketlens")
    app.conf.update(celery_config(settings))
    resources: dict[str, Pipeline] = {}

    def pipeline() -> Pipeline:
        # Built in the process that runs tasks (after the prefork pool forks), once.
        if "pipeline" not in resources:
            resources["pipeline"] = Pipeline(settings)
        return resources["pipeline"]

    @worker_process_init.connect(weak=False)
    def warm_up(**_: object) -> None:
        pipeline()  # load and warm the model before the first task arrives

    register_tasks(app, settings, pipeline)
    return app
