"""The ``bucketlens`` command line: run the services, manage the local stack, upload, search, watch queues."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import json
import logging
import math
import mimetypes
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from vision.models import RECIPES

from .auth import bearer
from .errors import CLIError
from .queue_watch import delivery_late
from .settings import (
    ALL_INDEX_TYPES,
    BUCKET_NAME,
    INDEX_TYPES,
    REBUILD_START_WAIT_S,
    Settings,
    only_backend,
    reach,
    unknown_variables,
    without_password,
)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".heic", ".heif", ".avif"}
JSON_HELP = "print the service's answer as JSON (for scripts)"
CLIENT_COMMANDS = {"upload", "search", "duplicates", "queues", "failures", "rebuild", "reconcile"}  # talk to a stack


def bucket_name(text: str) -> str:
    """A ``--bucket`` an S3 server could hold (botocore said a wrong one with two long regular expressions)."""
    if not BUCKET_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is no S3 bucket name: letters, digits, '.', '-' and '_' only")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bucketlens", description="Event-driven image similarity for S3 buckets.")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the local stack (Redis, Ceph RGW, ingest, worker, index service)")
    up.add_argument("--backend", choices=list(INDEX_TYPES),
                    help="index backend (remembered by the stack; default: BUCKETLENS_INDEX_BACKEND, else the one it "
                    "has, else faiss)")
    up.add_argument("--replicas", type=int, help="index service processes answering queries (milvus; one merges)")
    sub.add_parser("down", help="stop what 'up' started")
    status = sub.add_parser("status", help="process state and addresses of the local stack (--json: tokens too)")
    status.add_argument("--json", action="store_true", help="print it as JSON (for scripts: the fields the README "
                        "lists)")
    sub.add_parser("ingest", help="run the webhook receiver (uvicorn)")
    sub.add_parser("worker", help="run one Celery worker")
    sub.add_parser("serve", help="run the index service (uvicorn)")
    sub.add_parser("supervise", help="run the local stack's supervisor (restarts, delivery watchdog)")
    upload = sub.add_parser("upload", help="upload images to the bucket: files, and folders with all below them")
    upload.add_argument("paths", nargs="+", type=Path, metavar="path",
                        help="an image file (its key: its name) or a folder (keys: the paths below it)")
    upload.add_argument("--prefix", default="", help="key prefix for the uploaded objects")
    upload.add_argument("--bucket", type=bucket_name,
                        help="the bucket to upload to (default: BUCKETLENS_BUCKET, the stack's)")
    upload.add_argument("--hidden", action="store_true", help="also what a folder holds under names that start with "
                        "'.' and in Synology's @eaDir (thumbnails, caches: left out by default)")
    search = sub.add_parser("search", help="find images by image file, indexed key or words, within filters")
    search.add_argument("image", nargs="?", type=Path, help="a local image file: its nearest images")
    search.add_argument("--key", help="an indexed object's key: its nearest images (itself left out)")
    search.add_argument("--text", help="words, e.g. 'dog' (the model's 1000 ImageNet concepts, through WordNet)")
    search.add_argument("--bucket", type=bucket_name,
                        help="the key's bucket; for other queries, search only this bucket")
    search.add_argument("--prefix", help="only keys under this prefix (a folder), e.g. 2024/")
    search.add_argument("--after", help="only objects modified at or after this ISO 8601 date or time")
    search.add_argument("--before", help="only objects modified before this ISO 8601 date or time")
    search.add_argument("--min-score", type=_finite,
                        help="only results scoring at least this (cosine, -1 to 1; copies score ~0.8 and more)")
    search.add_argument("-k", type=int, default=10, help="how many results (default 10)")
    search.add_argument("--json", action="store_true", help=JSON_HELP)
    dups = sub.add_parser("duplicates", help="groups of near-duplicate images (copies of one photo), best first")
    dups.add_argument("--bucket", type=bucket_name, help="only groups of this bucket")
    dups.add_argument("--prefix", default="", help="only keys under this prefix (a folder)")
    dups.add_argument("--min-matches", type=int, help="consistent local matches a link needs (default: the service's)")
    dups.add_argument("--limit", type=int, default=50, help="most groups to list (at most 1000 a page)")
    dups.add_argument("--offset", type=int, default=0, help="groups to skip first (the next page)")
    dups.add_argument("--json", action="store_true", help=JSON_HELP)
    queues = sub.add_parser("queues", help="queue depths, stream lag, failures, live workers")
    queues.add_argument("--json", action="store_true", help=JSON_HELP)
    queues.add_argument("--watch", action="store_true", help="refresh every second, with rates and an ETA to drain")
    queues.add_argument("--interval", type=_positive, help="seconds between refreshes with --watch (default 1)")
    failures = sub.add_parser("failures", help="list failure records; send the objects again or clear them")
    failures.add_argument("--reason", help="only records with this reason (e.g. not_an_image, corrupt)")
    failures.add_argument("--bucket", type=bucket_name, help="only objects of this bucket")
    failures.add_argument("--key", action="append", help="only this object key (repeatable; with --bucket)")
    failures.add_argument("--limit", type=int, help="most records to list (default 100, at most 1000 a page)")
    failures.add_argument("--offset", type=int, help="records to skip first, newest first (the next page)")
    failures.add_argument("--json", action="store_true", help=JSON_HELP)
    action = failures.add_mutually_exclusive_group()
    action.add_argument("--retry", action="store_true", help="send the selected objects to the workers again")
    action.add_argument("--clear", action="store_true", help="delete the selected records")
    rebuild = sub.add_parser("rebuild", help="rebuild the index with no downtime (default: re-embed everything)")
    rebuild.add_argument("--reindex", action="store_true", help="rebuild the FAISS structure from stored vectors")
    rebuild.add_argument("--index-type", choices=[*ALL_INDEX_TYPES, "auto"],
                         help=", ".join(f"{t}: the {b} backend only" for t in ALL_INDEX_TYPES
                                        if (b := only_backend(t))) + "; auto: the size policy "
                              "(BUCKETLENS_APPROX_THRESHOLD) picks again")
    rebuild.add_argument("--bucket", type=bucket_name,
                         help="re-embed only this bucket, keeping the others as they are (default: every bucket the "
                         "index holds, and BUCKETLENS_BUCKET; not with --reindex, nor with --model, which re-embeds "
                         "every bucket)")
    rebuild.add_argument("--model", help=f"re-embed every bucket with another model: {', '.join(RECIPES)}")
    rebuild.add_argument("--wait", action="store_true", help="follow progress until the swap")
    rebuild.add_argument("--cancel", nargs="?", const="", metavar="ID",
                         help="cancel a running rebuild (the one running when no ID is given); the serving index stays")
    rebuild.add_argument("--json", action="store_true", help="print the job as the service answers it (`GET "
                         "/rebuild/{id}`): as started, as it ended with --wait, as cancelled with --cancel")
    reconcile = sub.add_parser("reconcile", help="compare the bucket listing with the index and heal differences")
    reconcile.add_argument("--bucket", type=bucket_name,
                           help="list only this bucket (default: every bucket the index holds, and BUCKETLENS_BUCKET)")
    reconcile.add_argument("--dry-run", action="store_true",
                           help="only say what it would send for embedding and remove from the index")
    reconcile.add_argument("--json", action="store_true", help=JSON_HELP)
    demo = sub.add_parser("demo", help="start the stack, upload sample photos, run sample queries")
    demo.add_argument("--backend", choices=list(INDEX_TYPES), help="index backend, as for 'up'")
    args, extra = parser.parse_known_args(argv)
    if extra:  # the command's own usage, and the option likely meant (the top-level usage listed the commands)
        command = sub.choices[args.command]
        options = [o for action in command._actions for o in action.option_strings]
        words = [word.split("=")[0] for word in extra if word.startswith("--")]
        likely = [match for word in words if word not in options
                  for match in difflib.get_close_matches(word, options, n=1)]
        placed = [word for word in words if word in options]  # (`bucketlens --json status`)
        command.error(f"unrecognized arguments: {' '.join(extra)}"
                      + (f" (did you mean {', '.join(likely)}?)" if likely else "")
                      + (f" ({', '.join(placed)} goes after the command: bucketlens {args.command} "
                         f"{' '.join(placed)})" if placed else ""))
    # Options that mean nothing with the others given were ignored without a word (an independent check).
    if args.command == "queues" and args.interval is not None and not args.watch:
        queues.error("--interval is how often --watch refreshes: add --watch")
    if args.command == "rebuild" and args.cancel is not None and (
            given := [flag for flag, value in (("--wait", args.wait), ("--reindex", args.reindex),
                                               ("--index-type", args.index_type), ("--bucket", args.bucket),
                                               ("--model", args.model)) if value]):
        rebuild.error(f"--cancel takes no {' or '.join(given)}")
    if args.command == "failures" and (args.retry or args.clear) and (
            given := [flag for flag, value in (("--limit", args.limit), ("--offset", args.offset))
                      if value is not None]):
        failures.error(f"{' and '.join(given)} {'page' if len(given) > 1 else 'pages'} the listing; --retry and "
                       "--clear act on every record selected (--reason, --bucket, --key)")

    try:
        settings = Settings.from_env()
    except ValueError as exc:  # a setting that does not parse or is out of bounds: refused before anything starts
        print(f"bucketlens: {exc}", file=sys.stderr)
        return 2
    for note in unknown_variables(os.environ):
        print(f"bucketlens: note: {note}", file=sys.stderr)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for library in ("httpx", "httpcore", "botocore", "boto3", "s3transfer", "urllib3"):  # at DEBUG they wrote ~300
        logging.getLogger(library).setLevel(logging.WARNING)  # lines an `up`, signed requests and tokens (review 19)
    # faiss-cpu's one library dispatches AVX2/AVX512 at run time; its loader still logs the absence of per-SIMD
    # modules as ModuleNotFoundError lines at each start (all that `grep Error api.log` found: an independent check)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    handler = COMMANDS[args.command]
    _unsaid_defaults.clear()  # (a note left unsaid by an earlier call in this process)
    try:
        if args.command in CLIENT_COMMANDS:
            settings = client_settings(settings)
        return handler(settings, args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `bucketlens failures --json | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (no second error as Python exits)
        return 1
    except httpx.TransportError as exc:
        print(f"bucketlens {args.command}: no answer from {_address(exc)} ({exc}): is the stack up? "
              f"`bucketlens status` says", file=sys.stderr)
        return 1
    except (httpx.HTTPError, httpx.InvalidURL, CLIError) as exc:
        print(f"bucketlens {args.command}: {exc}", file=sys.stderr)
        return 1
    except json.JSONDecodeError as exc:  # a proxy's error page, another server on the port
        print(f"bucketlens {args.command}: the server's answer is not JSON ({exc}): is BUCKETLENS_API_PORT the "
              f"index service's port? `bucketlens status` says", file=sys.stderr)
        return 1


def _positive(text: str) -> float:
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, not {text}")
    return value


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:  # (argparse said "invalid _finite value")
        raise argparse.ArgumentTypeError(f"must be a number, not {text!r}") from None
    if not math.isfinite(value):  # (nan went out as JSON no server reads, with a traceback)
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text}")
    return value


def _address(exc: httpx.TransportError) -> str:
    try:
        url = exc.request.url
    except RuntimeError:  # (an error raised before any request was built)
        return "the index service"
    return f"{url.scheme}://{url.netloc.decode()}"


# -- services -------------------------------------------------------------------------------------------------

def run_ingest(settings: Settings, args: argparse.Namespace) -> int:
    from ingest.receiver import create_app

    from .serving import serve

    serve(create_app(settings), settings.ingest_host, settings.ingest_port)
    return 0


def run_serve(settings: Settings, args: argparse.Namespace) -> int:
    from index_service.app import create_app

    from .serving import serve

    serve(create_app(settings), settings.api_host, settings.api_port)
    return 0


def run_worker(settings: Settings, args: argparse.Namespace) -> int:
    from celery.bin.celery import celery as command

    from vision.embedders import worker_processes
    from workers.app import MODEL_FAILED, create_celery

    from .keys import Keys

    keys = Keys(settings.namespace)
    app = create_celery(settings)
    # Celery's command itself, as ``app.start`` runs it, for its exit code: ``worker_main`` and ``start`` drop it
    # (click returns it where they expect it raised), and a worker that failed exited 0 (review 88)
    command.params[0].default = app
    try:
        code = command.main(["worker", "-Q", ",".join(keys.queues), "-c", str(worker_processes(settings)),
                             "--loglevel", settings.log_level, "-n", f"{settings.namespace}-worker@%h",
                             "--without-gossip", "--without-mingle"], standalone_mode=False)
    finally:
        command.params[0].default = None
    if MODEL_FAILED.value:
        print("bucketlens worker: a worker process could not load its model (the log above says why)",
              file=sys.stderr)
        return 1
    return code if isinstance(code, int) else 0


def run_supervise(settings: Settings, args: argparse.Namespace) -> int:
    import signal
    import threading

    from infra.supervisor import Supervisor

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    Supervisor(_stack(settings)).run(stop)
    return 0


# -- local stack ----------------------------------------------------------------------------------------------

def _has_stack(settings: Settings) -> bool:
    """Whether a local stack was set up in ``settings.home`` (its ``stack.json``: ``infra.stack``)."""
    return (Path(settings.home) / "stack.json").exists()


def _stack(settings: Settings) -> Any:
    from infra.stack import Stack

    return Stack(settings)


def _servers_replaced(settings: Settings, stack: Any) -> list[str]:
    """Notes of the servers this shell names that the local stack's own replace (an upload went to the stack's S3
    server, BUCKETLENS_S3_ENDPOINT named another, and nothing said so: review 86)."""
    return [f"note: BUCKETLENS_{name.upper()}={without_password(getattr(settings, name))!r} is not used: the local "
            f"stack in {stack.home} "
            f"runs its own, {getattr(stack.settings, name)} (another BUCKETLENS_HOME for another stack)"
            for name in ("s3_endpoint", "redis_url") if name in _explicit()
            and _server(getattr(settings, name)) != _server(getattr(stack.settings, name))]


def _server(url: str) -> tuple[Any, ...]:
    """What names a server in ``url``: its scheme, host, port and (Redis) database, however spelt (a missing "/0" or
    a trailing "/" was noted as another server: review 88)."""
    parts = urlsplit(url)
    default = {"http": 80, "https": 443, "redis": 6379, "rediss": 6379}.get(parts.scheme.lower())
    return parts.scheme.lower(), parts.hostname, parts.port or default, parts.path.strip("/") or "0", parts.username


def client_settings(settings: Settings) -> Settings:
    """Settings for client commands: the local stack's (ports, tokens) when one was set up here, with the bucket and
    tokens its index service runs with, where this shell does not set them."""
    if _has_stack(settings):
        stack = _stack(settings)
        for note in _servers_replaced(settings, stack):
            print(f"bucketlens: {note}", file=sys.stderr)
        return stack.for_clients(_explicit())  # type: ignore[no-any-return]
    explicit = set(_explicit())  # (the defaults went to whatever held their ports, another user's stack or S3
    # server included, and said nothing: review 26)
    for server, address, names in (("API", _api_address(settings), {"api_host", "api_port"}),
                                   ("S3", settings.s3_endpoint, {"s3_endpoint"})):
        if not names & explicit:
            _unsaid_defaults[server] = (f"bucketlens: note: no local stack in {Path(settings.home).resolve()} (the "
                                        "home is .bucketlens in the current folder unless BUCKETLENS_HOME says); "
                                        f"using the default {server} address, {address}")
    return settings


_unsaid_defaults: dict[str, str] = {}  # server -> the note above, said once a command first reaches for that server
# (not before an error of its own: "no images in ...")


def _say_defaults(server: str) -> None:
    if note := _unsaid_defaults.pop(server, None):
        print(note, file=sys.stderr)


def _explicit() -> list[str]:
    """The settings this shell sets (``BUCKETLENS_*`` variables, an empty one not: ``BUCKETLENS_ADMIN_TOKEN=`` sent
    the token of ``stack.json``, neither none nor the running service's)."""
    return [field.name for field in dataclasses.fields(Settings) if os.environ.get(f"BUCKETLENS_{field.name.upper()}")]


def api_url(settings: Settings) -> str:
    """The index service's address, for a request to it (the no-stack note is said first, once): a local stack's
    first replica that answers (``Stack.serving_url``)."""
    _say_defaults("API")
    if _has_stack(settings):
        return _stack(settings).serving_url()  # type: ignore[no-any-return]
    return _api_address(settings)


def _api_address(settings: Settings) -> str:
    return f"http://{reach(settings.api_host)}:{settings.api_port}"


def _stack_for_up(settings: Settings, args: argparse.Namespace) -> tuple[Any, dict[str, bool]]:
    """The local stack `up` and `demo` start, once what it was asked to change is noted; and which of its processes
    ran before."""
    stack = _stack(settings)
    # Chosen at the first `up` (Milvus's: at the first with that backend) and kept: an override would be lost silently.
    for variable, name, asked in (("BUCKETLENS_API_PORT", "api_port", settings.api_port),
                                  ("BUCKETLENS_INGEST_PORT", "ingest_port", settings.ingest_port),
                                  ("BUCKETLENS_MILVUS_URI", "milvus_port", urlsplit(settings.milvus_uri).port)):
        kept = getattr(stack.config, name)
        if variable in os.environ and kept and asked not in (0, kept):  # 0: any
            print(f"note: {variable}={os.environ[variable]} is not used: this stack keeps its {name} {kept} in "
                  f"{stack.home / 'stack.json'} (edit it there while it is down)")
    if stack.pid("api") is None:  # what makes it another index, said where it differs from the last start (review
        # 86: an `up` from a shell without them served an empty index of another namespace, searches open, silently)
        last = stack.last_started()
        for name, what in (("namespace", "its index, queues and failure records are another's"),
                           ("bucket", "uploads to the other bucket are not told of"),
                           ("read_token", "searches take another token, or none")):
            now, then = getattr(stack.settings, name), last.get(name, getattr(stack.settings, name))
            if now != then:
                print(f"note: BUCKETLENS_{name.upper()} is {_value_text(name, now, then)} where this stack last ran "
                      f"with {_value_text(name, then)}: {what} (`bucketlens down`, then `up` with it set, to go back)")
    for note in _servers_replaced(settings, stack):
        print(note)
    # BUCKETLENS_INDEX_BACKEND as --backend: alone, it was ignored and a FAISS stack started (an independent check)
    if backend := args.backend or ("index_backend" in _explicit() and settings.index_backend):
        stack.choose_backend(backend)
    if getattr(args, "replicas", None) is not None:
        stack.choose_replicas(args.replicas)
    processes = stack.status()["processes"]
    if all(processes.values()):
        print(f"the local stack in {stack.home} is running ({stack.settings.index_backend} index)")
    else:
        extra = " and Milvus: ~40 s more" if stack.servers else ""
        first = "" if stack.s3_created() else f"; first start creates the S3 server: ~30 s{extra}"
        print(f"starting the local stack in {stack.home} ({stack.settings.index_backend} index{first})")
    return stack, processes


def _value_text(name: str, value: str, other: str = "") -> str:
    """A setting's value as `up` names it beside ``other``: a token's is not shown."""
    if name != "read_token":
        return repr(value)
    return "none" if not value else "another token" if other else "a token"


def cmd_up(settings: Settings, args: argparse.Namespace) -> int:
    stack, processes = _stack_for_up(settings, args)
    running = any(processes.values())
    try:
        stack.up()
    except KeyboardInterrupt:  # (a first start takes a while: it left its servers running, unknown to the user)
        if running or stack.found_running is not False:  # (nor one that waited for another `up`: review 58)
            print("up: interrupted; what ran before goes on running (`bucketlens status` says what runs)",
                  file=sys.stderr)
        else:
            print("up: interrupted: stopping what it started", file=sys.stderr)
            stack.down()
        raise
    if running:
        print("note: processes that were running keep the settings they started with; `bucketlens down` and `up` "
              "start them with the settings given now")
    if other := stack.other_code():
        print(other_code_note(other))
    index = _index_state(stack.writer_url(), read_headers(stack.for_clients()))
    if index is not None and (rebuild := index["rebuild"]) and rebuild["state"] == "failed":  # (a `down` during a
        # rebuild fails it, and nothing said so until `status`: review 49)
        print(f"note: the last rebuild, {rebuild['id']} ({rebuild['mode']}), failed: {why_failed(rebuild)}")
    if index is not None and "model" in _explicit() and index["model"] != settings.model:  # (it said nothing, and
        # the workers showed the new model beside an index of the old one: review 57)
        print(f"note: the index keeps its model, {index['model']}: BUCKETLENS_MODEL={settings.model} does not change "
              f"an index; `bucketlens rebuild --model {settings.model} --wait` moves it (no downtime)")
    page = page_url(stack.api_url, stack.for_clients().read_token)  # the running service's token: ran, it keeps it
    print(f"up: API {stack.api_url}  web page {page}  S3 {stack.settings.s3_endpoint}")
    return 0


def other_code_note(names: list[str]) -> str:
    return (f"note: {', '.join(names)} {'runs' if len(names) == 1 else 'run'} other code than this checkout's (started "
            "before it changed: an upgrade); `bucketlens down` and `up` start them on it")


def page_url(api: str, read_token: str) -> str:
    """The web page's address; with a read token, the page sends the one in its address with each call."""
    return f"{api}/" + (f"?token={quote(read_token, safe='')}" if read_token else "")


def cmd_down(settings: Settings, args: argparse.Namespace) -> int:
    if not _has_stack(settings):  # (a Stack would set one up, to stop nothing)
        print(f"no local stack in {Path(settings.home).resolve()}: nothing to stop")
        return 0
    _stack(settings).down()
    print("down")
    return 0


NOT_RUNNING = 3  # `status`'s exit code when a process of the stack is down (as LSB init scripts' status says)


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    if not _has_stack(settings):  # (a Stack would set one up, with ports nothing uses)
        missing = f"no local stack in {Path(settings.home).resolve()}: `bucketlens up` starts one"
        if args.json:  # (a script reading stdout got an empty string to parse)
            print(json.dumps({"processes": {}, "index": None, "error": missing}))
        print(missing, file=sys.stderr)
        return NOT_RUNNING
    stack = _stack(settings)
    status = stack.status(stack.for_clients(_explicit()))
    # (a reader's /stats shows the rebuild it ran as the writer)
    headers = read_headers(stack.for_clients())
    status["index"] = _index_state(stack.writer_url(), headers)
    status["work"], status["work_error"] = (None, None) if status["index"] is None else _work(stack.writer_url(),
                                                                                              headers)
    # The address that opens the page, with the running service's read token (only `up` said it: review 31)
    status["page_url"] = page_url(status["api_url"], stack.for_clients().read_token)
    status["other_code"] = stack.other_code()
    if args.json:
        print(json.dumps(status))
    else:
        width = max(map(len, status["processes"]))  # ("supervisor" is longer than 8)
        for name, up in status["processes"].items():
            print(f"{name:{width}} {'up' if up else 'down'}")
        print(f"API {status['api_url']}  web page {status['page_url']}  ingest {status['ingest_url']}  "
              f"S3 {status['s3_endpoint']}  bucket {status['bucket']}")
        if (index := status["index"]) is not None:
            rebuild = index["rebuild"]
            print(f"index: {index['vectors']} vectors, model {index['model']}, generation {index['generation']}, "
                  f"{index['index_type']}" + (f"; rebuild {rebuild['id']} {rebuild['state']} "
                                              f"{rebuild['done']}/{rebuild['total']}" if rebuild else "")
                  + (f" ({why_failed(rebuild)})" if rebuild and rebuild["state"] == "failed" and rebuild["error"]
                     else "")
                  + ("" if index["ready"] else f"; not ready: {index['reason'] or 'no reason given'}"))
        elif not status["processes"].get("api"):  # (it said "frozen, starting or failing" after a `down`: review 79)
            print(f"index: no answer from {stack.writer_url()}: the index service is not running (`bucketlens up` "
                  "starts it)")
        else:  # (the line was left out: a frozen index service looked like a healthy one: review 73)
            print(f"index: no answer from {stack.writer_url()} (frozen, starting or failing: "
                  f"{stack.home / 'logs' / 'api.log'} may say)")
        if (work := status["work"]) is None:
            if index is not None:  # (Redis away: /stats answers from memory, /queues cannot; the line said "no
                # answer" where /queues said why: review 83)
                print(f"work: unknown: {stack.writer_url()}/queues {status['work_error']}")
        else:
            print(f"work: {work['pending_objects']} objects on their way to the index, {work['workers_live']} worker "
                  f"processes live, {work['failures']} failures" + ("" if work["workers_live"] or not
                  work["pending_objects"] else f"; no live worker takes them ({stack.home / 'logs' / 'worker.log'})"))
            if work["delivery_late"]:  # (it said "0 objects on their way" while Ceph held 300 uploads: review 83)
                print(f"delivery: {work['delivery_late']}")
        if status["other_code"]:
            print(other_code_note(status["other_code"]))
        if down := [name for name, up in status["processes"].items() if not up]:  # (no word of what to do: review 83)
            print(f"{', '.join(down)} down: `bucketlens up` starts what is not running (logs: {stack.home / 'logs'})")
    return 0 if all(status["processes"].values()) else NOT_RUNNING


def _index_state(url: str, headers: dict[str, str] | None = None) -> dict[str, Any] | None:
    """What the index service serves (``GET /stats``'s model, generation, vectors, index type and the running or
    last rebuild) and whether it is ready (``GET /readyz``'s ``ready`` and ``reason``), or None when it does not
    answer, or answers an error (a replica whose Milvus is down: an object of nulls, which scripts took for a live
    index). The index service's writer answers ``/stats`` from memory: with its Milvus server frozen, ``status``
    said every process was up and showed the index, while searches answered 503 (an independent check)."""
    if (stats := _answer(f"{url}/stats", headers)) is None:
        return None
    state = {k: stats.get(k) for k in ("model", "generation", "vectors", "index_type", "rebuild")}
    try:
        ready = httpx.get(f"{url}/readyz", timeout=10).json()
    except (httpx.HTTPError, ValueError):
        ready = {"reason": "GET /readyz did not answer within 10 s"}
    ready = ready if isinstance(ready, dict) else {}
    return {**state, "ready": ready.get("ready") is True, "reason": str(ready.get("reason") or "")}


def _work(url: str, headers: dict[str, str] | None = None) -> tuple[dict[str, Any] | None, str | None]:
    """What is on its way to the index (``GET /queues``): objects accepted and not merged yet, live worker processes
    and failure records; or None and why not (no answer, or the error it answered: Redis away). Every process up did
    not mean uploads were indexed: with one worker's pool processes frozen, ``status`` said all was well while 30
    uploads waited (review 73)."""
    report, trouble = _get(f"{url}/queues", headers)
    if report is None:
        return None, trouble
    return {"pending_objects": report.get("pending_objects"), "workers_live": len(report.get("workers") or []),
            "failures": report.get("failures"), "delivery_late": delivery_late(report.get("canary") or {})}, None


def _answer(url: str, headers: dict[str, str] | None) -> dict[str, Any] | None:
    """A GET's JSON object, or None when it does not answer within 5 s, or answers an error."""
    return _get(url, headers)[0]


def _get(url: str, headers: dict[str, str] | None) -> tuple[dict[str, Any] | None, str | None]:
    """A GET's JSON object and None, or None and what came instead: no answer within 5 s, or an error answer (its
    status and message)."""
    try:
        response = httpx.get(url, headers=headers, timeout=5)
    except httpx.HTTPError as exc:
        return None, f"did not answer: {exc}"
    try:
        answer = response.json()
    except ValueError:
        answer = None
    if response.status_code == 200 and isinstance(answer, dict):
        return answer, None
    error = answer.get("error") if isinstance(answer, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    return None, f"answered {response.status_code}" + (f": {message}" if message else "")


# -- client commands ------------------------------------------------------------------------------------------

def cmd_upload(settings: Settings, args: argparse.Namespace) -> int:
    from boto3.exceptions import Boto3Error
    from boto3.s3.transfer import TransferConfig
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError
    from tqdm import tqdm

    from .s3 import error_code, make_client

    files, skipped, hidden = upload_plan(args.paths, args.prefix, args.hidden)
    if args.prefix.startswith("/") or {".", ".."} & set(args.prefix.split("/")):  # (accepted without a word: review
        # 31; S3 takes such keys, browsers and HTTP libraries rewrite their addresses)
        print(f"note: keys under {args.prefix!r} have a leading '/' or a '.' or '..' segment: searches find them, but "
              "their presigned URLs do not open in browsers (README, \"HTTP API\"; the web page shows /preview)")
    if not files:
        left = [counted(n, what) for n, what in ((skipped, "other file"), (hidden, "hidden file")) if n]
        raise CLIError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {' '.join(map(str, args.paths))}"
                       + (f" ({' and '.join(left)} left out{': --hidden takes them' if hidden else ''})"
                          if left else ""))
    bucket = args.bucket or settings.bucket
    _say_defaults("S3")
    s3 = make_client(settings)
    try:  # before the progress bar: a missing bucket or S3 away fails every file the same way
        s3.head_bucket(Bucket=bucket)
    except ClientError as exc:
        missing = error_code(exc) in ("404", "NoSuchBucket")
        hint = (f" (the stack's is {settings.bucket!r}: leave out --bucket)" if args.bucket
                and args.bucket != settings.bucket else "") + "; create it with your S3 tools first"  # (review 57)
        raise CLIError(f"no bucket {bucket!r} at {settings.s3_endpoint}{hint}" if missing
                       else f"cannot use bucket {bucket!r} at {settings.s3_endpoint}: {exc}") from exc
    except BotoCoreError as exc:
        away = ": is the stack up? `bucketlens status` says" if isinstance(exc, EndpointConnectionError) else ""
        raise CLIError(f"S3 at {settings.s3_endpoint}: {exc}{away}") from exc

    # One PUT for every file the workers index (boto3 sent those over 8 MB in parts, and an object's etag was then no
    # MD5: a search with the same file did not say it identical, review 61).
    whole = TransferConfig(multipart_threshold=max(8 * 1024 * 1024, settings.max_object_bytes + 1))

    def put(item: tuple[str, Path]) -> None:
        key, path = item
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        s3.upload_file(str(path), bucket, key, ExtraArgs={"ContentType": content_type}, Config=whole)

    try:
        bar = tqdm(total=len(files), unit="img", desc="upload", disable=None)  # (None: only at a terminal: its
        # frames filled a log kept with `2>log`, review 79)
        with ThreadPoolExecutor(max_workers=8) as pool, bar:
            for _ in pool.map(put, files.items()):
                bar.update()
    except (Boto3Error, BotoCoreError, ClientError) as exc:
        raise CLIError(f"upload to s3://{bucket} at {settings.s3_endpoint} failed: {exc}") from exc
    first = min(files)  # (a prefix without '/' joins the names: "a/b" uploads "a/bphoto.jpg")
    where = (f"s3://{bucket}/{args.prefix}" if args.prefix.endswith("/") or not args.prefix
             else f"s3://{bucket} under the key prefix {args.prefix!r} (e.g. {first!r}: add '/' for a folder)")
    print(f"uploaded {counted(len(files), 'image')} to {where}"
          + (f"; {counted(skipped, 'other file')} left out (by their names: not "
             f"{', '.join(sorted(IMAGE_SUFFIXES))}, or macOS's ._ metadata; or links that lead nowhere)"
             if skipped else "")
          + (f"; {counted(hidden, 'hidden file')} left out (names starting with '.', @eaDir; --hidden takes them)"
             if hidden else ""))
    if bucket != settings.bucket and not _notifies_the_stack(settings, bucket):  # (said "uploaded", and nothing was
        # ever indexed: review 79)
        print(f"note: bucket {bucket!r} does not notify this stack, so its objects are not indexed: `bucketlens "
              f"reconcile --bucket {bucket}` indexes what it holds now")
    if limit := _workers_limit(settings, "max_object_bytes"):  # (stored, then a failure, without a word: review 86)
        if over := sorted(key for key, path in files.items() if path.stat().st_size > limit):
            print(f"note: {counted(len(over), 'file')} ({over[0]}{', ...' if len(over) > 1 else ''}) over the "
                  f"workers' limit of {limit} bytes (BUCKETLENS_MAX_OBJECT_BYTES): stored, and not indexed "
                  "(`bucketlens failures` lists them)")
    return 0


def _workers_limit(settings: Settings, name: str) -> int | None:
    """The least of the live workers' ``limits[name]`` (``GET /queues``), or None when none says one (or the index
    service does not answer within 5 s)."""
    report = _answer(f"{api_url(settings)}/queues", read_headers(settings)) or {}
    limits = [worker["limits"][name] for worker in report.get("workers") or []
              if isinstance(worker, dict) and isinstance(worker.get("limits"), dict)
              and isinstance(worker["limits"].get(name), int)]
    return min(limits, default=None)


def _notifies_the_stack(settings: Settings, bucket: str) -> bool:
    """Whether ``bucket`` notifies the local stack set up here; True without one (another S3 server's notifications
    are not ours to see) and when S3 cannot say."""
    from botocore.exceptions import BotoCoreError, ClientError

    if not _has_stack(settings):
        return True
    try:
        return bool(_stack(settings).notified(5, bucket))
    except (BotoCoreError, ClientError):
        return True


HIDDEN_FOLDERS = {"@eaDir"}  # Synology's thumbnails beside each photo


def upload_plan(paths: list[Path], prefix: str, hidden: bool = False) -> tuple[dict[str, Path], int, int]:
    """The key of each image to upload (a file: ``prefix`` + its name; a folder's: ``prefix`` + its path below the
    folder), how many other files were left out (not images by their names, or macOS's ``._`` metadata), and how
    many hidden ones a folder held (names below it that start with ``.``, ``HIDDEN_FOLDERS``), unless ``hidden``:
    ``.thumbnails/`` and ``@eaDir/`` added thumbnails of every photo (an independent check)."""
    keys: dict[str, Path] = {}
    skipped = left_hidden = 0
    for path in paths:
        if path.is_dir():
            below, unreadable = _files_below(path)
            skipped += unreadable
            named = [(p.relative_to(path).as_posix(), p) for p in below]
            if not hidden:  # (a file of macOS's ._ metadata is no hidden photo: counted below, as --hidden does)
                shown = [(name, file) for name, file in named if file.name.startswith("._")
                         and not _hidden(name.rpartition("/")[0]) or not _hidden(name)]
                left_hidden += len(named) - len(shown)
                named = shown
        elif path.is_file():
            named = [(path.name, path)]
        else:
            raise CLIError(f"{path}: no such file or folder")
        for name, file in named:
            if file.suffix.lower() not in IMAGE_SUFFIXES or file.name.startswith("._"):  # (macOS's AppleDouble
                skipped += 1  # metadata beside a copied photo: "._IMG_1.jpg" is no image, and was a failure record)
            elif keys.setdefault(prefix + name, file).resolve() != file.resolve():
                raise CLIError(f"{keys[prefix + name]} and {file} would both be uploaded as {prefix + name!r}")
    return keys, skipped, left_hidden


def _hidden(name: str) -> bool:
    return any(part.startswith(".") or part in HIDDEN_FOLDERS for part in name.split("/"))


def _files_below(folder: Path) -> tuple[list[Path], int]:
    """The files below ``folder``, through linked folders as ``aws s3 sync`` goes, and how many entries are no file
    (links that lead nowhere, sockets): a linked folder's photos and a broken link were left out without a word
    (review 31). The real folders come first, then the links whose folders were not reached yet, each folder once:
    a link sorted before its folder took its photos under its own name, or hid them (``.latest``: review 34)."""
    files: list[Path] = []
    others = 0
    seen: set[str] = set()
    pending = [folder]
    while pending:
        links: list[Path] = []
        for root, folders, names in os.walk(pending.pop(0)):
            if os.path.realpath(root) in seen:
                folders.clear()
                continue
            seen.add(os.path.realpath(root))
            links += [Path(root, name) for name in folders if os.path.islink(os.path.join(root, name))]
            for name in names:
                file = Path(root, name)
                if file.is_file():
                    files.append(file)
                else:
                    others += 1
        pending += sorted(link for link in links if os.path.realpath(link) not in seen)
    return sorted(files), others


# the service's fields that CLI options set under other names, for its errors (``_error_text``)
SEARCH_OPTIONS = {"modified_after": "--after", "modified_before": "--before", "min_score": "--min-score",
                  "text": "--text", "key": "--key", "k": "-k", "prefix": "--prefix"}
DUPLICATES_OPTIONS = {"min_matches": "--min-matches", "prefix": "--prefix", "limit": "--limit", "offset": "--offset"}


def search_request(settings: Settings, query: dict[str, Any], image: Path | None = None) -> Any:
    """``POST /search``: ``query`` holds the request's fields (key, text, bucket, k, filters); with ``image`` they
    travel as form fields beside the upload."""
    fields = {name: value for name, value in query.items() if value is not None}
    # The service answers one kind of query: an upload ignores key and text, a key hides text. Filters, k and
    # min_score go with any kind.
    kinds = [name for name, given in (("an image file", image is not None), ("--key", "key" in fields),
                                      ("--text", "text" in fields)) if given]
    if len(kinds) != 1:
        given = f" (got {' and '.join(kinds)})" if kinds else ""
        raise CLIError(f"search by one of an image file, --key or --text{given}; filters go with any of them")
    try:
        handle = open(image, "rb") if image is not None else None
    except OSError as exc:
        raise CLIError(f"cannot read {image}: {exc.strerror}") from exc
    url, headers = api_url(settings) + "/search", read_headers(settings)  # (after its own checks: the no-stack note)
    if image is not None and handle is not None:
        with handle:
            response = httpx.post(url, files={"image": (image.name, handle)},
                                  data={name: str(value) for name, value in fields.items()}, headers=headers,
                                  timeout=60)
    else:
        response = httpx.post(url, json=fields, headers=headers, timeout=60)
    if response.status_code != 200:
        raise CLIError(_error_text(response, SEARCH_OPTIONS))
    return response.json()


def cmd_search(settings: Settings, args: argparse.Namespace) -> int:
    query = {"k": args.k, "key": args.key, "text": args.text, "prefix": args.prefix, "modified_after": args.after,
             "modified_before": args.before, "min_score": args.min_score,
             "bucket": args.bucket or (settings.bucket if args.key else None)}
    result = search_request(settings, query, args.image)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{counted(len(result['results']), 'result')} ({result['model']}, {result['took_ms']:.1f} ms)")
    for term in result.get("matched", []):
        names = [label["name"] for label in term["labels"]]
        more = f" and {len(names) - 8} more" if len(names) > 8 else ""
        print(f"  '{term['text']}' means {', '.join(names[:8])}{more}")
    if result.get("unmatched"):
        print(f"  no ImageNet concept for: {', '.join(result['unmatched'])}")
    if result.get("ignored"):  # ("photo of a" answered "0 results" and no reason)
        print(f"  not looked up (stop words, symbols): {', '.join(result['ignored'])}")  # (one entry from the next)
    for hit in result["results"]:
        tags = f"  [{', '.join(label['name'] for label in hit['labels'][:3])}]" if hit.get("labels") else ""
        print(f"{hit['score']:.4f}  {plain(hit['bucket'] + '/' + hit['key'])}{same_photo(hit)}{tags}")
    return 0


def counted(number: int, noun: str) -> str:
    """``1 result``, ``2 results``."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


def plain(text: str) -> str:
    """An uploader's text (a key, a failure message) for the terminal: characters that are not printable (escape
    sequences, which can retitle or clear the terminal or write its clipboard; bidi overrides, which show
    `x\u202egpj.exe` as `xexe.jpg`) are written as escapes."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def same_photo(hit: dict[str, Any]) -> str:
    """What a search result says when it is the same photo as the query (empty when it is not)."""
    if hit.get("identical"):
        return "  same photo: identical file"
    return f"  same photo: {hit['matches']} matches" if hit.get("verified") else ""


def cmd_duplicates(settings: Settings, args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"prefix": args.prefix, "limit": args.limit, "offset": args.offset}
    if args.bucket:
        params["bucket"] = args.bucket
    if args.min_matches is not None:
        params["min_matches"] = args.min_matches
    response = httpx.get(api_url(settings) + "/duplicates", params=params, headers=read_headers(settings), timeout=60)
    if response.status_code != 200:
        raise CLIError(_error_text(response, DUPLICATES_OPTIONS))
    report = response.json()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for group in report["groups"]:
        print(f"{group['size']} copies (links of >= {group['min_matches']} matches):")
        for i, member in enumerate(group["members"]):
            pixels = pixel_count(member["pixels"])
            print(f"  {'best' if i == 0 else '    '}  {plain(member['bucket'] + '/' + member['key'])}  ({pixels})")
    pending = f"; {report['pending']} objects still being checked" if report["pending"] else ""
    print(f"{counted(report['total'], 'group')}{page_note(report['total'], args.offset, len(report['groups']))}"
          f"{pending}")
    return 0


def pixel_count(pixels: int) -> str:
    """``12.2 MP``; a small image in pixels (a 151x150 copy was "0.0 MP": review 31)."""
    if not pixels:
        return "size unknown"
    return f"{pixels / 1e6:.1f} MP" if pixels >= 100_000 else f"{pixels:,} pixels"


def why_failed(job: dict[str, Any]) -> str:
    """A failed rebuild's ``error``, and the object it names where the service showed it (to a reader)."""
    detail = job.get("error_detail")
    return plain(job["error"] + (f": {detail}" if detail else ""))


def read_headers(settings: Settings) -> dict[str, str]:
    return bearer(settings.read_token)


def fetch_queue_report(settings: Settings) -> Any:
    response = httpx.get(api_url(settings) + "/queues", timeout=10)
    if response.status_code != 200:
        raise CLIError(_error_text(response))
    return response.json()


def cmd_queues(settings: Settings, args: argparse.Namespace) -> int:
    from .queue_watch import Rates, render

    if not args.watch:
        report = fetch_queue_report(settings)
        print(json.dumps(report, indent=2) if args.json else render(report))
        return 0
    rates = Rates()
    clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() and not args.json else ""
    try:
        while True:
            try:
                report = fetch_queue_report(settings)
            except (httpx.HTTPError, CLIError) as exc:  # keep watching through a restart of the service
                print(f"{clear}{time.strftime('%H:%M:%S')}  {api_url(settings)} unreachable: {exc}", flush=True)
            else:
                current = rates.add(time.monotonic(), report)
                if args.json:
                    print(json.dumps({**report, "rates": current}), flush=True)
                else:
                    print(f"{clear}bucketlens queues  {time.strftime('%H:%M:%S')}  (Ctrl-C to stop)\n"
                          + render(report, current), flush=True)
            time.sleep(max(0.1, args.interval or 1.0))  # (0.001 polled Redis ~1000 times a second)
    except KeyboardInterrupt:
        return 0


def cmd_failures(settings: Settings, args: argparse.Namespace) -> int:
    if args.key is not None and not all(args.key):  # (the server's answer named its field, `keys`: review 79)
        raise CLIError("--key must not be empty (leave it out to select every record)")
    selection = {name: value for name, value in (("reason", args.reason), ("bucket", args.bucket))
                 if value is not None}  # (an empty one is the server's 400, not "every record")
    if args.retry or args.clear:
        if args.clear and not selection and args.key is None and sys.stdin.isatty():  # (every record went, unasked:
            # review 31; a script, not at a terminal, clears them as before)
            try:
                answer = input("clear every failure record (they say which objects could not be indexed)? [y/N] ")
            except EOFError:  # (Ctrl-D: a traceback, review 79) no
                answer = ""
                print()
            if answer.strip().lower() not in ("y", "yes"):
                print("nothing cleared (--reason, --bucket or --key choose some)")
                return 1
        method, path, status = ("POST", "/failures/retry", 202) if args.retry else ("DELETE", "/failures", 200)
        body = {**selection, "keys": args.key} if args.key is not None else selection
        response = httpx.request(method, api_url(settings) + path, json=body, headers=admin_headers(settings),
                                 timeout=120)
        if response.status_code != status:
            raise CLIError(_error_text(response))
        result = response.json()
        if args.json:
            print(json.dumps(result))
        elif args.retry:
            print(f"sent {counted(result['retried'], 'object')} to the workers again "
                  f"({counted(result['tasks'], 'task')})")
        else:
            print(f"cleared {counted(result['cleared'], 'failure record')}")
        if not args.json and not result["retried" if args.retry else "cleared"] and body:  # a typo in a value?
            print(_none_has(selection, args.key))
        return 0
    limit, offset = 100 if args.limit is None else args.limit, args.offset or 0
    response = httpx.get(api_url(settings) + "/failures", params={**selection, "key": args.key or [],
                                                                  "limit": limit, "offset": offset},
                         headers=read_headers(settings), timeout=30)
    if response.status_code != 200:
        raise CLIError(_error_text(response))
    page = response.json()
    if args.json:
        print(json.dumps(page, indent=2))
        return 0
    for record in page["failures"]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record["time"]))
        tries = f" (after {record['attempts']} tries)" if (record.get("attempts") or 1) > 1 else ""  # (was `x1`)
        print(f"{when}  {record['reason']:16} {plain(record['bucket'] + '/' + record['key'])}: "
              f"{plain(record['message'])}{tries}" + _retry_note(record))
    print(f"{counted(page['total'], 'failure record')}{page_note(page['total'], offset, len(page['failures']))}")
    if not page["total"] and (selection or args.key):  # a typo in a value? (`--reason corupt` said only "0")
        print(_none_has(selection, args.key))
    return 0


def _retry_note(record: dict[str, Any]) -> str:
    """When the service sends a record's object again by itself (S3 was away or slow for it), or that it gave up."""
    so_far = f"; {counted(record['retries'], 'time')} so far" if record.get("retries") else ""
    if (at := record.get("retry_at")) is None:
        return f" (sent again by itself {counted(record['retries'], 'time')}: yours to retry)" if so_far else ""
    when = f"at {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(at))}, if" if at > time.time() else "once"
    return f" (to be sent again by itself {when} S3 answers{so_far})"


def _none_has(selection: dict[str, str], keys: list[str] | None) -> str:
    chosen = [f"{name} {value!r}" for name, value in selection.items()] + [f"key {key!r}" for key in keys or []]
    return f"no failure record has {' and '.join(chosen)}: `bucketlens failures` lists them"


def page_note(total: int, offset: int, shown: int) -> str:
    """Which of ``total`` items a page listed, when not all ("1013 groups" after 50 of them said nothing of the
    rest, and --limit above 1000 was answered as 1000 without a word)."""
    if shown == total:
        return ""
    if not shown:
        return f" (none from {offset + 1} on)"
    return f" ({offset + 1}-{offset + shown} shown; --offset {offset + shown} lists the next)" \
        if offset + shown < total else f" ({offset + 1}-{offset + shown} shown)"


def cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    from infra.samples import write_samples

    stack, _ = _stack_for_up(settings, args)
    stack.up()
    client = stack.for_clients(_explicit())  # (a stack that ran before keeps its bucket and tokens)
    folder = stack.home / "samples"
    files = write_samples(folder)
    cmd_upload(client, argparse.Namespace(paths=[folder], prefix="samples/", bucket=None, hidden=False))
    print("waiting until every sample is searchable ...")
    # Each file's MD5 is its S3 etag (single-part uploads): wait for exactly these versions, not a vector count.
    wanted = {"samples/" + p.relative_to(folder).as_posix(): hashlib.md5(p.read_bytes()).hexdigest() for p in files}
    deadline = time.monotonic() + 300
    while wanted:
        for key, etag in list(wanted.items()):
            state = httpx.get(f"{stack.api_url}/objects/{client.bucket}/{quote(key)}",
                              headers=read_headers(client), timeout=10)
            if state.status_code == 200 and state.json()["state"] == "indexed" and state.json()["etag"] == etag:
                del wanted[key]
        if wanted and time.monotonic() > deadline:
            raise CLIError(f"{len(wanted)} samples not indexed within 5 minutes; see `bucketlens queues`")
        time.sleep(0.3)
    for copy in sorted(p for p in files if "augmented" in p.parts)[:3]:
        original = "samples/" + copy.name.replace("-flipped-crop", "")
        print(f"\nnearest to {original}  (the set holds a mirrored, cropped, brightened copy of it)")
        query = {"key": original, "bucket": client.bucket, "k": 3, "prefix": "samples/"}  # (a bucket in use holds
        # other copies of these well-known photos: they came first, and the sample set's own copy went unseen)
        for hit in search_request(client, query)["results"]:
            print(f"  {hit['score']:.4f}  {plain(hit['key'])}{same_photo(hit)}")
    print(f"\nweb page and API: {stack.api_url}/   (bucketlens status --json for everything else)")
    return 0


def admin_headers(settings: Settings) -> dict[str, str]:
    if not settings.admin_token:
        raise CLIError("no admin token: run against the local stack or set BUCKETLENS_ADMIN_TOKEN")
    return bearer(settings.admin_token)


def writer_url(settings: Settings) -> str:
    """The index service that merges (rebuilds and reconciles run there): a local stack's writer replica
    (``Stack.writer_url``), else the API address."""
    if _has_stack(settings):
        return _stack(settings).writer_url()  # type: ignore[no-any-return]
    return api_url(settings)


def _rebuild_state(url: str, job: dict[str, Any], headers: dict[str, str], patience_s: float = 300) -> dict[str, Any]:
    """The job as the service says now; while the service is briefly away (a restart, Redis or Milvus coming back:
    5xx or no answer), the job as it last was, for up to ``patience_s`` (the wait ended in a traceback)."""
    away = time.monotonic()
    while True:
        try:
            response = httpx.get(url, headers=headers, timeout=30)
            if response.status_code == 200:
                return response.json()  # type: ignore[no-any-return]
            if response.status_code < 500:
                raise CLIError(_error_text(response))
            trouble = _error_text(response)
        except httpx.TransportError as exc:
            trouble = f"no answer ({exc})"
        if time.monotonic() - away > patience_s:
            raise CLIError(f"rebuild {job['id']}: {trouble} for {patience_s:.0f} s; it may still run: GET {url}")
        time.sleep(2)


def cmd_rebuild(settings: Settings, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    if args.cancel is not None:
        return cancel_rebuild(settings, args.cancel, args.json)
    body = {"mode": "reindex" if args.reindex else "reembed", "bucket": args.bucket, "index_type": args.index_type,
            "model": args.model}
    writer, headers = writer_url(settings), admin_headers(settings)
    response = httpx.post(writer + "/rebuild", json=body, headers=headers, timeout=REBUILD_START_WAIT_S + 60)
    running = ((_answer(f"{writer}/stats", headers) or {}).get("rebuild") or {}) if response.status_code == 409 else {}
    if running.get("state") == "running" and args.wait:  # (it answered 409 with no word of how to follow the one
        # that runs: review 78)
        print(f"rebuild {running['id']} ({running['mode']}) runs already, and was not started again: following it",
              file=sys.stderr)
        job = running
    elif running.get("state") == "running":
        raise CLIError(f"{_error_text(response)}; follow it with `bucketlens rebuild --wait`, or cancel it with "
                       f"`bucketlens rebuild --cancel {running['id']}`")
    elif response.status_code != 202:
        raise CLIError(_error_text(response))
    else:
        job = response.json()
        if not args.json:  # (a script parsed the id out of this line: review 79)
            print(f"rebuild {job['id']} started ({job['mode']}, generation {job['generation']})")
    if not args.wait:
        if args.json:
            print(json.dumps(job))
        return 0
    url = f"{writer}/rebuild/{job['id']}"
    try:
        with tqdm(total=job["total"] or None, unit="obj", desc=job["mode"],  # (no total while it lists: 0/1)
                  disable=None) as bar:  # (only at a terminal, as `upload`'s)
            while job["state"] == "running":
                time.sleep(1)
                job = _rebuild_state(url, job, headers)
                bar.total = job["total"] or None
                bar.n = job["done"]
                # (waiting on S3 or the model: the bar stood still, saying nothing)
                bar.set_postfix_str(f"{job['retrying']} to send again, once S3 and the queues are quiet"
                                    if job.get("retrying") else "", refresh=False)
                bar.refresh()
    except KeyboardInterrupt:  # Ctrl-C stops the waiting, not the rebuild: say where it goes on
        print(f"stopped waiting; rebuild {job['id']} still runs: GET {url}; cancel it with "
              f"`bucketlens rebuild --cancel {job['id']}`", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(job))
        return 0 if job["state"] == "done" else 1
    print(f"rebuild {job['id']} {job['state']}: {job['done']}/{job['total']} settled, {job['failed']} failed"
          + (f" ({why_failed(job)})" if job.get("error") else "")
          # (a reembed under a tighter limit swapped in without them, and only `failures --retry` brings them back)
          + (": not in the new index (a corrupt or empty file, no image, or over a limit such as "
             "BUCKETLENS_MAX_PIXELS); `bucketlens failures` says which and why, `bucketlens failures --retry` sends "
             "them again once mended" if job["failed"] and job["state"] == "done" else ""))
    return 0 if job["state"] == "done" else 1


def cancel_rebuild(settings: Settings, job_id: str, as_json: bool) -> int:
    """``DELETE /rebuild/{id}``; with no id, of the rebuild ``/stats`` says is running."""
    url = writer_url(settings)
    if not job_id:
        state = _index_state(url)
        if state is None:  # (it said "no rebuild is running")
            raise CLIError(f"no answer from the index service at {url}: cannot tell which rebuild runs")
        running = state.get("rebuild")
        if not running or running["state"] != "running":
            raise CLIError("no rebuild is running" + (f" (the last, {running['id']}, is {running['state']})"
                                                      if running else ""))
        job_id = running["id"]
    response = httpx.delete(f"{url}/rebuild/{job_id}", headers=admin_headers(settings), timeout=30)
    if response.status_code != 200:
        raise CLIError(_error_text(response))
    job = response.json()
    print(json.dumps(job) if as_json else f"rebuild {job['id']} {job['state']} at {job['done']}/{job['total']}; the "
          "serving index stays as it was (batches the workers already took run to their end, unused)")
    return 0


def cmd_reconcile(settings: Settings, args: argparse.Namespace) -> int:
    body = {"bucket": args.bucket, **({"dry_run": True} if args.dry_run else {})}  # (a server before it refuses it)
    response = httpx.post(writer_url(settings) + "/reconcile", json=body, headers=admin_headers(settings), timeout=600)
    if response.status_code != 200:
        raise CLIError(_error_text(response))
    print(json.dumps(response.json()) if args.json else reconcile_summary(response.json(), args.bucket))
    return 0


def reconcile_summary(report: dict[str, Any], bucket: str | None) -> str:
    """One line from ``POST /reconcile``'s answer. ``failed`` counts objects among the missing and changed whose
    listed version already failed by its content (not an image, corrupt, ...): reconcile leaves those to
    ``failures --retry`` rather than embedding the same bad bytes again."""
    failed, in_flight = report.get("failed", 0), report.get("in_flight", 0)
    sent = report["missing"] + report["changed"] - failed - in_flight
    left = f", {in_flight} on their way already" if in_flight else ""
    if failed:
        retry = f"bucketlens failures{f' --bucket {bucket}' if bucket else ''} --retry"
        left += (f", {failed} not sent (the listed version already failed by its content: `bucketlens failures` "
                f"lists them, `{retry}` sends them again)")
    cleared = report.get("failures_cleared", 0)
    if report.get("dry_run"):
        records = (f"; {counted(cleared, 'failure record')} of objects no longer in the bucket would go"
                   if cleared else "")
        return (f"dry run, nothing changed: listed {report['listed']}: {report['missing']} missing, "
                f"{report['changed']} changed; {sent} would be sent for embedding{left}; {report['removed']} would be "
                f"removed from the index{records} ({report['seconds']} s)")
    records = f"; {counted(cleared, 'failure record')} of objects no longer in the bucket cleared" if cleared else ""
    return (f"listed {report['listed']}: {report['missing']} missing, {report['changed']} changed; {sent} sent for "
            f"embedding{left}; {report['removed']} removed{records} ({report['seconds']} s)")


TOKEN_VARIABLES = {"missing or wrong read token": "BUCKETLENS_READ_TOKEN",
                   "missing or wrong admin token": "BUCKETLENS_ADMIN_TOKEN"}


def _error_text(response: httpx.Response, options: dict[str, str] | None = None) -> str:
    """The service's error in one line; ``options``: its field names -> the CLI options that set them, for a
    message that starts with one ("modified_after must be ..." where --after was typed)."""
    try:
        error = response.json()["error"]
        hint = TOKEN_VARIABLES.get(error["message"])
        message = str(error["message"])
        for field, option in (options or {}).items():  # a field leading the message, or a name_with_underscores
            # anywhere in it ("--after must be earlier than modified_before": review 31), not a part of a key quoted
            # in it ("text/scan.jpg", ".../modified_after.jpg": review 34)
            message = re.sub(rf"^{field}(?= )" if "_" not in field else rf"(?<![\w/.'-]){field}(?![\w/.'-])",
                             option, message)
        return f"{response.status_code} {error['code']}: {message}" + (
            f" (the CLI sends {hint}: set it to the index service's)" if hint else "")
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}: {response.text[:200]}"


COMMANDS = {
    "up": cmd_up, "down": cmd_down, "status": cmd_status, "demo": cmd_demo,
    "ingest": run_ingest, "worker": run_worker, "serve": run_serve, "supervise": run_supervise,
    "upload": cmd_upload, "search": cmd_search, "duplicates": cmd_duplicates, "queues": cmd_queues,
    "failures": cmd_failures,
    "rebuild": cmd_rebuild, "reconcile": cmd_reconcile,
}

if __name__ == "__main__":
    sys.exit(main())
