"""Settings: every field documented in the README's table, and ``from_env`` parsing with clear errors."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from bucketlens.settings import Settings, unknown_variables

README = Path(__file__).resolve().parent.parent / "README.md"


def documented_variables() -> list[str]:
    """The first cell of each row of the README's settings table."""
    return re.findall(r"^\| `(BUCKETLENS_[A-Z0-9_]+)` \|", README.read_text(), flags=re.MULTILINE)


def test_every_field_is_in_the_readme_table_and_nothing_else() -> None:
    fields = [f"BUCKETLENS_{field.name.upper()}" for field in dataclasses.fields(Settings)]
    documented = documented_variables()
    assert sorted(set(fields) - set(documented)) == [], "add these settings to README.md's settings table"
    assert sorted(set(documented) - set(fields)) == [], "README.md documents settings that do not exist"
    assert len(documented) == len(set(documented)), "a setting is documented twice"


def test_from_env_parses_each_type() -> None:
    settings = Settings.from_env({
        "BUCKETLENS_API_PORT": "8000", "BUCKETLENS_HALF": "off", "BUCKETLENS_SNAPSHOT_S3": "Yes",
        "BUCKETLENS_FETCH_TIMEOUT_S": "2.5", "BUCKETLENS_HOME": "/srv/bl", "BUCKETLENS_NAMESPACE": "prod",
        "OTHER": "ignored",
    })
    assert settings.api_port == 8000 and settings.half is False and settings.snapshot_s3 is True
    assert settings.fetch_timeout_s == 2.5 and settings.home == Path("/srv/bl") and settings.namespace == "prod"
    assert settings.batch_size == Settings().batch_size  # unset fields keep their defaults


def test_overrides_win_and_to_env_round_trips() -> None:
    settings = Settings.from_env({"BUCKETLENS_API_PORT": "8000"}, api_port=9000, half=False)
    assert settings.api_port == 9000
    assert Settings.from_env(settings.to_env()) == settings


@pytest.mark.parametrize(("variable", "raw", "kind"), [  # with what is accepted (a bool's words were not said)
    ("BUCKETLENS_API_PORT", "80a", "int: a whole number"),
    ("BUCKETLENS_BATCH_SIZE", "3.5", "int: a whole number"),
    ("BUCKETLENS_HALF", "maybe", "bool: give 1/0, true/false, yes/no or on/off"),
    ("BUCKETLENS_FETCH_TIMEOUT_S", "soon", "float: a number"),
])
def test_bad_values_are_refused_with_the_variable_named(variable: str, raw: str, kind: str) -> None:
    with pytest.raises(ValueError, match=f"^{variable}='{re.escape(raw)}' is not a valid {re.escape(kind)}$"):
        Settings.from_env({variable: raw})



def test_the_defaults_are_valid() -> None:
    assert Settings.from_env({}) == Settings()


@pytest.mark.parametrize(("environ", "refusal"), [
    ({"BUCKETLENS_MERGE_BATCH": "0"}, "BUCKETLENS_MERGE_BATCH=0: must be at least 1"),
    ({"BUCKETLENS_BATCH_SIZE": "-5"}, "BUCKETLENS_BATCH_SIZE=-5: must be at least 1"),
    ({"BUCKETLENS_WORKER_CONCURRENCY": "-1"}, "BUCKETLENS_WORKER_CONCURRENCY=-1: must be at least 0"),
    ({"BUCKETLENS_API_PORT": "65536"}, "BUCKETLENS_API_PORT=65536: must be at least 0 and at most 65535"),
    ({"BUCKETLENS_FETCH_TIMEOUT_S": "0"},
     "BUCKETLENS_FETCH_TIMEOUT_S=0.0: must be at least 0.001 and at most 31536000"),
    ({"BUCKETLENS_WRITER_LEASE_S": "inf"},
     "BUCKETLENS_WRITER_LEASE_S=inf: must be at least 0.001 and at most 31536000"),
    ({"BUCKETLENS_API_HOST": " 127.0.0.1"}, "BUCKETLENS_API_HOST=' 127.0.0.1': has spaces around it"),
    ({"BUCKETLENS_BUCKET": "Bad_Bucket!"},
     "BUCKETLENS_BUCKET='Bad_Bucket!': an S3 bucket name holds letters, digits, '.', '-' and '_' only"),
    ({"BUCKETLENS_NAMESPACE": "a b"},  # (Ceph named its topic "a+b-...", which nothing found again: review 61)
     "BUCKETLENS_NAMESPACE='a b': a namespace is printable ASCII without spaces, '/' or '\\', and not '.' or '..'"),
    # (it names folders under the home: these put its snapshots and features elsewhere: review 86)
    ({"BUCKETLENS_NAMESPACE": "/tmp/x"}, "BUCKETLENS_NAMESPACE='/tmp/x': a namespace is printable ASCII without"),
    ({"BUCKETLENS_NAMESPACE": ".."}, "BUCKETLENS_NAMESPACE='..': a namespace is printable ASCII without"),
    ({"BUCKETLENS_MERGE_BATCH": str(10**20)},  # (the index service never became ready: review 61)
     f"BUCKETLENS_MERGE_BATCH={10**20}: must be at least 1 and at most 9007199254740991"),
    ({"BUCKETLENS_DEDUP_TTL_S": str(10**20)},  # (ingest answered 503 to every event)
     f"BUCKETLENS_DEDUP_TTL_S={10**20}: must be at least 1 and at most 31536000"),
    ({"BUCKETLENS_BATCH_WINDOW_MS": str(10**12)},
     f"BUCKETLENS_BATCH_WINDOW_MS={10**12}: must be at least 0 and at most 31536000000"),
    ({"BUCKETLENS_RECONCILE_EVERY_S": "inf"},
     "BUCKETLENS_RECONCILE_EVERY_S=inf: must be at least 0 and at most 31536000"),
    ({"BUCKETLENS_S3_ENDPOINT": "localhost:7480"},
     "BUCKETLENS_S3_ENDPOINT='localhost:7480': give a URL starting with http:// or https://"),
    ({"BUCKETLENS_REDIS_URL": "127.0.0.1:6379"},
     "BUCKETLENS_REDIS_URL='127.0.0.1:6379': give a URL starting with redis:// or rediss:// or unix://"),
    # ('*:8080' was read as '*', any host; 'https://x' as the host 'https': review 88)
    ({"BUCKETLENS_ALLOWED_HOSTS": "photos.example, *:8080"},
     "BUCKETLENS_ALLOWED_HOSTS='photos.example, *:8080': an entry is a host name or address, with a port or not ('*' "
     "alone: any), not '*:8080'"),
    ({"BUCKETLENS_SNS_HOSTS": "https://sns.internal"}, "BUCKETLENS_SNS_HOSTS='https://sns.internal': an entry is a "
                                                       "host name or address, with a port or not, not 'https://"),
    ({"BUCKETLENS_SNS_HOSTS": "sns.internal:port"}, "BUCKETLENS_SNS_HOSTS='sns.internal:port': an entry is a host"),
    ({"BUCKETLENS_REDIS_URL": "redis://127.0.0.1:6379/abc"},  # (review 86: 503 "until Redis is back", for good)
     "BUCKETLENS_REDIS_URL='redis://127.0.0.1:6379/abc': the path after the host is the database number (/0, /1, "
     "...), not '/abc'"),
    ({"BUCKETLENS_MILVUS_URI": "127.0.0.1:19530"},
     "BUCKETLENS_MILVUS_URI='127.0.0.1:19530': give a URL starting with http:// or https:// or tcp:// or tcp: or "
     "grpc:// or unix:"),
    ({"BUCKETLENS_MILVUS_URI": "http://127.0.0.1:abc"},  # (any `up` ended in a traceback: review 48)
     "BUCKETLENS_MILVUS_URI='http://127.0.0.1:abc': Port could not be cast to integer value as 'abc'"),
    ({"BUCKETLENS_S3_ENDPOINT": "http://127.0.0.1:99999"},
     "BUCKETLENS_S3_ENDPOINT='http://127.0.0.1:99999': Port out of range 0-65535"),
    ({"BUCKETLENS_REPLICA": " "}, "BUCKETLENS_REPLICA=' ': has spaces around it"),
    ({"BUCKETLENS_S3_SECRET_KEY": ""}, "BUCKETLENS_S3_ACCESS_KEY and BUCKETLENS_S3_SECRET_KEY: give both, or "
                                       "neither for boto3's own credential chain (one is empty)"),
    ({"BUCKETLENS_VISIBILITY_TIMEOUT_S": "1"}, "BUCKETLENS_VISIBILITY_TIMEOUT_S=1: must be at least 60"),
    ({"BUCKETLENS_INGEST_MAX_MEMORY_FRACTION": "1.5"},
     "BUCKETLENS_INGEST_MAX_MEMORY_FRACTION=1.5: must be above 0 and at most 1"),
    ({"BUCKETLENS_RUNTIME": "tensorrt"}, "BUCKETLENS_RUNTIME='tensorrt': choose one of auto, torch, onnx, onnx-int8"),
    ({"BUCKETLENS_DEVICE": "tpu"}, "BUCKETLENS_DEVICE='tpu': choose one of auto, cpu, cuda"),
    ({"BUCKETLENS_INDEX_BACKEND": "nosuch"}, "BUCKETLENS_INDEX_BACKEND='nosuch': choose one of faiss, milvus"),
    ({"BUCKETLENS_FAISS_INDEX_TYPE": "HNSW"}, "BUCKETLENS_FAISS_INDEX_TYPE='HNSW': choose one of IVF, IVF-SQ8"),
    ({"BUCKETLENS_MILVUS_INDEX_TYPE": "IVF-SQ8"}, "BUCKETLENS_MILVUS_INDEX_TYPE='IVF-SQ8': choose one of HNSW, IVF"),
    ({"BUCKETLENS_MODEL": "nosuchmodel"}, "BUCKETLENS_MODEL='nosuchmodel': choose one of efficientnet-lite0, "),
    ({"BUCKETLENS_LOG_LEVEL": "info"},
     "BUCKETLENS_LOG_LEVEL='info': choose one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    ({"BUCKETLENS_DEVICE": "tpu", "BUCKETLENS_MERGE_BATCH": "0"},  # every problem at once, in the fields' order
     "BUCKETLENS_DEVICE='tpu': choose one of auto, cpu, cuda; BUCKETLENS_MERGE_BATCH=0: must be at least 1"),
])
def test_values_outside_the_choices_or_bounds_are_refused_with_the_variable_named(
    environ: dict[str, str], refusal: str
) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(refusal)}"):
        Settings.from_env(environ)


@pytest.mark.parametrize("token", ["s3cret\n", " s3cret", "tökén", "two words"])
def test_a_token_that_no_header_could_carry_is_refused_without_saying_it(token: str) -> None:
    """A token with a space, a newline (read from a file) or a non-ASCII character never matched as a bearer header
    (Starlette reads headers as latin-1 and the header's token stripped), only as ``?token=`` (an independent
    review)."""
    for variable in ("BUCKETLENS_READ_TOKEN", "BUCKETLENS_ADMIN_TOKEN", "BUCKETLENS_WEBHOOK_TOKEN"):
        with pytest.raises(ValueError, match=f"^{variable} holds a space, a control or a non-ASCII") as refused:
            Settings.from_env({variable: token})
        assert token.strip() not in str(refused.value)  # a secret: not in logs
    assert Settings.from_env({"BUCKETLENS_READ_TOKEN": "a+b&c#d~!"}).read_token == "a+b&c#d~!"


def test_a_bad_url_is_refused_without_its_password() -> None:
    """The refusal quoted the whole URL, password and all, to stderr and the service logs (review 70)."""
    for variable, url in (("BUCKETLENS_REDIS_URL", "redis://:Sup3rSecret@queue-host:63790x/0"),
                          ("BUCKETLENS_REDIS_URL", "rediss://user:Sup3rSecret@queue-host:99999"),
                          ("BUCKETLENS_MILVUS_URI", "http://root:Sup3rSecret@db:port/"),
                          ("BUCKETLENS_REDIS_URL", "redis://:Sup3r/Sec@ret@queue-host:6379/0"),  # (review 72)
                          ("BUCKETLENS_REDIS_URL", "redis://:Sup3rSecret@queue-host:6379/x@y")):
        with pytest.raises(ValueError, match=f"^{variable}=") as refused:
            Settings.from_env({variable: url})
        assert "Sup3r" not in str(refused.value) and "***@" in str(refused.value), refused.value


@pytest.mark.parametrize("field", [field.name for field in dataclasses.fields(Settings)
                                   if field.type in ("int", "float")])
def test_no_number_takes_a_negative_value(field: str) -> None:
    """Every number is bounded: a field added without a bound fails here."""
    with pytest.raises(ValueError, match=f"^BUCKETLENS_{field.upper()}=-1: must be "):
        Settings.from_env({}, **{field: -1})


@pytest.mark.parametrize("field", [field.name for field in dataclasses.fields(Settings)
                                   if field.type in ("int", "float")])
def test_no_number_takes_a_value_past_what_redis_and_the_clock_hold(field: str) -> None:
    """Every number is bounded above too (review 61: 10**20 passed and broke the services later)."""
    with pytest.raises(ValueError, match=f"^BUCKETLENS_{field.upper()}=1e\\+20: must be .* and at most "):
        Settings.from_env({}, **{field: 1e20})


def test_zero_is_accepted_where_it_means_something() -> None:
    """A free port, one worker process per core, all cores, no waiting, no retries, off, no grace."""
    settings = Settings(api_port=0, ingest_port=0, worker_concurrency=0, torch_threads=0, batch_window_ms=0,
                        max_retries=0, reconcile_every_s=0, snapshot_failure_grace_s=0, approx_threshold=0)
    assert settings.api_port == 0 and settings.worker_concurrency == 0
    assert Settings(duplicates_cpu_share=1, ingest_max_memory_fraction=1).duplicates_cpu_share == 1


def test_settings_made_in_code_are_checked_too() -> None:
    with pytest.raises(ValueError, match="^BUCKETLENS_SNAPSHOTS_KEPT=0: must be at least 1 and at most \\d+$"):
        dataclasses.replace(Settings(), snapshots_kept=0)


@pytest.mark.parametrize("variable", ["BUCKETLENS_HOME", "BUCKETLENS_BUCKET", "BUCKETLENS_NAMESPACE",
                                      "BUCKETLENS_INGEST_HOST", "BUCKETLENS_API_HOST", "BUCKETLENS_RESERVED_PREFIX",
                                      "BUCKETLENS_WORDNET", "BUCKETLENS_S3_REGION"])
@pytest.mark.parametrize("empty", ["", " "])
def test_an_empty_name_is_refused(variable: str, empty: str) -> None:
    """`BUCKETLENS_HOME=` wrote the stack's stack.json (ports, tokens) into the working folder; an empty bucket
    failed at the first upload with a traceback; an empty host bound every interface (an independent review). An
    empty reserved prefix reserved every key: nothing was indexed, and a reconcile emptied the index; an empty WordNet
    folder left the index service short of ready for good (review 48)."""
    with pytest.raises(ValueError, match=f"^{variable} is empty: give a value or leave it unset$"):
        Settings.from_env({variable: empty})


def test_a_variable_that_is_no_setting_is_noted_with_the_likely_one() -> None:
    notes = unknown_variables({"BUCKETLENS_BATCHSIZE": "4", "BUCKETLENS_FROBNICATE": "1", "BUCKETLENS_BATCH_SIZE": "4",
                               "BUCKETLENS_TEST_HOME": "/tmp/x", "HOME": "/root"})
    assert notes == ["BUCKETLENS_BATCHSIZE is not a setting (did you mean BUCKETLENS_BATCH_SIZE?); it is ignored",
                     "BUCKETLENS_FROBNICATE is not a setting; it is ignored"]


def test_the_fetch_timeout_bounds_the_workers_downloads_only() -> None:
    """``FETCH_TIMEOUT_S`` was every S3 client's read timeout: 0.05 made ``up`` and ``upload`` fail with tracebacks
    (an independent check of unusual settings). The workers' client still waits that long at most."""
    from bucketlens.s3 import READ_TIMEOUT_S, make_client

    settings = Settings(fetch_timeout_s=0.05)
    assert make_client(settings).meta.config.read_timeout == READ_TIMEOUT_S
    assert make_client(settings, read_timeout=settings.fetch_timeout_s).meta.config.read_timeout == 0.05
