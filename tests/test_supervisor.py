"""The supervisor's restart policy, as pure logic: a stand-in stack whose service dies whenever the test says so.
(Restarting real servers and services is tests/test_faults.py's.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from bucketlens.settings import Settings
from infra.supervisor import MAX_BACKOFF_S, STABLE_S, Supervisor


class Services:
    """A stack of one service, ``worker``, that is up or down as the test sets ``up``; counts its starts."""

    def __init__(self, home: Path) -> None:
        self.settings = Settings(canary_interval_s=30)
        self.home = home
        self.services = ["supervisor", "worker"]
        self.up = True
        self.starts = 0
        (home / "logs").mkdir()
        (home / "logs" / "worker.log").write_text("loading\nbucketlens worker: BUCKETLENS_DEVICE='cuda': no CUDA\n")

    def pid(self, name: str) -> int | None:
        return 1234 if self.up else None

    def start_service(self, name: str) -> None:
        self.starts += 1
        self.up = True


def starts_over(supervisor: Supervisor, stack: Services, seconds: float, dies: bool) -> list[float]:
    """Tick every canary interval for ``seconds``; a service that ``dies`` is down again by each next tick.
    Returns the times of the restarts."""
    times = []
    for tick in range(int(seconds // 30)):
        now = tick * 30.0
        if dies:
            stack.up = False
        before = stack.starts
        supervisor.keep_up("worker", now)
        if stack.starts > before:
            times.append(now)
    return times


@pytest.fixture
def stack(tmp_path: Path) -> Services:
    return Services(tmp_path)


def test_a_service_that_keeps_dying_is_restarted_less_and_less_often(stack: Services,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    supervisor = Supervisor(stack)  # type: ignore[arg-type]  # the stand-in has what the policy uses
    times = starts_over(supervisor, stack, 3600, dies=True)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert gaps[:5] == [30, 60, 120, 240, 480], gaps  # the first restart at once, then twice the wait each time
    assert max(gaps) <= MAX_BACKOFF_S + 30 and len(times) < 12, times  # every tick would have been 120
    assert "its log" in caplog.text and "no CUDA" in caplog.text  # says why, from the service's own log


def test_a_service_well_again_is_restarted_at_once_next_time(stack: Services) -> None:
    supervisor = Supervisor(stack)  # type: ignore[arg-type]
    last = starts_over(supervisor, stack, 600, dies=True)[-1]  # backing off by now
    supervisor.keep_up("worker", last + 30)  # up this time
    stack.up = False
    supervisor.keep_up("worker", last + 60)
    assert stack.starts == 5, "a service that died within STABLE_S of its restart was restarted at once"
    stack.start_service("worker")  # by hand, say; the supervisor sees it running STABLE_S after its restart
    supervisor.keep_up("worker", last + STABLE_S)
    stack.up = False
    supervisor.keep_up("worker", last + STABLE_S + 30)
    assert stack.starts == 7


def test_a_running_service_is_left_alone(stack: Services) -> None:
    supervisor = Supervisor(stack)  # type: ignore[arg-type]
    assert starts_over(supervisor, stack, 600, dies=False) == [] and stack.starts == 0
