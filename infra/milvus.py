"""The Milvus standalone server from PyPI's ``milvus`` package (2.3.5), as one process bucketlens can supervise.

The package's own ``milvus-server`` command runs the server binary as a child of a Python wrapper, and a SIGTERM'd
wrapper once left the server behind (DESIGN.md, "Milvus"). Here the wrapper only writes the configuration and
unpacks the binary, then *becomes* the server (``exec``): the pid the supervisor or a test fixture holds is the
server's, and TERM then KILL reach it. The gRPC port is ours to choose; etcd, the coordinators and the metrics
port take the first free port from their defaults up. Only the embedded etcd binds 127.0.0.1: Milvus 2.3.5 listens
on all interfaces for its gRPC and internal ports and has no setting to change it (README, "Ports": firewall them).

``python -m infra.milvus --data DIR --port PORT`` runs it in the foreground. Start-up takes 30-40 s on these
machines; ``wait_ready`` polls the health endpoint. A start killed while it initialised can leave a data folder
that crashes the next start: callers use a fresh folder when a first start did not complete.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from .ports import lease
from .procfs import stop_process

HEALTH_FILE = "health-port"  # written into the data folder: where the server's /healthz answers


def prepare(data: Path, port: int) -> tuple[list[str], dict[str, str]]:
    """Write the configuration under ``data`` and unpack the binary; the command line and environment to run."""
    import milvus  # imported here: the CLI and the FAISS backend never need it

    class Config(milvus.MilvusServerConfig):  # type: ignore[misc]
        def try_bind_port(self, port: int) -> socket.socket | None:
            """As the package's, with SO_REUSEADDR (as the server itself binds): a restart right after a kill
            found its port in TIME_WAIT and refused to start for a minute."""
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
                sock.listen()
                return sock
            except OSError:
                sock.close()
                return None

    data = data.resolve()
    config = Config()
    config.update(data_dir=str(data), proxy_port=port)
    config.resolve()  # binds and releases every port it picks, writes configs/milvus.yaml
    milvus._initialize_data_files(str(data))  # the binary and its libraries, unpacked once (md5-checked)
    health, sock = config.resolve_port(9091)
    sock.close()
    (data / HEALTH_FILE).write_text(str(health))
    etcd = data / "configs" / "embedEtcd.yaml"
    etcd.write_text(_etcd_config(config, data))
    binary = data / "bin" / "milvus"
    env = dict(os.environ)
    env.update({
        "DEPLOY_MODE": "STANDALONE",
        "METRICS_PORT": str(health),
        "MILVUS_RUN_DIR": str(data / "run"),
        "ETCD_CONFIG_PATH": str(etcd),
        "LD_LIBRARY_PATH": f"{binary.parent}:{os.environ.get('LD_LIBRARY_PATH', '')}",
    })
    return [str(binary), "run", "standalone"], env


def _etcd_config(config: Any, data: Path) -> str:
    """The embedded etcd's ports: the package sets only the client port in ``milvus.yaml``, which the embedded etcd
    does not read, so it listened on 2379 and 2380 whatever was chosen, and a second Milvus on the machine (another
    stack, the test session's) crashed at start (review 29). The peer port is the first free one from 2380 up that
    no other Milvus starting meanwhile chose (``ports.lease``: review 30)."""
    client = int(config.configurable_items["etcd_port"][1])
    peer = 2380
    while True:
        if peer != client and (sock := config.try_bind_port(peer)) is not None:
            sock.close()
            if lease(peer, by=str(data)):
                break
        peer += 1
    return "\n".join([
        "name: default",
        f"listen-client-urls: http://127.0.0.1:{client}",
        f"advertise-client-urls: http://127.0.0.1:{client}",
        f"listen-peer-urls: http://127.0.0.1:{peer}",
        f"initial-advertise-peer-urls: http://127.0.0.1:{peer}",
        f"initial-cluster: default=http://127.0.0.1:{peer}",
        "",
    ])


def start(data: Path, port: int, log_path: Path | None = None) -> subprocess.Popen[bytes]:
    """Start the server in the background (its own process group); its output goes to ``log_path``."""
    argv, env = prepare(data, port)
    log_path = log_path or data / "logs" / "milvus.out"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        return subprocess.Popen(argv, env=env, cwd=data, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def healthy(data: Path) -> bool:
    """The server under ``data`` answers its health check."""
    try:
        health = int((data / HEALTH_FILE).read_text())
        with urllib.request.urlopen(f"http://127.0.0.1:{health}/healthz", timeout=2) as response:
            return b"OK" in response.read()
    except (OSError, ValueError, urllib.error.URLError):
        return False


def wait_ready(data: Path, process: subprocess.Popen[bytes] | None = None, timeout_s: float = 180.0,
               log_path: Path | None = None) -> None:
    """Wait until the server answers; raise with the log's tail if it exits or does not answer in time."""
    log_path = log_path or data / "logs" / "milvus.out"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if healthy(data):
            return
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"milvus exited with {process.returncode} while starting: {crash_line(log_path)}"
                               f"{log_tail(log_path)}")
        time.sleep(0.5)
    raise TimeoutError(f"milvus did not answer within {timeout_s:.0f} s: {log_tail(log_path)}")


GRACE_S = 10.0  # between TERM and KILL


def stop(process: subprocess.Popen[bytes], grace_s: float = GRACE_S) -> None:
    """TERM, then KILL after ``grace_s``. Milvus 2.3.5 standalone never ends a graceful stop: it stops its
    coordinators first, then its nodes retry them forever ("find no available rootcoord" in its log); the 60 s
    once waited made `bucketlens down` take ~71 s. Killing loses nothing of bucketlens's: the checkpoint is recorded
    only after a flush, and the merger replays the stream from it."""
    stop_process(process, grace_s)


def crash_line(path: Path) -> str:
    """The last line of a server's log that says why it died (Go's ``panic:`` or ``fatal error:``, Milvus's
    ``[FATAL]``), then "; ": a crash's tail is goroutine dumps that say nothing (a whole-suite run's only clue
    was "goroutine 189 [runnable]")."""
    if not path.exists():
        return ""
    with path.open("rb") as log:
        log.seek(max(0, log.seek(0, 2) - 1_000_000))
        lines = log.read().decode(errors="replace").splitlines()
    said = [line for line in lines if line.startswith(("panic:", "fatal error:")) or "[FATAL]" in line]
    return f"{said[-1][:500]}; " if said else ""


def log_tail(path: Path, lines: int = 15, since: int = 0) -> str:
    """The last ``lines`` of a server's log written after its byte ``since``, for an error message."""
    if not path.exists():
        return "(no log)"
    with path.open("rb") as log:
        log.seek(since)
        tail = log.read().decode(errors="replace").splitlines()[-lines:]
    return json.dumps(tail) if tail else "(nothing)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="data folder (created if missing)")
    parser.add_argument("--port", type=int, default=19530, help="gRPC port on 127.0.0.1")
    args = parser.parse_args()
    args.data.mkdir(parents=True, exist_ok=True)
    argv, env = prepare(args.data, args.port)
    os.chdir(args.data)
    os.execve(argv[0], argv, env)  # this process becomes the server: signals reach it directly


if __name__ == "__main__":
    main()
