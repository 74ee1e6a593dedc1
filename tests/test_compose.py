"""compose.yaml against the code: no Docker engine here, so the file is parsed and checked for what drifts
silently (a renamed setting, a removed subcommand, a port published on every interface)."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from bucketlens.cli import COMMANDS
from bucketlens.http import allowed_hosts
from bucketlens.settings import PREFIX, Settings

ROOT = Path(__file__).resolve().parent.parent
SETTINGS_VARS = {PREFIX + field.name.upper() for field in dataclasses.fields(Settings)}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return loaded


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]  # type: ignore[no-any-return]


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the "NAME=value" list form
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): str(v) for k, v in env.items()}


def interpolated(env: dict[str, str]) -> dict[str, str]:
    """``env`` as compose passes it with none of the variables set: ``${NAME:-default}`` becomes the default."""
    return {k: re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", v) for k, v in env.items()}


def bucketlens_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Services that run the bucketlens image (built from infra/Dockerfile)."""
    return {name: s for name, s in services(compose).items()
            if "build" in s or str(s.get("image", "")).startswith("bucketlens")}


def test_every_bucketlens_variable_is_a_settings_field(compose: dict[str, Any]) -> None:
    for name, service in services(compose).items():
        unknown = {var for var in environment(service) if var.startswith(PREFIX)} - SETTINGS_VARS
        assert not unknown, f"{name}: {sorted(unknown)} are not fields of bucketlens.settings.Settings"


def test_bucketlens_values_parse_as_settings(compose: dict[str, Any]) -> None:
    """Literal values (not ${...} substitutions) must convert to the field's type, as at start-up."""
    for name, service in bucketlens_services(compose).items():
        literal = {k: v for k, v in environment(service).items() if k.startswith(PREFIX) and "${" not in v}
        try:
            Settings.from_env(literal)
        except ValueError as exc:
            pytest.fail(f"{name}: {exc}")


def test_commands_are_bucketlens_subcommands(compose: dict[str, Any]) -> None:
    found = bucketlens_services(compose)
    assert {"ingest", "worker", "serve"} <= {s["command"][0] for s in found.values()}
    for name, service in found.items():
        command = service["command"]
        assert isinstance(command, list) and command, f"{name}: command must be a non-empty list"
        assert command[0] in COMMANDS, f"{name}: `bucketlens {command[0]}` is not a subcommand ({sorted(COMMANDS)})"


def test_build_dockerfiles_exist(compose: dict[str, Any]) -> None:
    built = {name: s["build"] for name, s in services(compose).items() if "build" in s}
    assert built
    for name, build in built.items():
        context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
        dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
        assert (context / dockerfile).is_file(), f"{name}: {context / dockerfile} does not exist"
        text = (context / dockerfile).read_text()
        assert "-c constraints.txt" in text, f"{dockerfile}: every pip call needs the torch pin"
        args = {} if isinstance(build, str) else (build.get("args") or {})
        declared = {line.split()[1].split("=")[0] for line in text.splitlines() if line.startswith("ARG ")}
        assert set(args) <= declared, f"{name}: build args {sorted(set(args) - declared)} not declared"
        # Every package the project installs is copied in: vision/ was not, and every service died at its first
        # import (review 33).
        packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
        copied = {line.split()[1] for line in text.splitlines() if line.startswith("COPY ")}
        missing = [p.rstrip("*") for p in packages["include"] if p.rstrip("*") not in copied]
        assert not missing, f"{dockerfile} copies no {missing} (pyproject.toml installs them)"


def test_every_data_file_of_a_package_is_installed_with_it() -> None:
    """The int8 calibration (vision/fitted/*.json) was left out of the wheel and the image: BUCKETLENS_RUNTIME=
    onnx-int8 failed there (review 34). Every tracked file of a package that is not Python is in package-data, but
    the Dockerfile (a build input, not a runtime file)."""
    import fnmatch
    import subprocess

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    data = setuptools["package-data"]
    packages = [p.rstrip("*") for p in setuptools["packages"]["find"]["include"]]
    tracked = subprocess.run(["git", "ls-files", *packages], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    left_out = [path for path in tracked if not path.endswith(".py") and path != "infra/Dockerfile"
                and not any(fnmatch.fnmatch(path.split("/", 1)[1], pattern)
                            for pattern in data.get(path.split("/", 1)[0], []))]
    assert tracked and not left_out, f"not in pyproject.toml's package-data: {left_out}"


def test_ports_are_published_on_loopback_only(compose: dict[str, Any]) -> None:
    published = 0
    for name, service in services(compose).items():
        for port in service.get("ports", []):
            published += 1
            if isinstance(port, dict):
                assert port.get("host_ip") == "127.0.0.1", f"{name}: {port} is published on every interface"
            else:
                assert str(port).startswith("127.0.0.1:"), f"{name}: {port} is published on every interface"
    assert published


def test_services_bind_all_interfaces_inside_their_containers(compose: dict[str, Any]) -> None:
    by_command = {s["command"][0]: environment(s) for s in bucketlens_services(compose).values()}
    assert by_command["ingest"]["BUCKETLENS_INGEST_HOST"] == "0.0.0.0"
    assert by_command["serve"]["BUCKETLENS_API_HOST"] == "0.0.0.0"


def test_the_api_answers_only_loopback_names_unless_told(compose: dict[str, Any]) -> None:
    """Bound to 0.0.0.0 in its container, the API answered any ``Host``: the DNS-rebinding guard was off behind a
    loopback-only port (an independent review)."""
    (api,) = [s for s in bucketlens_services(compose).values() if s["command"] == ["serve"]]
    env = interpolated(environment(api))
    assert allowed_hosts(env["BUCKETLENS_ALLOWED_HOSTS"], env["BUCKETLENS_API_HOST"]) == {"localhost", "127.0.0.1",
                                                                                         "::1"}


def test_every_services_settings_are_accepted(compose: dict[str, Any]) -> None:
    """A setting compose gives that the services refuse stops its container at start (review 89: a host-list check
    refused compose's "::1", and the API container exited 2)."""
    for name, service in bucketlens_services(compose).items():
        env = {k: re.sub(r"\$\{[A-Z0-9_]+:\?[^}]*\}", "chosen-by-the-user", v)  # (those compose requires)
               for k, v in interpolated(environment(service)).items() if k.startswith("BUCKETLENS_")}
        try:
            Settings.from_env(env)
        except ValueError as exc:
            raise AssertionError(f"compose's {name}: {exc}") from exc


def test_gpu_worker(compose: dict[str, Any]) -> None:
    gpu = [s for s in bucketlens_services(compose).values() if "gpu" in (s.get("profiles") or [])]
    assert len(gpu) == 1, "one GPU worker, under the gpu profile"
    worker = gpu[0]
    assert worker["command"] == ["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    env = environment(worker)
    assert env["BUCKETLENS_DEVICE"] == "cuda"
    assert Settings.from_env(interpolated(env)).half is True
    cpu = [s for s in bucketlens_services(compose).values() if s["command"] == ["worker"] and s not in gpu]
    assert cpu and all(not s.get("profiles") for s in cpu), "the CPU worker runs without a profile"


def test_minio_posts_events_to_ingest(compose: dict[str, Any]) -> None:
    minio = next(s for s in services(compose).values() if str(s.get("image", "")).startswith("minio/minio"))
    env = environment(minio)
    assert env["MINIO_NOTIFY_WEBHOOK_ENABLE_BUCKETLENS"] == "on"
    assert env["MINIO_NOTIFY_WEBHOOK_ENDPOINT_BUCKETLENS"] == "http://ingest:7401/events"
    assert "BUCKETLENS_WEBHOOK_TOKEN" in env["MINIO_NOTIFY_WEBHOOK_AUTH_TOKEN_BUCKETLENS"]
    assert env["MINIO_NOTIFY_WEBHOOK_QUEUE_DIR_BUCKETLENS"].startswith("/data/")
    ingest = next(s for s in bucketlens_services(compose).values() if s["command"] == ["ingest"])
    assert "BUCKETLENS_WEBHOOK_TOKEN" in environment(ingest)["BUCKETLENS_WEBHOOK_TOKEN"]
    init = next(s for s in services(compose).values() if str(s.get("image", "")).startswith("minio/mc"))
    script = " ".join(init["command"]) if isinstance(init["command"], list) else init["command"]
    assert "arn:minio:sqs::BUCKETLENS:webhook" in script and "--event put,delete" in script


def test_redis_is_durable(compose: dict[str, Any]) -> None:
    redis = next(s for s in services(compose).values() if str(s.get("image", "")).startswith("redis:"))
    command = redis["command"]
    assert command[:1] == ["redis-server"]
    assert "--appendonly" in command and command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--appendfsync") + 1] == "always"  # a power loss loses no acknowledged event
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert redis.get("volumes"), "AOF needs a volume to survive the container"


def test_index_service_keeps_its_state_on_a_volume(compose: dict[str, Any]) -> None:
    api = next(s for s in bucketlens_services(compose).values() if s["command"] == ["serve"])
    home = environment(api)["BUCKETLENS_HOME"]
    mounts = [str(v).split(":")[1] for v in api.get("volumes", []) if ":" in str(v)]
    assert home in mounts, f"BUCKETLENS_HOME={home} is not on a volume: snapshots would die with the container"


def test_milvus_profile(compose: dict[str, Any]) -> None:
    """Milvus standalone as Milvus ships it (etcd, object storage, the server), under the milvus profile, reached by
    the index service at the address its settings name; nothing of it is published."""
    profiled = {name: s for name, s in services(compose).items() if "milvus" in (s.get("profiles") or [])}
    images = {str(s["image"]).split(":")[0] for s in profiled.values()}
    assert {"quay.io/coreos/etcd", "minio/minio", "milvusdb/milvus"} <= images
    server = next(s for s in profiled.values() if str(s["image"]).startswith("milvusdb/milvus"))
    assert server["image"].endswith(":v2.3.5") and server["command"] == ["milvus", "run", "standalone"]
    env = environment(server)
    etcd, minio = env["ETCD_ENDPOINTS"].split(":")[0], env["MINIO_ADDRESS"].split(":")[0]
    assert {etcd, minio} <= set(profiled) and set(server["depends_on"]) == {etcd, minio}
    assert all(not s.get("ports") for s in profiled.values())
    name = next(n for n, s in profiled.items() if s is server)
    api = environment(next(s for s in bucketlens_services(compose).values() if s["command"] == ["serve"]))
    assert api["BUCKETLENS_MILVUS_URI"] == f"http://{name}:19530"
    assert "BUCKETLENS_INDEX_BACKEND" in api  # chosen at `up` time; the index service itself has no profile
