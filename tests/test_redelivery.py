"""Restoring a dead worker's tasks against a real Redis and kombu's own transport: a task that a live worker's main
process holds stays with it however old; one that no live worker holds goes back to its queue after the grace."""

from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Any, Iterator

import pytest
from kombu import Connection

from bucketlens.redis_client import connect
from bucketlens.schemas import ObjectRef
from index_service.queues import queue_report
from index_service.redelivery import GRACE_S, Redelivery
from infra.stack import Stack
from ingest.publisher import Publisher
from workers.heartbeat import Deliveries


@pytest.fixture
def publisher(stack: Stack) -> Iterator[Publisher]:
    settings = dataclasses.replace(stack.settings, namespace=f"r{uuid.uuid4().hex[:8]}", batch_size=1)
    publisher = Publisher(settings, connect(settings.redis_url))
    yield publisher
    publisher.close()


def take(connection: Connection, queue: str) -> Any:
    """What a worker's main process does with a task: take it from the queue, unacknowledged."""
    message = connection.default_channel.basic_get(queue, no_ack=False)
    assert message is not None, f"nothing in {queue}"
    return message


@dataclasses.dataclass
class Received:
    """What Celery's main process makes of a delivery (``celery.worker.request.Request``), read by ``Deliveries``."""

    message: Any
    acknowledged: bool = False  # asked the broker to acknowledge or reject it


def test_only_tasks_no_live_worker_holds_go_back_after_the_grace(publisher: Publisher) -> None:
    keys, redis = publisher.keys, publisher.redis
    refs = [ObjectRef("b", f"k{i}", "e") for i in range(2)]
    publisher.send_embeds(refs)
    with publisher.celery.connection_for_read() as connection:
        alive, dead = take(connection, keys.live_queue), take(connection, keys.live_queue)
        worker = Deliveries(redis, keys)
        worker.hold(Received(alive))  # the other one's worker died before it could say so (or its record expired)
        try:
            report = queue_report(redis, keys)
            assert (report["unacked"], report["unacked_live"], report["unacked_dead"]) == (2, 1, 1)
            assert report["queues"][keys.live_queue]["depth"] == 0

            redelivery = Redelivery(redis, keys, publisher.celery)
            assert redelivery.check(now=100.0) == []  # unheld from now on: the grace starts
            assert redelivery.check(now=100.0 + GRACE_S / 2) == []
            assert redelivery.check(now=100.0 + GRACE_S) == [dead.delivery_tag]
            assert redelivery.check(now=1000.0) == []  # a live worker's task, however old, stays with it

            report = queue_report(redis, keys)
            assert (report["unacked"], report["unacked_live"], report["unacked_dead"]) == (1, 1, 0)
            assert report["queues"][keys.live_queue]["depth"] == 1
            assert report["events"]["tasks_restored"] == 1
            again = take(connection, keys.live_queue)  # the next worker gets the same task, marked redelivered
            assert again.payload == dead.payload and again.headers["redelivered"] is True

            alive.ack()
            worker.beat()  # an acknowledged task leaves the worker's record
            assert json.loads(redis.get(keys.consumer(worker.id)))["deliveries"] == []
            again.ack()
        finally:
            worker.stop()
    assert queue_report(redis, keys)["unacked"] == 0


def test_a_dead_workers_held_tasks_go_back_once_its_record_expired(publisher: Publisher) -> None:
    keys, redis = publisher.keys, publisher.redis
    publisher.send_embeds([ObjectRef("b", "k", "e")])
    with publisher.celery.connection_for_read() as connection:
        message = take(connection, keys.live_queue)
        worker = Deliveries(redis, keys)
        worker.hold(Received(message))
        redelivery = Redelivery(redis, keys, publisher.celery)
        assert redelivery.check(now=0.0) == [] and redelivery.check(now=GRACE_S) == []
        worker._stop.set()  # the worker dies: no more beats, and its record expires (HEARTBEAT_TTL_S, here at once)
        redis.delete(keys.consumer(worker.id))
        assert queue_report(redis, keys)["unacked_dead"] == 1
        assert redelivery.check(now=GRACE_S + 1) == []
        assert redelivery.check(now=2 * GRACE_S + 1) == [message.delivery_tag]
        message.ack()  # a worker that was only frozen acknowledges late: nothing breaks, nothing is doubled
        report = queue_report(redis, keys)
        assert report["unacked"] == 0 and report["queues"][keys.live_queue]["depth"] == 1


def test_a_task_whose_acknowledgement_redis_never_got_goes_back(publisher: Publisher) -> None:
    """Redis restarting as a worker acknowledged a finished task: Celery logged "Couldn't ack" and marked the request
    acknowledged, the message stayed in kombu's ``unacked`` hash, and the live worker said it held it: ``unacked`` 1
    with every worker idle until the visibility timeout, 10 minutes (an independent check)."""
    keys, redis = publisher.keys, publisher.redis
    publisher.send_embeds([ObjectRef("b", "k", "e")])
    with publisher.celery.connection_for_read() as connection:
        message = take(connection, keys.live_queue)
        request = Received(message)
        worker = Deliveries(redis, keys)
        worker.hold(request)
        try:
            assert queue_report(redis, keys)["unacked_live"] == 1
            request.acknowledged = True  # the ack was sent to a Redis that was going down
            worker.beat()
            assert json.loads(redis.get(keys.consumer(worker.id)))["deliveries"] == []
            assert queue_report(redis, keys)["unacked_dead"] == 1
            redelivery = Redelivery(redis, keys, publisher.celery)
            assert redelivery.check(now=0.0) == [] and redelivery.check(now=GRACE_S) == [message.delivery_tag]
            again = take(connection, keys.live_queue)
            assert again.payload == message.payload
            again.ack()
        finally:
            worker.stop()
    assert queue_report(redis, keys)["unacked"] == 0
