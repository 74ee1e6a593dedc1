"""The text of ``bucketlens queues [--watch]``: rates from counter deltas, the ETA, workers; pure functions."""

from __future__ import annotations

from typing import Any

from bucketlens.queue_watch import Rates, duration_text, eta_text, render


def report(accepted: int = 0, embedded: int = 0, backlog: int = 0, workers: list[Any] | None = None) -> dict[str, Any]:
    return {
        "queues": {"bl.live": {"depth": 2, "by_priority": {"0": 1, "9": 1}}, "bl.rebuild": {"depth": 0}},
        "unacked": 1, "stream": {"length": 7, "lag": None, "pending": 0}, "failures": 3, "pending_objects": backlog,
        "events": {"accepted": accepted, "embedded": embedded}, "workers": workers or [],
        "canary": {"last_seen": 1.0, "age_s": 75.0},
    }


def test_rates_are_counter_deltas_over_a_sliding_window() -> None:
    rates = Rates(window_s=10)
    assert rates.add(0.0, report()) == {"in": None, "out": None}
    assert rates.add(1.0, report(accepted=20, embedded=10)) == {"in": 20.0, "out": 10.0}
    assert rates.add(2.0, report(accepted=20, embedded=30)) == {"in": 10.0, "out": 15.0}
    for second in range(3, 13):
        current = rates.add(float(second), report(accepted=20, embedded=30))
    assert current == {"in": 0.0, "out": 0.0}  # the burst has left the window
    assert Rates().add(0.0, {"events": {}}) == {"in": None, "out": None}  # no counters yet reads as unknown


def test_a_counter_reset_never_gives_a_negative_rate() -> None:
    rates = Rates()
    rates.add(0.0, report(accepted=50, embedded=50))
    assert rates.add(1.0, report()) == {"in": 0.0, "out": 0.0}


def test_eta_is_backlog_over_embedding_rate() -> None:
    assert eta_text(0, None) == "0 s (drained)"
    assert eta_text(10, None) == "measuring ..."
    assert eta_text(10, 0.0) == "unknown: nothing embedded lately"
    assert eta_text(300, 2.0) == "2 min 30 s"
    assert eta_text(300, 2.0, arriving=2.0) == "2 min 30 s"  # (as fast as they come: it drains)
    # Events coming faster than they are embedded: the backlog grows, and no time is right (review 81: "6 min 27 s"
    # during a burst that drained in 86 s once it ended)
    assert eta_text(300, 2.0, arriving=9.0) == ("none yet: events arrive faster than they are embedded, and the "
                                                 "backlog grows")
    assert "backlog grows" in render(report(backlog=100), {"in": 9.0, "out": 5.0})
    assert duration_text(7322) == "2 h 02 min"


def test_render_shows_depths_rates_eta_and_workers() -> None:
    worker = {"id": "gpu-1:42", "state": "busy", "batch_size": 32, "batches": 5, "objects": 160, "age_s": 2.0}
    text = render(report(backlog=100, workers=[worker]), {"in": 4.0, "out": 5.0})
    assert "queue bl.live" in text and "p0=1 p9=1" in text and "lag ?" in text
    assert "events in 4.0/s" in text and "embeddings out 5.0/s" in text and "ETA to drain 20 s" in text
    assert "1 live" in text and "gpu-1:42" in text and "busy, batch of 32" in text
    assert "canary       last notification 1 min 15 s ago" in text
    once = render(report())
    assert "ETA" not in once and "0 live" in once


def test_a_late_canary_is_said_where_the_queues_look_empty() -> None:
    """A stalled topic leaves every queue at 0: uploads acknowledged by S3 are nowhere yet (an operator waited for
    "queues empty" and checked too early). Only the outstanding canary's age shows it."""
    late = report()
    late["canary"]["waiting_s"] = 35.0
    assert "DELIVERY     the canary uploaded 35 s ago has not been notified yet" in render(late)
    late["canary"]["waiting_s"] = 0.4  # delivery flows
    assert "DELIVERY" not in render(late)
    late["canary"]["after_restart"] = True  # the canary written just after the S3 server was restarted
    assert "DELIVERY     no notification since the S3 server or its supervisor was restarted 0 s ago" in render(late)
