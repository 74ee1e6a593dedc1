"""The command line's own logic, in milliseconds: what it sends, what it prints, how it refuses. The index service
is a small HTTP server on a free port that answers what each test gives it; the CLI reaches it through the
environment, as it would reach a real one."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from bucketlens.cli import (
    NOT_RUNNING,
    _error_text,
    _explicit,
    _stack_for_up,
    api_url,
    client_settings,
    main,
    page_url,
    reconcile_summary,
    upload_plan,
)
from bucketlens.keys import Keys
from bucketlens.redis_client import connect
from bucketlens.s3 import make_client
from bucketlens.settings import REBUILD_START_WAIT_S, Settings
from infra.notifications import ensure_bucket, remove_notifications
from infra.procfs import kill_session, pid_record, session_members
from infra.stack import Stack, code_version, free_port

from .helpers import object_state, photo, wait_for


class FakeAPI:
    """Answers ``answers[(method, path)]`` (status, JSON body) and keeps every request it got."""

    def __init__(self) -> None:
        self.answers: dict[tuple[str, str], tuple[int, Any]] = {}
        self.requests: list[dict[str, Any]] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def answer(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                api.requests.append({"method": self.command, "path": self.path, "headers": dict(self.headers),
                                     "body": body})
                status, payload = api.answers.get((self.command, self.path.split("?")[0]),
                                                  (404, {"error": {"code": "not_found", "message": self.path}}))
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = answer

            def log_message(self, format: str, *args: Any) -> None:  # quiet: pytest shows what matters
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]


@pytest.fixture
def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeAPI]:
    fake = FakeAPI()
    thread = threading.Thread(target=fake.server.serve_forever, daemon=True)
    thread.start()
    # The CLI reads its settings from the environment at its edge; a home with no stack.json keeps it off any
    # local stack.
    for name, value in {"HOME": str(tmp_path), "API_HOST": "127.0.0.1", "API_PORT": str(fake.port),
                        "ADMIN_TOKEN": "admin", "READ_TOKEN": ""}.items():
        monkeypatch.setenv("BUCKETLENS_" + name, value)
    try:
        yield fake
    finally:
        fake.server.shutdown()
        fake.server.server_close()
        thread.join()


def one_error_line(capsys: pytest.CaptureFixture[str], *words: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert all(word in err for word in words), err
    return err


def cli_process(args: list[str], **environ: str) -> subprocess.Popen[str]:
    """``python -m bucketlens.cli`` in a process of its own, with the test's environment and ``environ`` over it."""
    # SIGINT as a terminal delivers it: a background job (CI's, a nohup'd run) starts its children with it ignored,
    # and an ignored signal stays ignored across exec, a handled one does not. (A preexec_fn reset it in the child,
    # but made Python fork rather than spawn, and the fork ran the handlers gRPC, loaded in pytest by the Milvus
    # tests, registered: a child aborted (-6, "epoll_wait error: Bad file descriptor") in a clean-clone run.)
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    return subprocess.Popen([sys.executable, "-m", "bucketlens.cli", *args], env={**os.environ, **environ},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# -- settings -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("variable", "raw", "refusal"), [
    ("BUCKETLENS_BATCH_SIZE", "abc", "BUCKETLENS_BATCH_SIZE='abc' is not a valid int: a whole number"),
    ("BUCKETLENS_MERGE_BATCH", "0", "BUCKETLENS_MERGE_BATCH=0: must be at least 1 and at most 9007199254740991"),
    ("BUCKETLENS_RUNTIME", "tensorrt", "BUCKETLENS_RUNTIME='tensorrt': choose one of auto, torch, onnx, onnx-int8"),
])
def test_a_bad_setting_is_one_line_and_exit_2_from_a_real_process(
    tmp_path: Path, variable: str, raw: str, refusal: str
) -> None:
    process = cli_process(["status"], BUCKETLENS_HOME=str(tmp_path), **{variable: raw})
    out, err = process.communicate(timeout=60)
    assert process.returncode == 2 and err == f"bucketlens: {refusal}\n" and not out, (out, err)
    assert not list(tmp_path.iterdir()), "the stack's folder was set up before the settings were checked"


def test_celery_started_by_hand_refuses_a_bad_setting_in_one_line(tmp_path: Path) -> None:
    """``celery -A workers.main worker`` (a user's own command line, as workers/__init__.py offers) reads them too."""
    process = subprocess.run([sys.executable, "-m", "celery", "-A", "workers.main", "worker", "--pool=solo"],
                             env={**os.environ, "BUCKETLENS_HOME": str(tmp_path), "BUCKETLENS_BATCH_SIZE": "0"},
                             capture_output=True, text=True, timeout=120)
    assert process.returncode == 2, (process.stdout, process.stderr)
    assert process.stderr == "bucketlens: BUCKETLENS_BATCH_SIZE=0: must be at least 1 and at most 9007199254740991\n", (
        process.stderr)


def test_up_refuses_a_bad_setting_before_it_starts_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The home is a file: were the settings not checked first, 'up' would stop at once on making its folder there
    # rather than start servers.
    home = tmp_path / "home"
    home.write_text("")
    monkeypatch.setenv("BUCKETLENS_HOME", str(home))
    monkeypatch.setenv("BUCKETLENS_MODEL", "nosuchmodel")
    assert main(["up"]) == 2
    one_error_line(capsys, "bucketlens: BUCKETLENS_MODEL='nosuchmodel': choose one of ", "lite0-copy-v3")
    assert list(tmp_path.iterdir()) == [home]


def test_up_takes_the_index_backend_its_shell_sets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """``BUCKETLENS_INDEX_BACKEND=milvus bucketlens up`` started a FAISS stack (an independent check): only
    ``--backend`` was read. (Nothing is started here: the stack is chosen, not run.)"""
    monkeypatch.setenv("BUCKETLENS_HOME", str(tmp_path))
    monkeypatch.setenv("BUCKETLENS_INDEX_BACKEND", "milvus")
    stack, _ = _stack_for_up(Settings.from_env(), argparse.Namespace(backend=None))
    assert stack.settings.index_backend == "milvus" and "(milvus index" in capsys.readouterr().out
    assert json.loads((tmp_path / "stack.json").read_text())["index_backend"] == "milvus"


def test_up_starts_milvus_on_the_port_its_shell_sets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """``BUCKETLENS_MILVUS_URI`` was ignored: the stack's Milvus took 19530 whatever it said, without a word (review
    21). A stack that has its port keeps it, and says so. (Nothing is started here.)"""
    with socket.socket() as sock:  # (not free_port: a port it leased is not the stack's to take)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("BUCKETLENS_HOME", str(tmp_path))
    monkeypatch.setenv("BUCKETLENS_MILVUS_URI", f"http://127.0.0.1:{port}")
    stack, _ = _stack_for_up(Settings.from_env(), argparse.Namespace(backend="milvus"))
    assert stack.config.milvus_port == port and stack.settings.milvus_uri == f"http://127.0.0.1:{port}"
    monkeypatch.setenv("BUCKETLENS_MILVUS_URI", f"http://127.0.0.1:{port + 1}")
    stack, _ = _stack_for_up(Settings.from_env(), argparse.Namespace(backend=None))
    assert stack.config.milvus_port == port
    assert f"BUCKETLENS_MILVUS_URI=http://127.0.0.1:{port + 1} is not used" in capsys.readouterr().out


@pytest.mark.parametrize(("shared", "name"), [("redis_port", "redis"), ("s3_port", "S3 (radosgw)"),
                                             ("api_port", "api")])
def test_up_refuses_a_port_another_stack_holds_before_it_starts_anything(
    stack: Stack, tmp_path: Path, shared: str, name: str
) -> None:
    """A second stack whose stack.json names one of the running stack's ports (both were made while the other was
    down) took that Redis or S3 server for its own, and pointed its bucket's notifications at itself."""
    home = tmp_path / "second"
    home.mkdir()
    config = dataclasses.asdict(stack.config)
    ports = {key: getattr(stack.config, key) if key == shared else free_port()
             for key in ("redis_port", "s3_port", "mon_port", "ingest_port", "api_port")}
    (home / "stack.json").write_text(json.dumps({**config, **ports, "webhook_token": "w2", "admin_token": "a2"}))
    process = cli_process(["up"], BUCKETLENS_HOME=str(home))
    try:
        out, err = process.communicate(timeout=300)
    finally:  # (stops by the second stack's pid files: never the first one's processes)
        cli_process(["down"], BUCKETLENS_HOME=str(home)).communicate(timeout=300)
    assert process.returncode == 1, (out, err)
    assert f"port {ports[shared]}, this stack's {name} port, is in use by another program" in err, err
    assert not list((home / "run").glob("*.pid")) and not (home / "ceph").exists()


def processes_of(home: Path) -> list[str]:
    """The command lines of the processes that name ``home`` in their arguments (Redis, Ceph) or in their
    ``BUCKETLENS_HOME`` (the services)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:  # (gone meanwhile, or not a process)
            continue
        if str(home) in argv or f"BUCKETLENS_HOME={home}".encode() in environ:
            found.append(argv)
    return found


def test_a_script_session_is_killed_whole_though_it_forks_meanwhile() -> None:
    """An interrupted `up` kills the Ceph script's session; a subshell forked while a pass went through /proc
    escaped it and ran on (test_ctrl_c_during_a_first_up... saw `bash .../ceph.sh` left once)."""
    script = subprocess.Popen(["bash", "-c", "while true; do (sleep 60) & sleep 0.002; done"],
                              start_new_session=True)
    try:
        time.sleep(0.5)  # (forking all the while)
        kill_session(script.pid)
        script.wait(10)
        assert session_members(script.pid) == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(script.pid, signal.SIGKILL)


@pytest.mark.slow
def test_ctrl_c_during_a_first_up_stops_what_it_started_and_the_next_up_starts(tmp_path: Path) -> None:
    """A first ``up`` takes a while (it creates the S3 server); Ctrl-C left Redis and half a Ceph cluster running,
    and the next ``up`` started that cluster without its S3 user."""
    home = tmp_path / "stack"
    first = cli_process(["up"], BUCKETLENS_HOME=str(home))
    try:
        wait_for(lambda: (home / "ceph" / "ceph.conf").exists(), 120, what="the S3 server being created")
        first.send_signal(signal.SIGINT)
        out, err = first.communicate(timeout=300)
        assert first.returncode == 130 and "up: interrupted: stopping what it started" in err, (out, err)
        assert "Traceback" not in err, err
        assert processes_of(home) == [], "left running after the interrupted up"
        second = cli_process(["up"], BUCKETLENS_HOME=str(home))
        out, err = second.communicate(timeout=900)
        assert second.returncode == 0 and "up: API" in out, (out, err)
        status = cli_process(["status"], BUCKETLENS_HOME=str(home))
        out, err = status.communicate(timeout=60)
        assert status.returncode == 0, (out, err)
    finally:
        cli_process(["down"], BUCKETLENS_HOME=str(home)).communicate(timeout=300)
    assert processes_of(home) == []


def test_a_client_command_sends_nothing_with_a_bad_setting(
    api: FakeAPI, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BUCKETLENS_DEVICE", "tpu")
    assert main(["rebuild"]) == 2
    one_error_line(capsys, "bucketlens: BUCKETLENS_DEVICE='tpu': choose one of auto, cpu, cuda")
    assert not api.requests


# -- rebuild --------------------------------------------------------------------------------------------------

RUNNING = {"id": "r1", "mode": "reindex", "generation": 3, "state": "running", "total": 10, "done": 4, "failed": 0}


def test_rebuild_index_type_auto_goes_to_the_service(api: FakeAPI, capsys: pytest.CaptureFixture[str]) -> None:
    api.answers[("POST", "/rebuild")] = (202, RUNNING)
    assert main(["rebuild", "--reindex", "--index-type", "auto"]) == 0
    assert json.loads(api.requests[0]["body"])["index_type"] == "auto"
    assert "rebuild r1 started" in capsys.readouterr().out


def test_rebuild_waits_as_long_as_the_service_may_hold_its_start(api: FakeAPI, monkeypatch: pytest.MonkeyPatch) -> None:
    """The service holds a start up to REBUILD_START_WAIT_S (the last swap's first snapshot): the CLI gave up at 30 s,
    said "is the stack up?", and the rebuild could start after (review 87)."""
    api.answers[("POST", "/rebuild")] = (202, RUNNING)
    timeouts, post = [], httpx.post
    monkeypatch.setattr(httpx, "post", lambda *a, **kw: timeouts.append(kw["timeout"]) or post(*a, **kw))
    assert main(["rebuild"]) == 0
    assert timeouts and timeouts[0] > REBUILD_START_WAIT_S + 30, timeouts  # (S3's answers of the buckets beside)


def test_rebuild_reconcile_and_cancel_answer_json_for_scripts(api: FakeAPI, capsys: pytest.CaptureFixture[str]) -> None:
    """A script had to parse the job id out of "rebuild r1 started (...)" (review 79): --json prints the service's
    answer, as started, as it ended with --wait, as cancelled."""
    api.answers[("POST", "/rebuild")] = (202, RUNNING)
    assert main(["rebuild", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == RUNNING
    api.answers[("GET", "/rebuild/r1")] = (200, {**RUNNING, "state": "failed", "error": "x", "done": 2, "total": 9})
    assert main(["rebuild", "--wait", "--json"]) == 1  # (not done: as without --json)
    assert json.loads(capsys.readouterr().out)["state"] == "failed"
    api.answers[("DELETE", "/rebuild/r1")] = (200, {**RUNNING, "state": "cancelled"})
    assert main(["rebuild", "--cancel", "r1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "cancelled"
    api.answers[("POST", "/reconcile")] = (200, RECONCILED)
    assert main(["reconcile", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == RECONCILED


def test_ctrl_c_while_waiting_says_the_rebuild_goes_on_and_how_to_cancel_it(api: FakeAPI) -> None:
    api.answers[("POST", "/rebuild")] = (202, RUNNING)
    api.answers[("GET", "/rebuild/r1")] = (200, RUNNING)
    with cli_process(["rebuild", "--reindex", "--wait"]) as process:
        try:
            assert process.stdout is not None
            assert process.stdout.readline().startswith("rebuild r1 started")
            deadline = time.monotonic() + 30
            while not any(request["method"] == "GET" for request in api.requests):  # waiting, not still starting
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
            process.send_signal(signal.SIGINT)
            _, err = process.communicate(timeout=30)
        finally:
            process.kill()  # only where the test failed before the process ended
    url = f"http://127.0.0.1:{api.port}/rebuild/r1"
    assert process.returncode == 130, err
    assert f"stopped waiting; rebuild r1 still runs: GET {url}; cancel it with `bucketlens rebuild --cancel r1`" \
        in err, err
    assert "Traceback" not in err and not any(request["method"] == "DELETE" for request in api.requests)


def test_a_rebuild_asked_for_while_one_runs_says_how_to_follow_it_and_wait_follows_it(
        api: FakeAPI, capsys: pytest.CaptureFixture[str]) -> None:
    """`rebuild --wait` while a rebuild ran answered the 409 with no word of how to follow the one running (review
    78)."""
    api.answers[("POST", "/rebuild")] = (409, {"error": {"code": "running", "message": "rebuild r1 is running"}})
    api.answers[("GET", "/stats")] = (200, {"rebuild": {**RUNNING, "done": 3, "total": 10}})
    assert main(["rebuild"]) == 1
    one_error_line(capsys, "rebuild r1 is running", "`bucketlens rebuild --wait`", "`bucketlens rebuild --cancel r1`")
    api.answers[("GET", "/rebuild/r1")] = (200, {**RUNNING, "state": "done", "done": 10, "total": 10})
    assert main(["rebuild", "--wait"]) == 0
    out, err = capsys.readouterr()
    assert "rebuild r1 (reindex) runs already, and was not started again: following it" in err, err
    assert "rebuild r1 done: 10/10 settled" in out, out


def test_cancel_with_no_id_cancels_the_running_rebuild(api: FakeAPI, capsys: pytest.CaptureFixture[str]) -> None:
    api.answers[("GET", "/stats")] = (200, {"rebuild": {**RUNNING, "done": 3, "total": 10}})
    api.answers[("DELETE", "/rebuild/r1")] = (200, {**RUNNING, "state": "cancelled", "done": 3, "total": 10})
    assert main(["rebuild", "--cancel"]) == 0
    deletes = [r for r in api.requests if r["method"] == "DELETE"]
    assert [r["path"] for r in deletes] == ["/rebuild/r1"] and deletes[0]["headers"]["Authorization"] == "Bearer admin"
    assert "rebuild r1 cancelled at 3/10" in capsys.readouterr().out


def test_cancel_when_nothing_runs_says_so_and_sends_nothing(api: FakeAPI, capsys: pytest.CaptureFixture[str]) -> None:
    api.answers[("GET", "/stats")] = (200, {"rebuild": {**RUNNING, "state": "done"}})
    assert main(["rebuild", "--cancel"]) == 1
    one_error_line(capsys, "no rebuild is running", "r1", "done")
    assert not any(r["method"] == "DELETE" for r in api.requests)


def test_cancel_of_a_finished_rebuild_says_what_the_service_said(api: FakeAPI,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    refusal = {"error": {"code": "not_running", "message": "rebuild r0 is not running"}}
    api.answers[("DELETE", "/rebuild/r0")] = (409, refusal)
    assert main(["rebuild", "--cancel", "r0"]) == 1
    one_error_line(capsys, "409 not_running", "rebuild r0 is not running")


# -- reconcile ------------------------------------------------------------------------------------------------

RECONCILED = {"listed": 196, "missing": 5, "changed": 0, "removed": 0, "failed": 5, "seconds": 0.4}


def test_reconcile_says_what_was_sent_and_what_was_left_to_failures_retry(
    api: FakeAPI, capsys: pytest.CaptureFixture[str]
) -> None:
    api.answers[("POST", "/reconcile")] = (200, RECONCILED)
    assert main(["reconcile"]) == 0
    out = capsys.readouterr().out
    assert "0 sent for embedding" in out, out
    assert "5 not sent" in out and "already failed by its content" in out, out
    assert "bucketlens failures --retry" in out, out
    assert api.requests[0]["headers"]["Authorization"] == "Bearer admin"


def test_reconcile_names_the_bucket_in_the_retry_hint_and_counts_both_kinds(
    api: FakeAPI, capsys: pytest.CaptureFixture[str]
) -> None:
    api.answers[("POST", "/reconcile")] = (200, {**RECONCILED, "missing": 7, "changed": 2, "failed": 3, "removed": 1,
                                                 "failures_cleared": 2})
    assert main(["reconcile", "--bucket", "photos"]) == 0
    out = capsys.readouterr().out
    assert "7 missing, 2 changed" in out and "6 sent for embedding" in out and "3 not sent" in out, out
    assert "1 removed; 2 failure records of objects no longer in the bucket cleared" in out, out
    assert "1 failure record of" in reconcile_summary({**RECONCILED, "failures_cleared": 1}, None)  # ("1 ... records")
    assert "bucketlens failures --bucket photos --retry" in out and "1 removed" in out, out
    assert json.loads(api.requests[0]["body"]) == {"bucket": "photos"}


def test_clearing_or_retrying_a_selection_that_matches_nothing_says_so(api: FakeAPI,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """`failures --clear --reason corrpt` (a typo) said "cleared 0 failure records" and nothing more (an independent
    check): nothing was lost, but nothing told the user the selection matched nothing."""
    api.answers[("DELETE", "/failures")] = (200, {"cleared": 0})
    api.answers[("POST", "/failures/retry")] = (202, {"retried": 0, "tasks": 0})
    assert main(["failures", "--clear", "--reason", "corrpt"]) == 0
    assert capsys.readouterr().out == ("cleared 0 failure records\nno failure record has reason 'corrpt': "
                                       "`bucketlens failures` lists them\n")
    assert main(["failures", "--retry", "--bucket", "photos", "--key", "a.jpg"]) == 0
    assert "no failure record has bucket 'photos' and key 'a.jpg'" in capsys.readouterr().out
    api.answers[("DELETE", "/failures")] = (200, {"cleared": 3})
    assert main(["failures", "--clear", "--reason", "corrupt"]) == 0
    assert capsys.readouterr().out == "cleared 3 failure records\n"
    # Listing too (it said "0 failure records" alone: review 26)
    api.answers[("GET", "/failures")] = (200, {"total": 0, "offset": 0, "limit": 100, "failures": []})
    assert main(["failures", "--reason", "corupt"]) == 0
    assert capsys.readouterr().out == ("0 failure records\nno failure record has reason 'corupt': "
                                       "`bucketlens failures` lists them\n")
    assert main(["failures"]) == 0 and capsys.readouterr().out == "0 failure records\n"
    assert main(["failures", "--clear", "--key", ""]) == 1  # (the server's answer named its field, `keys`)
    one_error_line(capsys, "--key must not be empty (leave it out to select every record)")


def test_the_failures_listing_says_how_many_tries_an_object_took(api: FakeAPI,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Each record's line named its task's attempts as `x1`, read as "failed once" whatever the object's history
    (review 78): the tries are said in words, and only when there were several."""
    record = {"bucket": "photos", "key": "a.jpg", "reason": "corrupt", "message": "broken data stream",
              "attempts": 1, "time": 1764500000.0, "retries": 0, "retry_at": None}
    api.answers[("GET", "/failures")] = (200, {"total": 2, "offset": 0, "limit": 100, "failures": [
        record, {**record, "key": "b.jpg", "reason": "fetch_timeout", "message": "no answer in 30 s", "attempts": 9}]})
    assert main(["failures"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("  corrupt          photos/a.jpg: broken data stream"), lines
    assert lines[1].endswith("  fetch_timeout    photos/b.jpg: no answer in 30 s (after 9 tries)"), lines
    assert lines[2] == "2 failure records"


def test_clearing_every_failure_record_at_a_terminal_asks_first(api: FakeAPI, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """`failures --clear` with no selection deleted every record without a word (review 31); a script, not at a
    terminal, is not asked."""
    api.answers[("DELETE", "/failures")] = (200, {"cleared": 5})
    answers = iter(["", EOFError, "y"])  # Enter, Ctrl-D (a traceback: review 79), y

    def answer(prompt: str) -> str:
        given = next(answers)
        if given is EOFError:
            raise EOFError
        return str(given)

    monkeypatch.setattr("builtins.input", answer)
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    for _ in range(2):
        assert main(["failures", "--clear"]) == 1 and not api.requests
        assert "nothing cleared" in capsys.readouterr().out
    assert main(["failures", "--clear"]) == 0 and capsys.readouterr().out == "cleared 5 failure records\n"
    monkeypatch.setattr(sys.stdin, "isatty", lambda: False)
    assert main(["failures", "--clear"]) == 0 and len(api.requests) == 2


def test_reconcile_with_no_failures_prints_no_retry_hint(api: FakeAPI, capsys: pytest.CaptureFixture[str]) -> None:
    api.answers[("POST", "/reconcile")] = (200, {**RECONCILED, "failed": 0})
    assert main(["reconcile"]) == 0
    out = capsys.readouterr().out
    assert "5 sent for embedding" in out and "failures" not in out, out


def test_reconcile_dry_run_asks_for_one_and_says_nothing_changed(api: FakeAPI,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    api.answers[("POST", "/reconcile")] = (200, {**RECONCILED, "failed": 0, "removed": 4000, "dry_run": True})
    assert main(["reconcile", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert json.loads(api.requests[0]["body"]) == {"bucket": None, "dry_run": True}
    assert out.startswith("dry run, nothing changed:") and "5 would be sent for embedding" in out, out
    assert "4000 would be removed from the index" in out, out


def test_listings_say_which_page_they_show_and_take_an_offset(api: FakeAPI, capsys: pytest.CaptureFixture[str]) -> None:
    """With 1,013 duplicate groups the CLI printed 50 and "1013 groups" without a word of the rest, and had no
    --offset to reach them (a scale check)."""
    group = {"size": 2, "pairs": 1, "min_matches": 20, "members": [
        {"bucket": "b", "key": f"k{i}.jpg", "etag": "e", "pixels": 0, "url": "u"} for i in range(2)]}
    api.answers[("GET", "/duplicates")] = (200, {"model": "m", "total": 1013, "offset": 0, "limit": 50, "pending": 0,
                                                 "groups": [group] * 50})
    assert main(["duplicates"]) == 0
    assert "1013 groups (1-50 shown; --offset 50 lists the next)" in capsys.readouterr().out
    small = {**group["members"][0], "pixels": 151 * 150}  # (was "0.0 MP", and "1 groups": review 31)
    api.answers[("GET", "/duplicates")] = (200, {"model": "m", "total": 1, "offset": 0, "limit": 50, "pending": 0,
                                                 "groups": [{**group, "members": [small, small]}]})
    assert main(["duplicates"]) == 0
    out = capsys.readouterr().out
    assert "(22,650 pixels)" in out and out.endswith("\n1 group\n"), out
    record = {"bucket": "b", "key": "k.jpg", "etag": "e", "reason": "corrupt", "message": "m", "attempts": 1,
              "time": 0.0}
    api.answers[("GET", "/failures")] = (200, {"total": 1003, "offset": 1000, "limit": 100,
                                               "failures": [record] * 3})
    assert main(["failures", "--offset", "1000"]) == 0
    assert "1003 failure records (1001-1003 shown)" in capsys.readouterr().out
    assert "offset=1000" in api.requests[-1]["path"]


# -- search ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("what", ["missing", "folder"])
def test_search_by_a_file_it_cannot_read_is_one_line_and_exit_1(
    api: FakeAPI, tmp_path: Path, capsys: pytest.CaptureFixture[str], what: str
) -> None:
    path = tmp_path / "no-such.jpg" if what == "missing" else tmp_path
    assert main(["search", str(path)]) == 1
    one_error_line(capsys, "bucketlens search:", str(path))
    assert not api.requests


@pytest.mark.parametrize("args", [["--key", "a.jpg", "IMAGE"], ["--text", "dog", "IMAGE"],
                                  ["--key", "a.jpg", "--text", "dog"]])
def test_search_refuses_two_kinds_of_query(
    api: FakeAPI, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    image = tmp_path / "q.jpg"
    image.write_bytes(b"\xff\xd8 not really a jpeg")
    assert main(["search", *[str(image) if a == "IMAGE" else a for a in args]]) == 1
    one_error_line(capsys, "bucketlens search:", "one of")
    assert not api.requests


def test_search_by_file_sends_the_filters_beside_the_image(
    api: FakeAPI, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    api.answers[("POST", "/search")] = (200, {"model": "m", "took_ms": 1.0, "results": [
        {"bucket": "b", "key": "2024/sky.jpg", "score": 1.0, "verified": True, "matches": 500, "identical": True,
         "labels": None},
        {"bucket": "b", "key": "2024/crop.jpg", "score": 0.8, "verified": True, "matches": 41, "identical": False,
         "labels": None},
        {"bucket": "b", "key": "2024/\x1b]0;PWNED\x07\u202egpj.exe", "score": 0.4, "verified": False, "matches": 3,
         "labels": None}]})
    image = tmp_path / "q.jpg"
    image.write_bytes(b"\xff\xd8 not really a jpeg")
    assert main(["search", str(image), "--prefix", "2024/", "-k", "3"]) == 0
    assert capsys.readouterr().out.splitlines()[-3:] == ["1.0000  b/2024/sky.jpg  same photo: identical file",
                                                         "0.8000  b/2024/crop.jpg  same photo: 41 matches",
                                                         "0.4000  b/2024/\\x1b]0;PWNED\\x07\\u202egpj.exe"]
    sent = api.requests[0]
    assert sent["headers"]["Content-Type"].startswith("multipart/form-data")
    assert b"not really a jpeg" in sent["body"] and b'name="prefix"\r\n\r\n2024/' in sent["body"]
    assert b'name="key"' not in sent["body"]


def test_status_without_a_stack_says_so_and_sets_none_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """It invented ports and tokens (writing a stack.json) and printed them as the stack's addresses."""
    monkeypatch.setenv("BUCKETLENS_HOME", str(tmp_path / "nothing-here"))
    assert main(["status", "--json"]) == NOT_RUNNING
    out, err = capsys.readouterr()
    assert json.loads(out) == {"processes": {}, "index": None, "error": err.strip()}, out  # (stdout was empty)
    assert "no local stack in" in err and "bucketlens up" in err, err
    assert not (tmp_path / "nothing-here").exists()


def test_a_client_command_without_a_stack_says_which_addresses_it_uses(
        api: FakeAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Run outside the stack's folder, search and upload went to whatever held the default ports (another user's
    stack, another S3 server) and said nothing (review 26). Addresses the shell sets are no surprise: no note."""
    api_url(client_settings(Settings.from_env()))  # (what main() gives a client command; the fixture sets the port)
    assert capsys.readouterr().err == ""
    for name in ("BUCKETLENS_API_HOST", "BUCKETLENS_API_PORT"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("BUCKETLENS_HOME", str(tmp_path / "elsewhere"))
    monkeypatch.delenv("BUCKETLENS_S3_ENDPOINT", raising=False)
    settings = client_settings(Settings.from_env())
    assert settings.api_port == 7400 and capsys.readouterr().err == ""  # (said once it reaches for an address: not
    api_url(settings)  # before an error of its own, "no images in ...")
    api_url(settings)  # (once)
    err = capsys.readouterr().err
    assert err == (f"bucketlens: note: no local stack in {tmp_path / 'elsewhere'} (the home is .bucketlens in the "
                   "current folder unless BUCKETLENS_HOME says); using the default API address, "
                   "http://127.0.0.1:7400\n"), err
    # search's own errors come first, alone (the note came before "search by one of ...": review 27)
    assert main(["search"]) == 1 and "note:" not in capsys.readouterr().err


def test_status_says_what_the_index_serves(api: FakeAPI, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # A local stack whose index service is the stand-in (nothing else of it runs).
    (tmp_path / "stack.json").write_text(json.dumps({
        "redis_port": 1, "s3_port": 1, "mon_port": 1, "ingest_port": 1, "api_port": api.port, "webhook_token": "w",
        "admin_token": "admin"}))
    rebuild = {"id": "r1", "state": "running", "done": 4, "total": 10}
    api.answers[("GET", "/stats")] = (200, {"model": "lite0-copy-v3", "generation": 3, "vectors": 12,
                                            "index_type": "Flat", "rebuild": rebuild, "dim": 1280})
    api.answers[("GET", "/readyz")] = (200, {"ready": True, "reason": ""})
    # Every process up did not say whether uploads were indexed (review 73: a worker's pool processes frozen).
    api.answers[("GET", "/queues")] = (200, {"pending_objects": 30, "failures": 2, "workers": [], "unacked": 1})
    assert main(["status", "--json"]) == NOT_RUNNING  # the stack's processes are down: a health check sees it
    status = json.loads(capsys.readouterr().out)
    assert not any(status["processes"].values())
    assert status["page_url"] == f"http://127.0.0.1:{api.port}/"  # (no read token here: the address alone)
    # Every port the stack chose (review 67: the Ceph monitor's, taken elsewhere, showed nowhere but stack.json).
    assert status["ports"] == {"redis": 1, "s3": 1, "mon": 1, "ingest": 1, "api": api.port}
    assert status["index"] == {"model": "lite0-copy-v3", "generation": 3, "vectors": 12, "index_type": "Flat",
                               "rebuild": rebuild, "ready": True, "reason": ""}
    assert main(["status"]) == NOT_RUNNING
    out = capsys.readouterr().out
    assert "index: 12 vectors, model lite0-copy-v3, generation 3, Flat; rebuild r1 running 4/10\n" in out, out
    assert status["work"] == {"pending_objects": 30, "workers_live": 0, "failures": 2, "delivery_late": None}
    assert status["work_error"] is None
    assert ("work: 30 objects on their way to the index, 0 worker processes live, 2 failures; no live worker takes "
            f"them ({tmp_path / 'logs' / 'worker.log'})\n") in out, out
    states = [line for line in out.splitlines() if line.endswith((" up", " down"))]  # one column ("supervisor")
    # What to do about it (review 83: "supervisor down" and no word more)
    assert (f"{', '.join(status['processes'])} down: `bucketlens up` starts what is not running (logs: "
            f"{tmp_path / 'logs'})\n") in out, out
    assert len(states) == len(status["processes"]) and len({line.rindex(" ") for line in states}) == 1, out
    # The writer answers /stats from memory: with its Milvus server frozen, status showed the index and nothing more
    # (an independent check), while /readyz said why searches failed.
    frozen = "Milvus at http://127.0.0.1:19530 does not answer: deadline exceeded"
    api.answers[("GET", "/readyz")] = (503, {"ready": False, "reason": frozen})
    assert main(["status"]) == NOT_RUNNING
    assert f"Flat; rebuild r1 running 4/10; not ready: {frozen}\n" in capsys.readouterr().out
    assert main(["status", "--json"]) == NOT_RUNNING
    assert json.loads(capsys.readouterr().out)["index"]["reason"] == frozen
    # Notifications late: the work line's count leaves out what the S3 server has not told of (review 83: "0 objects
    # on their way" while Ceph's stalled topic held 300 uploads)
    api.answers[("GET", "/queues")] = (200, {"pending_objects": 0, "failures": 0, "workers": [],
                                             "canary": {"waiting_s": 95.0, "after_restart": False}})
    assert main(["status"]) == NOT_RUNNING
    out = capsys.readouterr().out
    assert ("delivery: the canary uploaded 1 min 35 s ago has not been notified yet: uploads since then may not be "
            "counted (the supervisor heals a stalled topic)\n") in out, out
    assert main(["status", "--json"]) == NOT_RUNNING
    assert json.loads(capsys.readouterr().out)["work"]["delivery_late"].startswith("the canary uploaded 1 min 35 s")
    api.answers[("GET", "/queues")] = (503, {"error": {"code": "redis_unavailable", "message": "Redis is away"}})
    assert main(["status"]) == NOT_RUNNING  # (/stats answers from memory while Redis is away; /queues cannot)
    out = capsys.readouterr().out  # (it said "no answer", where /queues said why: review 83)
    assert f"work: unknown: http://127.0.0.1:{api.port}/queues answered 503: Redis is away\n" in out, out
    assert main(["status", "--json"]) == NOT_RUNNING
    assert json.loads(capsys.readouterr().out)["work_error"] == "answered 503: Redis is away"
    # An error answer (a replica whose Milvus is down) is no index either: it was an object of nulls.
    api.answers[("GET", "/stats")] = (503, {"error": {"code": "index_unavailable", "message": "Milvus is down"}})
    assert main(["status", "--json"]) == NOT_RUNNING
    assert json.loads(capsys.readouterr().out)["index"] is None
    api.server.shutdown()  # no index service: the stack's state alone, index null
    assert main(["status", "--json"]) == NOT_RUNNING
    assert json.loads(capsys.readouterr().out)["index"] is None
    assert main(["status"]) == NOT_RUNNING  # (after a `down` it said "frozen, starting or failing": review 79)
    out = capsys.readouterr().out
    assert (f"index: no answer from http://127.0.0.1:{api.port}: the index service is not running (`bucketlens up` "
            "starts it)\n") in out, out
    assert "work:" not in out, out
    real = Stack.status  # its process runs: the line was left out, and a frozen index service looked like a live one

    def api_runs(self: Stack, *args: Any, **kwargs: Any) -> dict[str, Any]:
        found = real(self, *args, **kwargs)
        return {**found, "processes": {**found["processes"], "api": True}}

    monkeypatch.setattr(Stack, "status", api_runs)
    assert main(["status"]) == NOT_RUNNING
    out = capsys.readouterr().out
    assert f"index: no answer from http://127.0.0.1:{api.port} (frozen, starting or failing: " in out, out
    assert main(["rebuild", "--cancel"]) == 1  # it said "no rebuild is running"
    one_error_line(capsys, "no answer from the index service at", "cannot tell which rebuild runs")


@pytest.mark.parametrize("content", ['{"redis_port": 1,}', '{"redis_prot": 1}', "[]",
                                     # a bad port blamed BUCKETLENS_API_PORT or REDIS_URL, set nowhere (review 86)
                                     '{"api_port": 70000}', '{"api_port": "23001"}', '{"redis_port": 23001.5}',
                                     '{"replica_ports": 7}', '{"admin_token": 5}'])
def test_a_stack_file_edited_wrong_is_one_line_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str], content: str) -> None:
    """The CLI tells users to edit stack.json: a typo was blamed on the server's answer and BUCKETLENS_API_PORT, a
    misspelt field was a traceback (an independent review)."""
    monkeypatch.setenv("BUCKETLENS_HOME", str(tmp_path))
    (tmp_path / "stack.json").write_text(content)
    assert main(["status"]) != 0
    one_error_line(capsys, str(tmp_path / "stack.json"), "is not a stack file this version reads")
    with pytest.raises(SystemExit, match="2"):  # argparse's own refusal: it was a traceback
        main(["queues", "--watch", "--interval", "inf"])
    assert "must be a finite number, not inf" in capsys.readouterr().err


def test_a_stack_file_written_with_ports_alone_gets_the_rest_chosen(tmp_path: Path) -> None:
    """Ports chosen by hand before the first `up` were refused with "StackConfig.__init__() missing 2 required
    positional arguments" (review 79): the tokens are made as a first `up` makes them, and kept."""
    ports = {"redis_port": free_port(), "s3_port": free_port(), "mon_port": free_port(), "ingest_port": free_port(),
             "api_port": free_port()}
    (tmp_path / "stack.json").write_text(json.dumps(ports))
    config = Stack(Settings(home=tmp_path)).config
    assert {name: getattr(config, name) for name in ports} == ports
    assert len(config.webhook_token) >= 24 and len(config.admin_token) >= 24
    assert Stack(Settings(home=tmp_path)).config == config  # (written back: the same tokens at the next start)
    assert (tmp_path / "stack.json").stat().st_mode & 0o777 == 0o600
    for unchosen in (0, None):  # one port given; 0 or null is one to choose (review 82; null was refused: review 89)
        (tmp_path / "stack.json").write_text(json.dumps({"redis_port": ports["redis_port"], "api_port": unchosen}))
        chosen = Stack(Settings(home=tmp_path)).config
        assert chosen.redis_port == ports["redis_port"] and chosen.api_port > 0


@pytest.mark.parametrize("first", ["down", "frozen"])
def test_searches_and_listings_go_to_a_replica_that_answers(api: FakeAPI, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str], first: str) -> None:
    """With replicas, every search and listing went to replica 1: with it down, `bucketlens search` said "no answer
    ... is the stack up?" while replica 2 served, and `status` said the index was well (review 76). A frozen one
    takes connections and answers nothing (review 77)."""
    frozen = socket.create_server(("127.0.0.1", 0))  # (listens, never accepts: the kernel completes handshakes)
    port = frozen.getsockname()[1] if first == "frozen" else free_port()
    (tmp_path / "stack.json").write_text(json.dumps({
        "redis_port": 1, "s3_port": 1, "mon_port": 1, "ingest_port": 1, "api_port": port, "webhook_token": "w",
        "admin_token": "admin", "index_backend": "milvus", "milvus_port": 3, "replica_ports": [api.port]}))
    api.answers[("GET", "/healthz")] = (200, {"ok": True})
    api.answers[("POST", "/search")] = (200, {"model": "m", "took_ms": 1.0, "results": [
        {"bucket": "b", "key": "sky.jpg", "score": 0.9, "verified": False, "matches": 0, "labels": None}]})
    with frozen:
        assert main(["search", "--key", "cloud.jpg"]) == 0
    assert "0.9000  b/sky.jpg" in capsys.readouterr().out
    assert [r["path"] for r in api.requests] == ["/healthz", "/search"]


def test_rebuild_and_reconcile_go_to_the_replica_that_writes(api: FakeAPI, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """With replicas, only the writer rebuilds and reconciles; the CLI asked the first one, which answered 409
    not_writer, and `--cancel` said "no rebuild is running" while the writer's ran (an independent check)."""
    reader = FakeAPI()
    threading.Thread(target=reader.server.serve_forever, daemon=True).start()
    try:
        (tmp_path / "stack.json").write_text(json.dumps({
            "redis_port": 1, "s3_port": 1, "mon_port": 1, "ingest_port": 1, "api_port": reader.port,
            "webhook_token": "w", "admin_token": "admin", "index_backend": "milvus", "milvus_port": 3,
            "replica_ports": [api.port]}))
        reader.answers[("GET", "/stats")] = (200, {"writer": False})
        api.answers[("GET", "/stats")] = (200, {"writer": True, "rebuild": {"id": "r9", "state": "running"}})
        api.answers[("DELETE", "/rebuild/r9")] = (200, {"id": "r9", "state": "cancelled", "done": 3, "total": 9})
        api.answers[("POST", "/reconcile")] = (200, {"listed": 0, "missing": 0, "changed": 0, "removed": 0,
                                                     "seconds": 0.1})
        assert main(["rebuild", "--cancel"]) == 0
        assert "rebuild r9 cancelled at 3/9" in capsys.readouterr().out
        assert main(["reconcile"]) == 0
        assert [r["path"] for r in api.requests if r["method"] != "GET"] == ["/rebuild/r9", "/reconcile"]
        assert all(r["method"] == "GET" for r in reader.requests)
    finally:
        reader.server.shutdown()
        reader.server.server_close()


def test_a_running_stack_keeps_its_replica_count_until_it_is_down(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """`up --replicas 1` on a running 2-replica stack dropped api-2 from stack.json while the supervisor kept
    restarting it, and `down` then left it running (an independent check)."""
    config = {"redis_port": 1, "s3_port": 1, "mon_port": 1, "ingest_port": 1, "api_port": 2, "webhook_token": "w",
              "admin_token": "a", "index_backend": "milvus", "milvus_port": 3, "replica_ports": [4]}
    (tmp_path / "stack.json").write_text(json.dumps(config))
    (tmp_path / "run").mkdir()
    api = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # stands for the running api
    try:
        (tmp_path / "run" / "api.pid").write_text(str(api.pid))
        monkeypatch.setenv("BUCKETLENS_HOME", str(tmp_path))
        assert main(["up", "--replicas", "1"]) == 1
        one_error_line(capsys, "bucketlens up:", "runs 2 index service replica(s); 'bucketlens down' first")
        assert json.loads((tmp_path / "stack.json").read_text())["replica_ports"] == [4]
    finally:
        api.kill()
        api.wait()


def test_a_switch_to_faiss_drops_the_replicas_it_cannot_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """`up --backend faiss` on a stack that ran two Milvus replicas started two FAISS index services, which fought
    for the writer lease; the one clients ask held an empty index and `up` failed after 5 minutes (review 29)."""
    config = {"redis_port": 1, "s3_port": 1, "mon_port": 1, "ingest_port": 1, "api_port": 2, "webhook_token": "w",
              "admin_token": "a", "index_backend": "milvus", "milvus_port": 3, "replica_ports": [4, 5]}
    (tmp_path / "stack.json").write_text(json.dumps(config))
    monkeypatch.setenv("BUCKETLENS_HOME", str(tmp_path))
    stack, _ = _stack_for_up(Settings.from_env(), argparse.Namespace(backend="faiss"))
    assert stack.services == ("ingest", "worker", "api", "supervisor")
    assert json.loads((tmp_path / "stack.json").read_text())["replica_ports"] == []
    assert "the faiss backend runs 1 index service replica(s); this stack ran 3" in capsys.readouterr().out
    stack, _ = _stack_for_up(Settings.from_env(), argparse.Namespace(backend="milvus"))  # back: one, until asked
    assert stack.services == ("ingest", "worker", "api", "supervisor") and "replica" not in capsys.readouterr().out


def test_a_stack_that_cannot_do_what_is_asked_says_so_in_one_line(api: FakeAPI,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["up", "--replicas", "3"]) == 1  # FAISS: one process holds the index; refused before starting
    one_error_line(capsys, "bucketlens up:", "1 to 1 index service replicas", "--backend milvus")
    assert main(["up", "--replicas", "0"]) == 1  # was taken for "not given"
    one_error_line(capsys, "bucketlens up:", "1 to 1 index service replicas")
    with pytest.raises(SystemExit) as refused:  # `queues --watch --interval 0` spun ~7 refreshes a second
        main(["queues", "--watch", "--interval", "0"])
    assert refused.value.code == 2


@pytest.mark.parametrize(("args", "words"), [
    (["queues", "--interval", "2"], ["--interval is how often --watch refreshes"]),
    (["rebuild", "--cancel", "--wait"], ["--cancel takes no --wait"]),
    (["rebuild", "--cancel", "r1", "--model", "m", "--reindex"], ["--cancel takes no --reindex or --model"]),
    (["search", "--text", "cat", "--min-score", "x"], ["--min-score: must be a number, not 'x'"]),
    (["failures", "--retry", "--limit", "5"], ["usage: bucketlens failures ", "--limit pages the listing"]),
    (["failures", "--clear", "--offset", "0"], ["--offset pages the listing"]),  # (was ignored: review 31)
    (["rebuild", "--cancel", "--wait"], ["usage: bucketlens rebuild "]),  # its own usage, not the command list's
    # a typo: the command's usage and the option likely meant (the top-level usage listed the commands: review 26)
    (["search", "--prefx", "a/", "--text", "cat"], ["usage: bucketlens search ", "bucketlens search: error: "
                                                   "unrecognized arguments: --prefx (did you mean --prefix?)"]),
    (["status", "--jsn"], ["usage: bucketlens status [-h] [--json]", "--jsn (did you mean --json?)"]),
    (["--json", "status"], ["--json (--json goes after the command: bucketlens status --json)"]),  # (not "did you
    # mean --json?": review 27)
    (["upload", "--bucket", "Bad_Bucket!", "a.jpg"], ["argument --bucket: 'Bad_Bucket!' is no S3 bucket name"]),
])
def test_options_that_mean_nothing_together_or_do_not_parse_are_refused(
        args: list[str], words: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """``--interval`` without ``--watch`` and ``rebuild --cancel --wait`` were ignored without a word, and a
    ``--min-score`` that is no number said "invalid _finite value" (an independent check)."""
    with pytest.raises(SystemExit) as refused:
        main(args)
    err = capsys.readouterr().err
    assert refused.value.code == 2 and all(word in err for word in words) and "_finite" not in err, err


# -- client commands ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [["duplicates"], ["queues"], ["failures"], ["search", "--key", "a.jpg"],
                                     ["reconcile"], ["rebuild"]])
def test_every_client_command_asks_the_local_stacks_index_service(api: FakeAPI, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   command: list[str]) -> None:
    """The stack's ports are in its stack.json, not in the environment (`duplicates` asked port 7400, whatever
    answered there: another stack's groups)."""
    (tmp_path / "stack.json").write_text(json.dumps({
        "redis_port": 1, "s3_port": 1, "mon_port": 1, "ingest_port": 1, "api_port": api.port, "webhook_token": "w",
        "admin_token": "admin"}))
    monkeypatch.setenv("BUCKETLENS_API_PORT", str(free_port()))  # nothing there
    main(command)
    assert api.requests, f"{command[0]} did not ask the stack's index service"


def test_an_index_service_that_does_not_answer_is_named_in_one_line(api: FakeAPI, monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    monkeypatch.setenv("BUCKETLENS_API_PORT", str(port))
    assert main(["queues"]) == 1  # was "bucketlens queues: [Errno 111] Connection refused"
    one_error_line(capsys, f"bucketlens queues: no answer from http://127.0.0.1:{port} (", "Connection refused",
                   "is the stack up? `bucketlens status` says")


def test_output_cut_short_by_its_reader_is_no_traceback(api: FakeAPI) -> None:
    """`bucketlens failures --json | head -5` ended in a BrokenPipeError traceback."""
    api.answers[("GET", "/queues")] = (200, {"queues": {}, "padding": "x" * 100_000})
    process = cli_process(["queues", "--json"])
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # the reader has gone before the answer is written
    with process.stderr:
        err = process.stderr.read()
    process.wait(timeout=60)
    assert "Traceback" not in err and process.returncode == 1, err


def test_down_where_no_stack_was_set_up_sets_none_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "never-up"
    monkeypatch.setenv("BUCKETLENS_HOME", str(home))
    assert main(["down"]) == 0
    assert "nothing to stop" in capsys.readouterr().out and not home.exists()  # wrote ports and tokens before


def test_upload_leaves_out_macos_metadata_and_hidden_files_unless_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A folder copied from a Mac holds "._IMG_1.jpg" (AppleDouble metadata) beside each photo: each was uploaded
    and became a not_an_image failure record; `.thumbnails/` and Synology's `@eaDir/` added a thumbnail of each photo
    (independent checks). A hidden file named on its own is uploaded."""
    for name in ("a.jpg", "._a.jpg", "sub/.hidden/b.png", ".c.jpg", "@eaDir/a.jpg/SYNOPHOTO_THUMB_M.jpg", "notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    keys, skipped, hidden = upload_plan([tmp_path], "p/")
    # notes.txt and "._a.jpg" are other files, with or without --hidden ("._a.jpg" was counted as hidden, which
    # --hidden would take, and it did not: review 57)
    assert sorted(keys) == ["p/a.jpg"] and (skipped, hidden) == (2, 3)
    keys, skipped, hidden = upload_plan([tmp_path], "p/", hidden=True)
    assert sorted(keys) == ["p/.c.jpg", "p/@eaDir/a.jpg/SYNOPHOTO_THUMB_M.jpg", "p/a.jpg", "p/sub/.hidden/b.png"]
    assert (skipped, hidden) == (2, 0)
    assert sorted(upload_plan([tmp_path / ".c.jpg"], "")[0]) == [".c.jpg"]
    monkeypatch.setenv("BUCKETLENS_HOME", str(tmp_path / "no-stack"))
    assert main(["upload", str(tmp_path / "sub")]) == 1  # (only a hidden folder's image below it)
    one_error_line(capsys, "no images", "(1 hidden file left out: --hidden takes them)")
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "notes.txt").write_text("not an image")
    assert main(["upload", str(tmp_path / "texts")]) == 1  # (it did not count what it left out: review 79)
    one_error_line(capsys, "no images", "(1 other file left out)")


def test_upload_goes_through_linked_folders_once_and_counts_broken_links(tmp_path: Path) -> None:
    """A linked folder's photos and a broken link were left out without a word (review 31); a link loop ends; a
    link to a folder below takes nothing from it, whatever their order (review 34: ``.latest`` hid 2023's photos,
    ``00-best`` took them under its name)."""
    (tmp_path / "photos/2023").mkdir(parents=True)
    (tmp_path / "photos/2023/a.jpg").write_bytes(b"x")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere/b.jpg").write_bytes(b"x")
    (tmp_path / "photos/linked").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "photos/loop").symlink_to(tmp_path / "photos")
    (tmp_path / "photos/broken.jpg").symlink_to(tmp_path / "gone.jpg")
    (tmp_path / "photos/.latest").symlink_to(tmp_path / "photos/2023")
    (tmp_path / "photos/00-best").symlink_to(tmp_path / "photos/2023")
    keys, skipped, hidden = upload_plan([tmp_path / "photos"], "")
    assert sorted(keys) == ["2023/a.jpg", "linked/b.jpg"] and (skipped, hidden) == (1, 0)


def test_upload_takes_phone_photos_counts_what_it_left_and_says_a_missing_bucket_in_one_line(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    unique_prefix: str
) -> None:
    import pillow_heif
    from PIL import Image

    pillow_heif.register_heif_opener()
    Image.new("RGB", (64, 48), (200, 40, 40)).save(tmp_path / "phone.HEIC")
    Image.new("RGB", (64, 48), (40, 200, 40)).save(tmp_path / "camera.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    monkeypatch.setenv("BUCKETLENS_HOME", str(stack.home))
    assert main(["status"]) == 0, capsys.readouterr().out  # every process runs (it is 3 when one is down)
    assert stack.home.stat().st_mode & 0o777 == 0o700  # the OSD's block file holds every image: owner only
    capsys.readouterr()
    assert main(["upload", str(tmp_path), "--prefix", unique_prefix, "--bucket", stack.settings.bucket]) == 0
    out, err = capsys.readouterr()
    assert f"uploaded 2 images to s3://{stack.settings.bucket}/{unique_prefix}; 1 other file left out" in out, out
    assert "\r" not in err and "note:" not in out, (out, err)  # (not a terminal: no progress bar frames, review 79)
    # Another bucket, which does not notify the stack: said uploaded, and never indexed, without a word (review 79)
    other = f"other-{unique_prefix.strip('/').lower()}"
    s3 = make_client(stack.settings)
    s3.create_bucket(Bucket=other)
    try:
        assert main(["upload", str(tmp_path / "camera.jpg"), "--bucket", other]) == 0
        assert (f"note: bucket {other!r} does not notify this stack, so its objects are not indexed: `bucketlens "
                f"reconcile --bucket {other}` indexes what it holds now") in capsys.readouterr().out
    finally:
        s3.delete_object(Bucket=other, Key="camera.jpg")
        s3.delete_bucket(Bucket=other)
    assert main(["upload", str(tmp_path), "--bucket", "no-such-bucket-here"]) == 1  # was a traceback
    one_error_line(capsys, "bucketlens upload: no bucket 'no-such-bucket-here' at http://127.0.0.1:",
                   f"(the stack's is {stack.settings.bucket!r}: leave out --bucket); create it with your S3 tools")
    # A prefix without '/' joins the names; the line read like a folder's (an independent check).
    joined = unique_prefix + "nosl"
    assert main(["upload", str(tmp_path / "camera.jpg"), "--prefix", joined, "--bucket", stack.settings.bucket]) == 0
    assert (f"uploaded 1 image to s3://{stack.settings.bucket} under the key prefix {joined!r} "
            f"(e.g. '{joined}camera.jpg': add '/' for a folder)") in capsys.readouterr().out
    # A prefix whose keys browsers cannot open by presigned URL is uploaded, with a note (review 31).
    dotted = f"{unique_prefix}../odd/"
    assert main(["upload", str(tmp_path / "camera.jpg"), "--prefix", dotted, "--bucket", stack.settings.bucket]) == 0
    out = capsys.readouterr().out
    assert f"note: keys under {dotted!r} have a leading '/' or a '.' or '..' segment" in out, out


def test_upload_takes_files_and_folders_and_refuses_two_files_for_one_key(
    stack: Stack, s3: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    unique_prefix: str
) -> None:
    """``bucketlens upload photo.jpg`` said "is not a folder": files are taken too, beside folders."""
    from PIL import Image

    for path, colour in (("a/sub/one.jpg", (200, 40, 40)), ("b/two.png", (40, 200, 40)), ("b/one.jpg", (9, 9, 200))):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 48), colour).save(tmp_path / path)
    monkeypatch.setenv("BUCKETLENS_HOME", str(stack.home))
    bucket = ["--bucket", stack.settings.bucket, "--prefix", unique_prefix]
    assert main(["upload", str(tmp_path / "b" / "two.png"), str(tmp_path / "a"), *bucket]) == 0
    assert "uploaded 2 images" in capsys.readouterr().out
    listed = s3.list_objects_v2(Bucket=stack.settings.bucket, Prefix=unique_prefix)["Contents"]
    assert sorted(o["Key"].removeprefix(unique_prefix) for o in listed) == ["sub/one.jpg", "two.png"]
    assert main(["upload", str(tmp_path / "b" / "one.jpg"), str(tmp_path / "a" / "sub"), *bucket]) == 1
    one_error_line(capsys, "/b/one.jpg", "/a/sub/one.jpg", f"would both be uploaded as '{unique_prefix}one.jpg'")
    assert main(["upload", str(tmp_path / "missing.jpg"), *bucket]) == 1
    one_error_line(capsys, "missing.jpg: no such file or folder")
    # A file the workers index goes up in one PUT, so that its etag is its MD5 (over 8 MB boto3 sent it in parts, and
    # a search with the same file never said it identical: review 61).
    Image.new("RGB", (1800, 1750), (90, 120, 200)).save(tmp_path / "big.bmp")  # 9.4 MB
    assert main(["upload", str(tmp_path / "big.bmp"), *bucket]) == 0
    etag = s3.head_object(Bucket=stack.settings.bucket, Key=unique_prefix + "big.bmp")["ETag"].strip('"')
    assert etag == hashlib.md5((tmp_path / "big.bmp").read_bytes()).hexdigest(), etag
    assert "over the workers' limit" not in capsys.readouterr().out
    # A file over the live workers' MAX_OBJECT_BYTES is stored and never indexed: said (review 86: nothing was)
    redis, keys = connect(stack.settings.redis_url), Keys(stack.settings.namespace)
    redis.set(keys.worker("small:1"), json.dumps({"id": "small:1", "last_seen": time.time(),
                                                  "limits": {"max_object_bytes": 9_000_000}}), ex=60)
    redis.sadd(keys.workers, "small:1")
    try:
        assert main(["upload", str(tmp_path / "big.bmp"), str(tmp_path / "b" / "two.png"), *bucket]) == 0
        assert (f"note: 1 file ({unique_prefix}big.bmp) over the workers' limit of 9000000 bytes "
                "(BUCKETLENS_MAX_OBJECT_BYTES): stored, and not indexed") in capsys.readouterr().out
    finally:
        redis.delete(keys.worker("small:1"))
        redis.srem(keys.workers, "small:1")


def test_demo_uploads_the_samples_and_finds_each_edited_copys_source(
    stack: Stack, s3: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`make demo` (README's first command) on a running stack: the samples are uploaded and searched."""
    monkeypatch.setenv("BUCKETLENS_HOME", str(stack.home))
    monkeypatch.setenv("BUCKETLENS_BUCKET", stack.settings.bucket)
    try:
        assert main(["demo"]) == 0
    finally:  # full-size copies of photos other tests use: their duplicate groups would gather around these
        listed = s3.list_objects_v2(Bucket=stack.settings.bucket, Prefix="samples/").get("Contents", [])
        for item in listed:
            s3.delete_object(Bucket=stack.settings.bucket, Key=item["Key"])
        with httpx.Client(base_url=stack.api_url, timeout=30) as index:
            wait_for(lambda: all(object_state(index, stack.settings.bucket, o["Key"]) is None for o in listed), 120,
                     what="the samples gone from the index")
    out = capsys.readouterr().out
    assert "uploaded" in out and out.count("\nnearest to samples/") == 3, out
    for block in out.split("\nnearest to ")[1:]:  # (by key, itself left out) its edited copy first, the same photo
        stem = block.split("  (", 1)[0].removeprefix("samples/").removesuffix(".jpg")
        assert f"samples/augmented/{stem}-flipped-crop.jpg  same photo" in block.split("\n")[1], block


def test_up_on_a_running_stack_says_its_processes_keep_their_settings(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`BATCH_SIZE=4 bucketlens up` on a running stack changed nothing without a word; with a read token, the web
    page's address lacked it (the page answered 401) and `status --json` did not give it (an independent check)."""
    monkeypatch.setenv("BUCKETLENS_HOME", str(stack.home))
    monkeypatch.setenv("BUCKETLENS_BUCKET", stack.settings.bucket)
    monkeypatch.setenv("BUCKETLENS_READ_TOKEN", "r+t&")
    assert main(["up"]) == 0
    out = capsys.readouterr().out
    assert "keep the settings they started with" in out, out
    assert "is running" in out and "starting the local stack" not in out, out  # (it said "starting" on a running one)
    # The page's address carries the token the running service has (none: it kept its settings), not this shell's
    assert f"web page {stack.api_url}/  " in out, out
    assert main(["status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["read_token"] == "r+t&"  # this shell's own word, for its commands
    assert status["page_url"] == f"{stack.api_url}/"  # the page opens with the service's (none), as `up` says
    assert page_url("http://h:1", "r+t&/ ?") == "http://h:1/?token=r%2Bt%26%2F%20%3F"


def test_up_on_a_bucket_that_holds_photos_already_indexes_them(
    stack: Stack, s3: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`BUCKETLENS_BUCKET=existing bucketlens up` subscribed a bucket of 60 photos and indexed none of them, and
    nothing said so: only a reconcile by hand found them (review 78)."""
    bucket = "test-held-before"
    ensure_bucket(s3, bucket)
    keys = ["before/a.jpg", "before/b.jpg"]
    for key, name in zip(keys, ("chelsea.png", "coffee.png")):
        s3.put_object(Bucket=bucket, Key=key, Body=photo(name))
    monkeypatch.setenv("BUCKETLENS_HOME", str(stack.home))
    monkeypatch.setenv("BUCKETLENS_BUCKET", bucket)
    settings = dataclasses.replace(stack.settings, bucket=bucket)
    try:
        assert main(["up"]) == 0
        assert f"bucket {bucket} holds objects it never told this stack of: reconciling" in capsys.readouterr().err
        with httpx.Client(base_url=stack.api_url, timeout=30) as index:
            wait_for(lambda: all((state := object_state(index, bucket, key)) and state["state"] == "indexed"
                                 for key in keys), 120, what="the photos the bucket held before indexed")
        assert main(["up"]) == 0  # (told of it now: no reconcile again)
        assert "reconciling" not in capsys.readouterr().err
    finally:
        for key in keys:  # (notified: their deletes take them out of the index)
            s3.delete_object(Bucket=bucket, Key=key)
        with httpx.Client(base_url=stack.api_url, timeout=30) as index:
            wait_for(lambda: all(object_state(index, bucket, key) is None for key in keys), 120,
                     what="the bucket's photos gone from the index")
        remove_notifications(settings, bucket)


def test_another_shells_commands_take_the_bucket_and_tokens_of_the_running_service(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`BUCKETLENS_READ_TOKEN=... BUCKETLENS_BUCKET=my.photos bucketlens up`, then a new shell: its commands got 401
    with no hint and `status` named the default bucket (an independent check). Client commands now take the bucket
    and tokens the index service runs with (recorded when the stack starts it), unless their own shell sets them."""
    for name in ("BUCKETLENS_BUCKET", "BUCKETLENS_READ_TOKEN", "BUCKETLENS_ADMIN_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BUCKETLENS_HOME", str(stack.home))
    assert Settings.from_env().bucket != stack.settings.bucket  # (the default: what this shell alone would name)
    assert main(["status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bucket"] == stack.settings.bucket
    assert client_settings(Settings.from_env()).bucket == stack.settings.bucket
    monkeypatch.setenv("BUCKETLENS_BUCKET", "another-bucket")
    assert client_settings(Settings.from_env()).bucket == "another-bucket"  # the shell's own word wins


def test_client_settings_come_from_a_running_service_only(tmp_path: Path) -> None:
    stack = Stack(Settings(home=tmp_path))
    (tmp_path / "run").mkdir(exist_ok=True)
    (tmp_path / "run" / "api-settings.json").write_text(json.dumps(
        {"bucket": "my.photos-2024", "read_token": "rt", "admin_token": "mine", "s3_endpoint": "http://elsewhere",
         "api_host": "::1", "namespace": "its.ns"}))
    assert stack.for_clients().bucket == Settings().bucket  # no index service runs: the record is not its
    (tmp_path / "run" / "api.pid").write_text(pid_record(os.getpid()))  # this process stands in for one
    # Reached where it binds from any shell (`status` named 127.0.0.1 for one bound to ::1: review 48).
    assert Stack(Settings(home=tmp_path)).api_url == f"http://[::1]:{stack.config.api_port}"
    seen = stack.for_clients()
    assert (seen.bucket, seen.read_token, seen.admin_token) == ("my.photos-2024", "rt", "mine")
    assert seen.namespace == "its.ns"  # (`status --json` named the shell's: review 86)
    assert Stack(Settings(home=tmp_path)).settings.namespace == "its.ns"  # and what `up` starts beside it joins it
    assert seen.s3_endpoint == stack.settings.s3_endpoint  # only the bucket and tokens are taken
    assert stack.for_clients(["read_token"]).read_token == ""  # what the client's shell sets stays
    # Ingest's webhook token likewise: `status --json` named the stack's, which ingest refused (review 48).
    (tmp_path / "run" / "ingest-settings.json").write_text(json.dumps({"webhook_token": "wt", "bucket": "not-its"}))
    assert stack.for_clients().webhook_token == stack.settings.webhook_token  # no ingest runs
    (tmp_path / "run" / "ingest.pid").write_text(pid_record(os.getpid()))
    seen = stack.for_clients()
    assert (seen.webhook_token, seen.bucket) == ("wt", "my.photos-2024")  # (a bucket is the index service's word)
    # And `up` from a shell without it points the notifications at the token ingest takes (review 50).
    assert Stack(Settings(home=tmp_path)).settings.webhook_token == "wt"



def test_an_empty_variable_is_not_a_setting_of_the_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    """``BUCKETLENS_ADMIN_TOKEN=`` counted as set: the CLI sent stack.json's token, neither none nor the running
    service's, and got 401 (an independent review)."""
    monkeypatch.setenv("BUCKETLENS_ADMIN_TOKEN", "")
    monkeypatch.setenv("BUCKETLENS_READ_TOKEN", "rt")
    assert "admin_token" not in _explicit() and "read_token" in _explicit()


def test_a_401_names_the_variable_the_cli_sends() -> None:
    for variable, message in (("BUCKETLENS_READ_TOKEN", "missing or wrong read token"),
                              ("BUCKETLENS_ADMIN_TOKEN", "missing or wrong admin token")):
        response = httpx.Response(401, json={"error": {"code": "unauthorized", "message": message}})
        assert _error_text(response) == f"401 unauthorized: {message} (the CLI sends {variable}: set it to the " \
                                        "index service's)"


def test_up_says_a_port_override_is_not_used(api: FakeAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """The stack keeps the ports of its first `up` (stack.json): `BUCKETLENS_API_PORT=47999 bucketlens up` kept
    another port without a word."""
    (tmp_path / "stack.json").write_text(json.dumps({
        "redis_port": 1, "s3_port": 1, "mon_port": 1, "ingest_port": 1, "api_port": api.port, "webhook_token": "w",
        "admin_token": "admin"}))
    monkeypatch.setenv("BUCKETLENS_API_PORT", "47999")
    assert main(["up", "--replicas", "3"]) == 1  # refused before starting anything, after the note
    assert (f"note: BUCKETLENS_API_PORT=47999 is not used: this stack keeps its api_port {api.port} in "
            f"{tmp_path / 'stack.json'}") in capsys.readouterr().out


def test_a_server_the_shell_names_that_the_stack_replaces_is_noted(
        api: FakeAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """An upload with BUCKETLENS_S3_ENDPOINT naming another server went to the stack's, without a word (review 86)."""
    (tmp_path / "stack.json").write_text(json.dumps({
        "redis_port": 1, "s3_port": 1, "mon_port": 1, "ingest_port": 1, "api_port": api.port, "webhook_token": "w",
        "admin_token": "admin"}))
    monkeypatch.setenv("BUCKETLENS_S3_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("BUCKETLENS_REDIS_URL", "redis://:Sup3rSecret@127.0.0.1:9/0")
    api.answers[("GET", "/queues")] = (200, {"queues": {}})
    main(["queues", "--json"])
    err = capsys.readouterr().err
    assert (f"bucketlens: note: BUCKETLENS_S3_ENDPOINT='http://127.0.0.1:9' is not used: the local stack in {tmp_path} "
            "runs its own, http://127.0.0.1:1 (another BUCKETLENS_HOME for another stack)") in err, err
    assert "BUCKETLENS_REDIS_URL='redis://:***@127.0.0.1:9/0' is not used" in err and "Sup3r" not in err, err
    monkeypatch.setenv("BUCKETLENS_S3_ENDPOINT", "http://127.0.0.1:1/")  # the stack's own, spelt otherwise
    monkeypatch.setenv("BUCKETLENS_REDIS_URL", "redis://127.0.0.1:1")
    main(["queues", "--json"])
    assert "is not used" not in capsys.readouterr().err


def test_up_says_a_namespace_bucket_or_read_token_other_than_the_last_start(
        api: FakeAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`down`, then `up` from a shell without the settings the stack ran with: it served an empty index of the default
    namespace, searches open, and the uploads to the stack's bucket went unindexed, without a word (review 86)."""
    (tmp_path / "stack.json").write_text(json.dumps({
        "redis_port": 1, "s3_port": 1, "mon_port": 1, "ingest_port": 1, "api_port": api.port, "webhook_token": "w",
        "admin_token": "admin"}))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "api-settings.json").write_text(json.dumps({
        "bucket": "pics", "read_token": "secret-rt", "admin_token": "admin", "api_host": "127.0.0.1",
        "namespace": "rv.ns"}))
    monkeypatch.setattr(Stack, "up", lambda self: None)  # (the services are the fake API)
    api.answers[("GET", "/stats")] = (200, {"model": "m", "generation": 3, "vectors": 9, "index_type": "Flat"})
    assert main(["up"]) == 0
    out = capsys.readouterr().out
    for said in ("note: BUCKETLENS_NAMESPACE is 'bl' where this stack last ran with 'rv.ns': its index, queues and "
                 "failure records are another's (`bucketlens down`, then `up` with it set, to go back)",
                 "note: BUCKETLENS_BUCKET is 'images' where this stack last ran with 'pics'",
                 "note: BUCKETLENS_READ_TOKEN is none where this stack last ran with a token"):
        assert said in out, out
    assert "secret-rt" not in out
    for name, value in (("NAMESPACE", "rv.ns"), ("BUCKET", "pics"), ("READ_TOKEN", "secret-rt")):
        monkeypatch.setenv(f"BUCKETLENS_{name}", value)
    assert main(["up"]) == 0
    assert "note: BUCKETLENS_" not in capsys.readouterr().out


def test_up_and_status_say_why_the_last_rebuild_failed(api: FakeAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A `down` during a rebuild fails it; the next `up` said nothing, and `status` only "rebuild r1 failed 4/10"
    (review 49)."""
    (tmp_path / "stack.json").write_text(json.dumps({
        "redis_port": 1, "s3_port": 1, "mon_port": 1, "ingest_port": 1, "api_port": api.port, "webhook_token": "w",
        "admin_token": "admin"}))
    monkeypatch.setattr(Stack, "up", lambda self: None)  # (the services are the fake API)
    why = "the index service restarted during the rebuild; the serving generation is intact: run it again"
    failed = {**RUNNING, "state": "failed", "error": why}
    api.answers[("GET", "/stats")] = (200, {"model": "m", "generation": 3, "vectors": 9, "index_type": "Flat",
                                            "rebuild": failed})
    assert main(["up"]) == 0
    assert f"note: the last rebuild, r1 (reindex), failed: {why}\n" in capsys.readouterr().out
    main(["status"])
    assert f"; rebuild r1 failed 4/10 ({why})" in capsys.readouterr().out
    api.answers[("GET", "/stats")] = (200, {"model": "m", "generation": 3, "vectors": 9, "index_type": "Flat",
                                            "rebuild": {**failed, "state": "done", "error": ""}})
    assert main(["up"]) == 0
    assert "rebuild" not in capsys.readouterr().out
    # A model set for the stack changes no index (review 57: `up` said nothing of it)
    monkeypatch.setenv("BUCKETLENS_MODEL", "lite0-copy-v3-fast")
    assert main(["up"]) == 0
    assert ("note: the index keeps its model, m: BUCKETLENS_MODEL=lite0-copy-v3-fast does not change an index; "
            "`bucketlens rebuild --model lite0-copy-v3-fast --wait` moves it (no downtime)") in capsys.readouterr().out


def test_up_and_status_name_the_processes_that_run_other_code(api: FakeAPI, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """An upgrade while the stack ran: `up` started only what was missing, and nothing said that the rest ran the
    old release on (review 51). Real processes stand for the services (the pid files as the stack writes them)."""
    (tmp_path / "stack.json").write_text(json.dumps({
        "redis_port": 1, "s3_port": 1, "mon_port": 1, "ingest_port": 1, "api_port": api.port, "webhook_token": "w",
        "admin_token": "admin"}))
    monkeypatch.setattr(Stack, "up", lambda self: None)
    api.answers[("GET", "/stats")] = (200, {"model": "m", "generation": 3, "vectors": 9, "index_type": "Flat",
                                            "rebuild": None})
    (tmp_path / "run").mkdir()
    services = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(2)]
    try:
        for name, process in zip(("ingest", "worker"), services, strict=True):
            (tmp_path / "run" / f"{name}.pid").write_text(pid_record(process.pid))
        (tmp_path / "run" / "ingest.code").write_text(code_version())  # started from this checkout
        (tmp_path / "run" / "api.code").write_text("older")  # not running: nothing to say of it
        # the worker's: none (started by a release before this one wrote them)
        assert main(["up"]) == 0
        note = ("note: worker runs other code than this checkout's (started before it changed: an upgrade); "
                "`bucketlens down` and `up` start them on it")
        assert note in capsys.readouterr().out
        main(["status"])
        assert note in capsys.readouterr().out
        (tmp_path / "run" / "ingest.code").write_text("older")
        main(["status", "--json"])
        assert json.loads(capsys.readouterr().out)["other_code"] == ["ingest", "worker"]
        for name in ("ingest", "worker"):
            (tmp_path / "run" / f"{name}.code").write_text(code_version())
        assert main(["up"]) == 0
        assert "other code" not in capsys.readouterr().out
    finally:
        for process in services:
            process.kill()
            process.wait()


def test_one_up_or_down_at_a_time_on_a_home(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two `up`s at once on one home both found a service missing and started it twice. A second `up` or `down`
    now waits for the first, and says so; here the first is another process holding the stack's lock as `up` does."""
    stack = Stack(Settings(home=tmp_path))
    released = tmp_path / "released"
    (tmp_path / "run").mkdir(exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", f"""
import fcntl, time
with open({str(tmp_path / "run" / "up.lock")!r}, "a+") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    lock.write("up (pid 1234)"); lock.flush()
    print("held", flush=True)
    time.sleep(2)
    open({str(released)!r}, "w").close()
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with stack._one_at_a_time("down"):
            assert released.exists()  # only once the first one ended
            assert (tmp_path / "run" / "up.lock").read_text() == f"down (pid {os.getpid()})"
        assert f"waiting for another `bucketlens up (pid 1234)` on {tmp_path} to end" in capsys.readouterr().err
        with stack._one_at_a_time("up"):  # free: no wait, nothing said
            pass
        assert capsys.readouterr().err == ""
    finally:
        holder.kill()
        holder.communicate()


def test_two_first_ups_at_once_take_one_stack_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two first `up`s released at once on a new home each chose ports and wrote them; the one that waited for
    the other's lock then started on ports the file no longer named, and the stack stayed broken (review 59). The
    first file made stands; the other process reads it. Here the other `up` writes its file while this one
    chooses its ports."""
    import infra.stack as stack_module

    theirs = {"redis_port": 41001, "s3_port": 41002, "mon_port": 41003, "ingest_port": 41004, "api_port": 41005,
              "webhook_token": "their-w", "admin_token": "their-a"}
    chosen = stack_module.free_port

    def racing(preferred: int, by: str = "") -> int:
        if not (tmp_path / "stack.json").exists():
            (tmp_path / "stack.json").write_text(json.dumps(theirs))
        return chosen(preferred, by=by)

    monkeypatch.setattr(stack_module, "free_port", racing)
    stack = Stack(Settings(home=tmp_path))
    assert (stack.config.api_port, stack.config.admin_token) == (41005, "their-a")
    assert json.loads((tmp_path / "stack.json").read_text()) == theirs and not list(tmp_path.glob("*.tmp"))


def test_an_up_interrupted_while_it_waits_for_another_stops_nothing(
        api: FakeAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C on an `up` waiting for another one (nothing ran when it began) took the "stopping what it started"
    way, and its `down` stopped the whole stack the first `up` had just started (review 58)."""
    (tmp_path / "stack.json").write_text(json.dumps({
        "redis_port": 1, "s3_port": 1, "mon_port": 1, "ingest_port": 1, "api_port": api.port, "webhook_token": "w",
        "admin_token": "admin"}))

    @contextlib.contextmanager
    def interrupted_while_waiting(self: Stack, command: str) -> Iterator[None]:
        raise KeyboardInterrupt
        yield

    stopped: list[bool] = []
    monkeypatch.setattr(Stack, "_one_at_a_time", interrupted_while_waiting)
    monkeypatch.setattr(Stack, "down", lambda self: stopped.append(True))
    assert main(["up"]) == 130
    assert not stopped and "what ran before goes on running" in capsys.readouterr().err


def test_a_rebuild_that_left_objects_out_says_how_to_bring_them_back(api: FakeAPI,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A reembed under a lower MAX_PIXELS swapped in without 38 of 65 objects and said "38 failed" alone; raising
    the limit again did not bring them back, only `failures --retry` does (review 26)."""
    api.answers[("POST", "/rebuild")] = (202, RUNNING)
    api.answers[("GET", "/rebuild/r1")] = (200, {**RUNNING, "state": "done", "done": 65, "total": 65, "failed": 38})
    assert main(["rebuild", "--wait"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "rebuild r1 done: 65/65 settled, 38 failed: not in the new index (a corrupt or empty file, no image, or over "
        "a limit such as BUCKETLENS_MAX_PIXELS); `bucketlens failures` says which and why, `bucketlens failures "
        "--retry` sends them again once mended")  # (not "after raising a limit" for corrupt files: review 31)


def test_waiting_outlasts_a_service_briefly_away(api: FakeAPI, capsys: pytest.CaptureFixture[str]) -> None:
    """A 503 while waiting (the service restarting, Redis coming back) ended the wait with a traceback (an
    independent review); the wait goes on, and a 4xx is one line."""
    api.answers[("POST", "/rebuild")] = (202, RUNNING)
    api.answers[("GET", "/rebuild/r1")] = (503, {"error": {"code": "redis_unavailable", "message": "Redis is down"}})
    threading.Timer(3, lambda: api.answers.update({("GET", "/rebuild/r1"): (
        200, {**RUNNING, "state": "done", "done": 4, "total": 4})})).start()
    assert main(["rebuild", "--reindex", "--wait"]) == 0
    assert "rebuild r1 done: 4/4 settled" in capsys.readouterr().out
    api.answers[("GET", "/rebuild/r1")] = (404, {"error": {"code": "unknown_rebuild", "message": "no rebuild r1"}})
    assert main(["rebuild", "--reindex", "--wait"]) == 1
    err = capsys.readouterr().err  # (the progress bar's, then one line)
    assert err.endswith("bucketlens rebuild: 404 unknown_rebuild: no rebuild r1\n") and "Traceback" not in err


def test_a_search_refused_names_the_options_typed(api: FakeAPI, capsys: pytest.CaptureFixture[str]) -> None:
    """The service's message names its fields; the user typed --after (review 26)."""
    api.answers[("POST", "/search")] = (400, {"error": {"code": "bad_parameter", "message": (
        "modified_after must be an ISO 8601 date or time (2024-06-01 or 2024-06-01T12:00:00Z); got 'notadate'")}})
    assert main(["search", "--text", "cat", "--after", "notadate"]) == 1
    one_error_line(capsys, "bucketlens search: 400 bad_parameter: --after must be an ISO 8601 date or time",
                   "got 'notadate'")
    # Every field it names, not only the first word (review 31); plain words are options only leading the message.
    for message, said in (("modified_after must be earlier than modified_before",
                           "--after must be earlier than --before"),
                          ("text must be a non-empty string", "--text must be a non-empty string"),
                          ("a key of text must be given", "a key of text must be given"),
                          # (not within a key it quotes: review 34)
                          ("text/scan.jpg: no object 'a/modified_after.jpg'",
                           "text/scan.jpg: no object 'a/modified_after.jpg'")):
        api.answers[("POST", "/search")] = (400, {"error": {"code": "bad_parameter", "message": message}})
        assert main(["search", "--text", "cat"]) == 1
        one_error_line(capsys, f"bucketlens search: 400 bad_parameter: {said}\n")
    api.answers[("GET", "/duplicates")] = (400, {"error": {"code": "bad_parameter", "message": "min_matches must be "
                                                           "at least 12"}})
    assert main(["duplicates", "--min-matches", "5"]) == 1
    one_error_line(capsys, "bucketlens duplicates: 400 bad_parameter: --min-matches must be at least 12")


def test_a_non_finite_min_score_and_an_ipv6_host_are_no_tracebacks(api: FakeAPI, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["search", "--text", "cat", "--min-score", "nan"])
    assert exit_.value.code == 2 and "must be a finite number" in capsys.readouterr().err
    monkeypatch.setenv("BUCKETLENS_API_HOST", "::1")  # nothing answers there: the one line of a server down
    assert main(["search", "--text", "cat"]) == 1
    one_error_line(capsys, f"http://[::1]:{api.port}")


def test_the_worker_command_exits_with_celerys_exit_code(tmp_path: Path) -> None:
    """``bucketlens worker`` exited 0 whatever Celery's worker ended with (``worker_main`` and ``app.start`` drop
    its code): systemd's Restart=on-failure and a shell's `&&` read a failed worker as a clean stop (review 88). In a
    process of its own: a Celery worker takes over logging and stdout."""
    script = tmp_path / "worker.py"
    script.write_text(
        "import sys\n"
        "from celery import Celery\n"
        "from celery.signals import worker_ready\n"
        "import vision.embedders, workers.app\n"
        "from bucketlens.cli import main\n"
        "workers.app.create_celery = lambda settings: Celery('t', broker='memory://')\n"
        "vision.embedders.worker_processes = lambda settings: 1\n"
        "@worker_ready.connect\n"
        "def fail(**_):\n"
        "    raise SystemExit(3)  # (the worker stops with this code)\n"
        "sys.exit(main(['worker']))\n")
    done = subprocess.run([sys.executable, str(script)], cwd=Path(__file__).resolve().parent.parent,
                          env={**os.environ, "BUCKETLENS_HOME": str(tmp_path)}, capture_output=True, timeout=120)
    assert done.returncode == 3, done.stderr.decode()[-2000:]
