"""One settings object per process, read from ``BUCKETLENS_*`` environment variables once at start-up."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

from vision.models import DEFAULT_MODEL, RECIPES  # names only: vision/models.py imports neither torch nor OpenCV

PREFIX = "BUCKETLENS_"
# The index backends (index_service/faiss_backend.py, milvus_index.py), each with the index types it builds: the
# exact scan first, then the approximate ones (the size policy's BUCKETLENS_FAISS_/MILVUS_INDEX_TYPE).
INDEX_TYPES: dict[str, tuple[str, ...]] = {"faiss": ("Flat", "IVF", "IVF-SQ8"), "milvus": ("Flat", "HNSW", "IVF")}
ALL_INDEX_TYPES = tuple(dict.fromkeys(t for types in INDEX_TYPES.values() for t in types))


def only_backend(index_type: str) -> str | None:
    """The one backend that builds ``index_type`` (None: several or none)."""
    builders = [name for name, types in INDEX_TYPES.items() if index_type in types]
    return builders[0] if len(builders) == 1 else None


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every setting of every bucketlens service; the README's settings table documents each field.

    The environment variable of a field is ``BUCKETLENS_`` + its upper-cased name.
    """

    home: Path = Path(".bucketlens")  # state folder of the local stack (tokens, pid files, logs, snapshots)
    redis_url: str = "redis://127.0.0.1:6379/0"
    namespace: str = "bl"  # prefix of every Redis key and Celery queue name (tests use their own)
    s3_endpoint: str = "http://127.0.0.1:7480"
    s3_public_endpoint: str = ""  # endpoint browsers reach; presigned URLs are signed for it (default: s3_endpoint)
    s3_access_key: str = "rgwkey"
    s3_secret_key: str = "rgwsecret"
    s3_region: str = "us-east-1"
    bucket: str = "images"  # the bucket the local stack and the CLI use by default
    reserved_prefix: str = "_bucketlens/"  # never indexed: canaries, snapshots kept in the bucket
    webhook_token: str = ""  # required on POST /events when set
    sns_hosts: str = ""  # hosts besides Amazon SNS's whose SubscribeURL ingest visits (comma-separated)
    admin_token: str = ""  # required on rebuild, reconcile and failure retry/clear
    read_token: str = ""  # when set, required on search, objects and the page
    ingest_host: str = "127.0.0.1"
    ingest_port: int = 7401
    api_host: str = "127.0.0.1"
    allowed_hosts: str = ""  # Host names the API answers (comma-separated; *: any); "": loopback names if bound there
    api_port: int = 7400
    max_body_bytes: int = 4 * 1024 * 1024  # /events bodies
    max_upload_bytes: int = 32 * 1024 * 1024  # /search image uploads
    batch_window_ms: int = 50  # ingest groups events arriving within this window into one task
    batch_size: int = 32  # most object references per task
    ingest_max_memory_fraction: float = 0.9  # ingest answers 503 above this share of Redis's maxmemory
    dedup_ttl_s: int = 3600  # how long an event (ingest/receiver.py, ``_digest``) is remembered as seen
    wordnet: Path = Path("/usr/share/wordnet")  # WordNet 3.0 (Debian's wordnet-base), for text queries
    model: str = DEFAULT_MODEL  # a recipe of vision/models.py
    device: str = "auto"  # auto | cpu | cuda
    runtime: str = "auto"  # auto | torch | onnx | onnx-int8  (which engine runs the model)
    half: bool = True  # half precision on CUDA
    torch_threads: int = 0  # 0: the cores shared among the worker processes (ONNX Runtime); torch's own default
    max_object_bytes: int = 50 * 1024 * 1024
    max_pixels: int = 64_000_000  # decompression-bomb guard
    fetch_timeout_s: float = 30.0  # per-object download deadline
    fetch_concurrency: int = 8
    visibility_timeout_s: int = 600  # broker redelivers an unacknowledged task after this
    max_redeliveries: int = 5
    max_retries: int = 8
    worker_concurrency: int = 0  # worker processes; 0: one per core (vision.embedders.worker_processes)
    merge_batch: int = 512
    snapshot_every_s: float = 60.0
    snapshot_every_entries: int = 5000
    snapshots_kept: int = 3
    snapshot_failure_grace_s: float = 600.0  # snapshots failing this long (disk full, read-only): /readyz says 503
    snapshot_s3: bool = False  # also keep snapshots in the bucket under <reserved_prefix>snapshots/<namespace>/
    duplicates_cpu_share: float = 0.25  # of one core, for verifying copies while objects arrive; 1: no limit
    reconcile_every_s: float = 0.0  # 0: only on demand (bucketlens reconcile / POST /reconcile)
    tombstone_retention_s: int = 24 * 3600
    approx_threshold: int = 50_000  # above this many vectors the service builds an approximate index
    faiss_threads: int = 1  # OpenMP threads per FAISS call in the index service (concurrency comes from HTTP)
    faiss_index_type: str = "IVF"  # the approximate type above approx_threshold: IVF or IVF-SQ8 (a quarter the memory)
    replica: str = ""  # this index service's name among replicas ("": host:pid)
    writer_lease_s: float = 10.0  # the merging replica's Redis lease: another takes over this long after it died
    index_backend: str = "faiss"  # faiss (in the index service, snapshots on disk) | milvus (a Milvus server)
    milvus_uri: str = "http://127.0.0.1:19530"  # the Milvus server's gRPC address
    milvus_token: str = ""  # "user:password" or an API key, when the server requires authentication
    milvus_database: str = ""  # "" : the server's default database
    milvus_index_type: str = "HNSW"  # the approximate type above approx_threshold: HNSW or IVF (IVF_FLAT)
    milvus_hnsw_m: int = 16  # HNSW graph degree
    milvus_hnsw_ef_construction: int = 200
    milvus_hnsw_ef: int = 64  # HNSW search breadth (raised to k when k is larger)
    milvus_ivf_nprobe: int = 16  # IVF lists scanned per query (nlist is ~4 sqrt(n) at build time)
    canary_interval_s: float = 30.0  # how often the local supervisor writes a canary (services: every second)
    canary_timeout_s: float = 30.0  # a canary undelivered for longer is a stalled topic: restart radosgw
    liveness_timeout_s: float = 60.0  # a local-stack process running but silent this long is hung: kill, restart
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        """Refuse a value outside its field's choices or bounds, so that a process stops at start, naming the
        variable, rather than failing late or quietly doing something else."""
        problems = [problem for field in dataclasses.fields(self)
                    if (problem := _problem(field.name, getattr(self, field.name)))]
        if not any(_problem(name, getattr(self, name)) for name in ("fetch_timeout_s", "visibility_timeout_s")) and (
                self.visibility_timeout_s < (least := least_time_limit_s(self.fetch_timeout_s) + HAND_BACK_S)
        ):
            # (at 60 with FETCH_TIMEOUT_S 30, a batch holding one stalled download ran past it, and the broker handed
            # it out again every 90 s, for good: review 86)
            problems.append(
                f"{PREFIX}VISIBILITY_TIMEOUT_S={self.visibility_timeout_s}: must be at least {least} with {PREFIX}"
                f"FETCH_TIMEOUT_S={self.fetch_timeout_s:g} (a batch holding a stalled download runs {S3_ATTEMPTS} x "
                f"({S3_CONNECT_TIMEOUT_S} s + FETCH_TIMEOUT_S) + 30 s before it counts as stuck, and must be handed "
                "back before the broker hands it out again): raise it, or lower FETCH_TIMEOUT_S")
        if bool(self.s3_access_key) != bool(self.s3_secret_key):  # (one was sent as None, signed with "" elsewhere)
            problems.append(f"{PREFIX}S3_ACCESS_KEY and {PREFIX}S3_SECRET_KEY: give both, or neither for boto3's own "
                            "credential chain (one is empty)")
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``environ`` (default ``os.environ``); explicit keyword overrides win."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            raw = environ.get(PREFIX + field.name.upper())
            if raw is not None:
                values[field.name] = _convert(field, raw)
        values.update(overrides)
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        """The environment that reproduces these settings in a child process."""
        env = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            env[PREFIX + field.name.upper()] = ("1" if value else "0") if isinstance(value, bool) else str(value)
        return env

    @property
    def presign_endpoint(self) -> str:
        return self.s3_public_endpoint or self.s3_endpoint


@dataclasses.dataclass(frozen=True)
class Bound:
    """The numbers a setting accepts: from ``low`` (``low`` itself too unless ``open``) up to ``high``."""

    low: float
    high: float = math.inf
    open: bool = False

    def admits(self, value: float) -> bool:
        return (value > self.low if self.open else value >= self.low) and value <= self.high

    def __str__(self) -> str:
        low = f"above {_number(self.low)}" if self.open else f"at least {_number(self.low)}"
        return low if math.isinf(self.high) else f"{low} and at most {_number(self.high)}"


def _number(x: float) -> str:
    """``x`` as a person writes it: 31536000, not 3.1536e+07 (review 19)."""
    return str(int(x)) if x == int(x) else f"{x:g}"


CHOICES: dict[str, tuple[str, ...]] = {
    "model": tuple(RECIPES),
    "device": ("auto", "cpu", "cuda"),
    "runtime": ("auto", "torch", "onnx", "onnx-int8"),
    "faiss_index_type": INDEX_TYPES["faiss"][1:],
    "index_backend": tuple(INDEX_TYPES),
    "milvus_index_type": INDEX_TYPES["milvus"][1:],
    "log_level": ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
}

# Every int and float field has a bound (tests/test_settings.py tries -1 on each). 0 is accepted where it means
# something (README, "Settings"): a free port, one worker process per core, all cores, no waiting, no retries, no
# grace, off, tombstones not kept, an approximate index from the first vector.
PORT = Bound(0, 65535)
# Bounded above too: a merge batch or a dedup TTL past Redis's 64-bit integers passed, and the service then never
# became ready (ingest answered 503 to every event), with log lines that blamed a Redis outage (review 61).
MOST = 2**53 - 1  # (a float's whole numbers: a byte limit past 2**31 is a user's to set)
COUNT = Bound(1, MOST)  # counts, sizes, limits
ZERO_MEANS = Bound(0, MOST)
YEAR_S = 365 * 86400
S3_ATTEMPTS = 2  # botocore's tries of an S3 request, the first included (bucketlens/s3.py)
S3_CONNECT_TIMEOUT_S = 3
HAND_BACK_S = 10  # a batch killed at its time limit is back in the queue within this, before the broker's copy


def least_time_limit_s(fetch_timeout_s: float) -> int:
    """The least a batch may run before it counts as stuck (``celery_config.time_limit_s``): one stalled download
    giving up (S3_ATTEMPTS tries, each its connect and ``FETCH_TIMEOUT_S``, botocore's backoff between), with 30 s
    to spare for the rest."""
    return math.ceil(S3_ATTEMPTS * (S3_CONNECT_TIMEOUT_S + fetch_timeout_s)) + 30
# (infinity passed and crashed the writer lease at start; 0.0004 s made a lease of 0 ms)
DURATION = Bound(0.001, YEAR_S)
ZERO_OR_DURATION = Bound(0, YEAR_S)  # (RECONCILE_EVERY_S=inf passed, and the reconcile thread died at its wait)
SHARE = Bound(0, 1, open=True)
BOUNDS: dict[str, Bound] = {
    **dict.fromkeys(("ingest_port", "api_port"), PORT),
    **dict.fromkeys(("max_body_bytes", "max_upload_bytes", "batch_size", "max_object_bytes",
                     "max_pixels", "fetch_concurrency", "max_redeliveries", "merge_batch",
                     "snapshot_every_entries", "snapshots_kept", "faiss_threads", "milvus_hnsw_m",
                     "milvus_hnsw_ef_construction", "milvus_hnsw_ef", "milvus_ivf_nprobe"), COUNT),
    **dict.fromkeys(("torch_threads", "max_retries", "worker_concurrency", "approx_threshold"), ZERO_MEANS),
    "batch_window_ms": Bound(0, YEAR_S * 1000),
    "dedup_ttl_s": Bound(1, YEAR_S),
    **dict.fromkeys(("snapshot_failure_grace_s", "reconcile_every_s", "tombstone_retention_s"), ZERO_OR_DURATION),
    **dict.fromkeys(("fetch_timeout_s", "snapshot_every_s", "writer_lease_s", "canary_interval_s",
                     "canary_timeout_s", "liveness_timeout_s"), DURATION),
    **dict.fromkeys(("ingest_max_memory_fraction", "duplicates_cpu_share"), SHARE),
    # Above the slowest live batch: a shorter one hands a running batch to another worker, which counted it as a
    # worker's death (at 1 s, with MAX_REDELIVERIES=1, a reembed swapped in 2 of 34 vectors: an independent check).
    "visibility_timeout_s": Bound(60, YEAR_S),
}


NOT_SETTINGS = ("BUCKETLENS_TEST_HOME", "BUCKETLENS_TEST_MILVUS")  # the test suite's own (tests/conftest.py)


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """A note for each ``BUCKETLENS_`` variable that is no setting (a typo would be ignored without a word), with
    the setting it likely meant."""
    names = [PREFIX + field.name.upper() for field in dataclasses.fields(Settings)]
    notes = []
    for variable in sorted(environ):
        if variable.startswith(PREFIX) and variable not in names and variable not in NOT_SETTINGS:
            meant = difflib.get_close_matches(variable, names, n=1, cutoff=0.8)
            notes.append(f"{variable} is not a setting" + (f" (did you mean {meant[0]}?)" if meant else "")
                         + "; it is ignored")
    return notes


# An empty home wrote the stack's state into the working folder; an empty host bound every interface; an empty
# reserved prefix reserved every key (nothing was indexed, and a reconcile emptied the index); an empty WordNet folder
# stopped the index service short of ready (review 48).
NOT_EMPTY = ("home", "bucket", "namespace", "ingest_host", "api_host", "reserved_prefix", "wordnet", "s3_region")
# A URL without its scheme ended in a library's traceback that named no variable. (S3_PUBLIC_ENDPOINT may be empty.)
SCHEMES = {"redis_url": ("redis://", "rediss://", "unix://"), "s3_endpoint": ("http://", "https://"),
           "s3_public_endpoint": ("http://", "https://"),
           "milvus_uri": ("http://", "https://", "tcp://", "tcp:", "grpc://", "unix:")}  # (pymilvus's forms)


TOKENS = ("webhook_token", "admin_token", "read_token")
# The longest ``POST /rebuild`` waits before it answers: for the last swap's first snapshot (index_service/rebuild.py;
# 12-20 s at 1M vectors). The CLI's request allows it, and S3's answers about the buckets beside it (it gave up at
# 30 s, said "is the stack up?", and the rebuild may have started after: review 87).
REBUILD_START_WAIT_S = 120.0
# What S3 servers accept as a bucket name (AWS's legacy names and Ceph's relaxed ones: capitals and "_" too). Not
# an access point's ARN: botocore sends a request for one to another host, signed with bucketlens's keys.
BUCKET_NAME = re.compile(r"[A-Za-z0-9._-]{1,255}")
# It names Redis keys, Celery queues and the bucket's notification: one with a space made a Ceph topic named "a+b-..."
# that nothing found again (review 61). Other characters pass (the topic's name has them as '-').
# Printable ASCII without spaces, nor '/' or '\', and not '.' or '..': it names folders under the home (snapshots/,
# features/): '/tmp/x' put them outside it, '..' on the home itself, and './a' beside 'a' (review 86)
NAMESPACE = re.compile(r"(?!\.\.?$)[!-.0-\[\]-~]+")
PASSWORD_IN_URL = re.compile(r"(//[^/@:]*:).*@")  # scheme://user:PASSWORD@host (to the last '@': it may hold '/')


def without_password(url: str) -> str:
    """``url`` with its password, if any, as ``***``: fit for stderr and logs."""
    return PASSWORD_IN_URL.sub(r"\1***@", url)


def _problem(name: str, value: Any) -> str | None:
    """What is wrong with ``value`` for the field ``name``, said with the variable that sets it, or None."""
    # (a URL's password was printed with it, to stderr and the service logs: review 70)
    shown = without_password(value) if name in SCHEMES and isinstance(value, str) else value
    given = f"{PREFIX}{name.upper()}={shown!r}"
    if name in NOT_EMPTY and not str(value).strip():
        return f"{PREFIX}{name.upper()} is empty: give a value or leave it unset"
    if name in TOKENS and not all("!" <= c <= "~" for c in value):  # (said without the value: it is a secret)
        return (f"{PREFIX}{name.upper()} holds a space, a control or a non-ASCII character: give printable ASCII (a "
                "token travels in an HTTP header, where such a one never matched; a file's trailing newline?)")
    if name == "bucket" and not BUCKET_NAME.fullmatch(str(value)):
        return f"{given}: an S3 bucket name holds letters, digits, '.', '-' and '_' only"
    if name == "namespace" and not NAMESPACE.fullmatch(str(value)):
        return f"{given}: a namespace is printable ASCII without spaces, '/' or '\\', and not '.' or '..'"
    if (name.endswith("_host") or name == "replica") and str(value) != str(value).strip():
        return f"{given}: has spaces around it"
    if name in SCHEMES and value and not str(value).lower().startswith(SCHEMES[name]):
        return f"{given}: give a URL starting with {' or '.join(SCHEMES[name])}"
    if name in SCHEMES and value:
        try:
            urlsplit(str(value)).port  # noqa: B018  (raises on a port that is no number or out of range)
        except ValueError as exc:  # (its message quotes what it read as the port: part of a password, with a '/')
            return f"{given}: " + (str(exc) if "@" not in str(value) else "no port number after the host (a password "
                                   "holding '/', '@' or ':' must be percent-encoded)")
    if name == "redis_url" and value and not str(value).lower().startswith("unix://") and not re.fullmatch(
            r"/?\d*", path := urlsplit(str(value)).path):  # (redis-py refused it only when used: ingest then answered
        # 503 "until Redis is back", for good: review 86)
        return f"{given}: the path after the host is the database number (/0, /1, ...), " + (
            f"not {path!r}" if "@" not in path else "and a password holding '/', '@' or ':' must be percent-encoded")
    if name in ("allowed_hosts", "sns_hosts") and (odd := [entry for entry in map(str.strip, str(value).split(","))
                                                            if entry and not _host_entry(entry, name)]):
        # ('*:8080' was read as '*', any host, and 'https://x' as the host 'https': review 88)
        return (f"{given}: an entry is a host name or address, with a port or not"
                + (" ('*' alone: any)" if name == "allowed_hosts" else "") + f", not {odd[0]!r}")
    if name in CHOICES and value not in CHOICES[name]:
        return f"{given}: choose one of {', '.join(CHOICES[name])}"
    if name in BOUNDS and not BOUNDS[name].admits(value):
        return f"{given}: must be {BOUNDS[name]}"
    return None


def _host_entry(entry: str, name: str) -> bool:
    """Whether ``entry`` of a host list (``name``) is a host name or address, with a valid port or none."""
    if entry == "*":
        return name == "allowed_hosts"
    try:
        host_and_port(entry)
    except ValueError:
        return False
    return True


def host_and_port(entry: str) -> tuple[str, int | None]:
    """A host list's entry as (host name in lower case, port or None): ``photos.example``, ``proxy:8080``,
    ``10.0.0.5``, ``::1`` and ``[::1]:8443`` (a bare IPv6 address has no port: compose's ``::1`` was refused, review
    89); ValueError for anything else (a scheme, a path, a wildcard, a port that is no number)."""
    if entry.count(":") > 1 and not entry.startswith("["):  # a bare IPv6 address
        entry = f"[{entry}]"
    parts = urlsplit(f"//{entry}")
    port = parts.port  # (raises on a port that is no number or out of range)
    bracketed = entry.startswith("[") and not re.fullmatch(r"\[[0-9A-Fa-f:.]+\](:\d+)?", entry)
    if not parts.hostname or bracketed or any(c in entry for c in "/@*?#% ;"):
        raise ValueError(f"not a host name or address: {entry!r}")
    return parts.hostname, port


WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}  # a host that binds every interface: its loopback


def reach(host: str) -> str:
    """Where to reach a server that binds ``host`` (``API_HOST``, ``INGEST_HOST``): a wildcard on loopback, an IPv6
    address in brackets. (127.0.0.1 always: `up` waited 300 s for a service bound to ::1 or a LAN one, review 48.)"""
    if host in WILDCARDS:
        return WILDCARDS[host]
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _convert(field: dataclasses.Field[Any], raw: str) -> Any:
    kind = field.type if isinstance(field.type, str) else field.type.__name__
    try:
        if kind == "bool":
            if raw.lower() not in {"1", "0", "true", "false", "yes", "no", "on", "off"}:
                raise ValueError(f"{PREFIX}{field.name.upper()}={raw!r} is not a valid bool: give 1/0, true/false, "
                                 "yes/no or on/off")
            return raw.lower() in {"1", "true", "yes", "on"}
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "Path":
            return Path(raw) if raw.strip() else raw  # (Path("") is ".": left empty for the check of empties)
    except ValueError as exc:
        if str(exc).startswith(PREFIX):
            raise
        example = {"int": ": a whole number", "float": ": a number"}.get(kind, "")
        raise ValueError(f"{PREFIX}{field.name.upper()}={raw!r} is not a valid {kind}{example}") from exc
    return raw
