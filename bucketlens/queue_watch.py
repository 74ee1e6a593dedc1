"""What ``bucketlens queues [--watch]`` shows: the queue report of ``GET /queues`` as text, with rates and an ETA.

Rates come from the deltas of the ingest and worker counters (``events.accepted``, ``events.embedded``) over the
last few refreshes; the ETA is the backlog (objects accepted and not yet merged) over the embedding rate.
"""

from __future__ import annotations

import collections
from typing import Any

RATE_COUNTERS = {"in": "accepted", "out": "embedded"}  # events in/s, embeddings out/s
DELIVERY_LATE_S = 10.0  # a canary's notification takes well under a second when delivery flows


class Rates:
    """Per-second rates of the report's counters over a sliding window of samples (smooths batch bursts)."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self._samples: collections.deque[tuple[float, dict[str, int]]] = collections.deque()

    def add(self, when: float, report: dict[str, Any]) -> dict[str, float | None]:
        """Record the counters of ``report`` taken at ``when`` (monotonic seconds); None until two samples."""
        events = report.get("events", {})
        self._samples.append((when, {name: int(events.get(field, 0)) for name, field in RATE_COUNTERS.items()}))
        while len(self._samples) > 2 and when - self._samples[1][0] >= self.window_s:
            self._samples.popleft()
        (first, old), (last, new) = self._samples[0], self._samples[-1]
        if last <= first:
            return {name: None for name in RATE_COUNTERS}
        return {name: max(0, new[name] - old[name]) / (last - first) for name in RATE_COUNTERS}


def eta_text(backlog: int, rate: float | None, arriving: float | None = None) -> str:
    """The backlog over the embedding ``rate``; none while events ``arriving`` (a second) outpace it: the backlog
    grows (a 3,000-upload burst said "6 min 27 s" as it went on growing: review 81)."""
    if backlog <= 0:
        return "0 s (drained)"
    if rate is None:
        return "measuring ..."
    if arriving is not None and arriving > rate:
        return "none yet: events arrive faster than they are embedded, and the backlog grows"
    if rate <= 0:
        return "unknown: nothing embedded lately"
    return duration_text(backlog / rate)


def duration_text(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds // 60 % 60:02d} min"


def render(report: dict[str, Any], rates: dict[str, float | None] | None = None) -> str:
    """The report as a screenful of text; ``rates`` adds the rates line and the ETA (watch mode)."""
    lines = []
    for name, queue in report["queues"].items():
        by_priority = " ".join(f"p{p}={n}" for p, n in queue.get("by_priority", {}).items() if n)
        lines.append(f"queue {name:26} {queue['depth']:>8} tasks" + (f"  ({by_priority})" if by_priority else ""))
    stream = report["stream"]
    backlog = int(report.get("pending_objects", 0))
    dead = int(report.get("unacked_dead", 0))
    lines += [
        f"unacked tasks {report['unacked']:>27}" + (f"  ({dead} left by dead workers, being restored)" if dead else ""),
        f"backlog {backlog:>33} objects (accepted, not merged yet)",
        f"result stream {stream['length']:>27} entries  lag {stream['lag'] if stream['lag'] is not None else '?'}"
        f"  pending {stream['pending']}",
        f"failures {report['failures']:>32}",
    ]
    if rates is not None:
        lines.append(f"rates        events in {_rate_text(rates['in'])}   embeddings out {_rate_text(rates['out'])}")
        lines.append(f"ETA to drain {eta_text(backlog, rates['out'], rates['in'])}")
    workers = report.get("workers", [])
    lines.append(f"workers      {len(workers)} live")
    for worker in workers:
        doing = f"busy, batch of {worker['batch_size']}" if worker.get("state") == "busy" else "idle"
        lines.append(f"  {worker['id']:38} {doing:20} {worker.get('batches', 0)} batches, "
                     f"{worker.get('objects', 0)} objects  (seen {worker.get('age_s', 0):.0f} s ago)")
    canary = report.get("canary", {})
    if canary.get("age_s") is not None:
        lines.append(f"canary       last notification {duration_text(canary['age_s'])} ago")
    if late := delivery_late(canary):
        lines.append(f"DELIVERY     {late}")
    return "\n".join(lines)


def delivery_late(canary: dict[str, Any]) -> str | None:
    """What ``/queues``' ``canary`` says of notifications that are late, or None: the queues cannot show uploads
    the S3 server has not told of yet (its topic stalled, or resuming after a restart)."""
    waiting = canary.get("waiting_s") or 0
    if canary.get("after_restart"):  # nothing above shows uploads waiting in the restarted server's topic
        return (f"no notification since the S3 server or its supervisor was restarted {duration_text(waiting)} ago "
                "(Ceph resumes within ~30 s): uploads since then may not be counted")
    if waiting > DELIVERY_LATE_S:  # the queues above cannot show a stall
        return (f"the canary uploaded {duration_text(waiting)} ago has not been notified yet: uploads since then may "
                "not be counted (the supervisor heals a stalled topic)")
    return None


def _rate_text(rate: float | None) -> str:
    return "–" if rate is None else f"{rate:.1f}/s"
