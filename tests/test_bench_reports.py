"""The bench's own arithmetic: the soak's growth per process, the fair step's headline figures, the
real-grown vectors and exact search the index benches measure recall with, the GPU script's steps on the CPU, and
the search step's C client."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import faiss
import numpy as np
import pytest
from PIL import Image, ImageCms

from bench.__main__ import STEPS, parse_args
from bench.colour_profiles import display_p3_profile
from bench.index_scale import exact
from bench.procs import ALL_CORES, core_busy_seconds, pin
from bench.queries import QueryService, wrk_search
from bench.real_vectors import Grown, grow
from bench.report import check_targets, fair_headline
from bench.soak import growth
from bucketlens.settings import Settings


def sample(t: float, merged: int, **rss: float) -> dict[str, object]:
    return {"t": t, "merged": merged, "rss_mb": rss}


def test_growth_is_measured_from_the_settled_point_and_the_index_service_net_of_what_it_holds() -> None:
    samples = [sample(0, 100, worker=500, api=300), sample(1, 2000, worker=600, api=400),
               sample(2, 3000, worker=630, api=520), sample(3, 4000, worker=610, api=500)]
    rows = growth(samples, settled=2000, vector_bytes=2**20 // 10)  # 0.1 MiB a vector: 200 MiB for 2,000 more
    assert rows["worker"] == {"rss_at_settled_mb": 600, "peak_after_mb": 630, "final_mb": 610, "growth": 0.05}
    assert rows["api"]["growth"] == 0.3 and rows["api"]["held_vectors_mb"] == 200.0
    assert rows["api"]["growth_beyond_held"] == round((520 - 200) / 400 - 1, 3)


def test_fair_headline_ratios_busy_shares_and_targets() -> None:
    report = {"core_busy_share": {"0": 1.0, "1": 0.9}, "cpu_ms_per_image": 100.0}
    fair = {
        "worker_core": [1], "other_cores": [0], "limit_images_per_s": 10.0, "limit_variant": "serial",
        "limit_cpu": {"serial": {"core_busy_share": {"0": 0.1, "1": 1.0}, "cpu_ms_per_image": 90.0}},
        "live": {"bucketlens_images_per_s": 8.0, **{f"bucketlens_{k}": v for k, v in report.items()}},
        "backfill": {"images_per_s": 9.6, "duplicate_finder_core_share": 0.25, **report},
        "seed_as_written": {"old_design_images_per_s": 2.0, **{f"old_design_{k}": v for k, v in report.items()}},
        "seed_kind": {"old_design_images_per_s": 4.0, **{f"old_design_{k}": v for k, v in report.items()}},
        "ratios": {"backfill_vs_limit": 0.96, "live_vs_seed_as_written": 4.0},
    }
    flat = fair_headline(fair)
    assert flat["fair_limit_worker_core_busy"] == 1.0 and flat["fair_limit_other_cores_busy"] == 0.1
    assert flat["fair_backfill_images_per_s"] == 9.6 and flat["fair_seed_kind_cpu_ms_per_image"] == 100.0
    assert flat["fair_backfill_duplicate_finder_core_share"] == 0.25
    targets = check_targets(flat)
    assert targets["fair_backfill_vs_limit"]["met"] is True and targets["fair_live_vs_seed_as_written"]["met"]
    assert fair_headline({"skipped": "needs 2 cores"}) == {}


@pytest.mark.skipif(len(ALL_CORES) < 2, reason="needs 2 cores")
def test_pin_confines_every_thread_and_the_cores_are_read_per_core() -> None:
    me = [os.getpid()]
    first = min(ALL_CORES)
    try:
        pin(me, {first})
        assert os.sched_getaffinity(0) == {first}
    finally:
        pin(me, set(ALL_CORES))
    assert os.sched_getaffinity(0) == ALL_CORES
    assert set(core_busy_seconds()) == ALL_CORES


def test_a_partial_run_writes_a_report_of_its_own_and_the_default_run_latest_json() -> None:
    assert parse_args([]).out.name == "latest.json"
    assert parse_args(["--only", ",".join((*STEPS, "soak"))]).out.name == "latest.json"
    assert parse_args(["--only", "fair"]).out.name == "latest-fair.json"
    assert parse_args(["--only", "queries,limit"]).out.name == "latest-limit-queries.json"
    assert parse_args(["--only", "fair", "--out", "/tmp/x.json"]).out.name == "x.json"


def test_grown_vectors_read_the_same_however_they_are_read_and_exact_search_merges_its_parts() -> None:
    rng = np.random.default_rng(0)
    real = rng.standard_normal((30, 16)).astype(np.float32)
    real /= np.linalg.norm(real, axis=1, keepdims=True)
    grown = Grown(real, 250, seed=3)
    grown.BLOCK = 40  # many blocks on a small set
    whole = grown[:250]
    np.testing.assert_array_equal(whole[:30], real)  # the real rows first
    cosine_to_parent = (whole[30:] @ real.T).max(axis=1)
    assert np.all(cosine_to_parent >= 0.85 - 1e-5) and np.all(np.linalg.norm(whole, axis=1) > 0.999)
    rows = np.array([249, 0, 41, 40, 39, 120])
    np.testing.assert_array_equal(grown[rows], whole[rows])  # any order, across blocks
    np.testing.assert_array_equal(Grown(real, 250, seed=3)[:250], grow(real, 250, seed=3))
    assert not np.array_equal(Grown(real, 250, seed=4)[:250], whole)
    queries = rng.standard_normal((5, 16)).astype(np.float32)
    _, want = faiss.knn(queries, whole, 10, metric=faiss.METRIC_INNER_PRODUCT)
    assert exact(grown, 250, queries, rows=7) == [{f"k{i}" for i in row} for row in want]


def test_the_gpu_script_runs_its_seed_and_worker_steps_on_the_cpu(tmp_path: Path) -> None:
    """`bench.gpu` runs on lent machines, where a mistake costs device time: its steps that compare bucketlens with
    the seed run here, on the CPU, and report a rate for each and the ratio between them."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(images / f"{i}.jpg")
    out = tmp_path / "gpu.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--device", "cpu", "--steps", "own,seed", "--own", "1", "--seed-kind", "1",
         "--per-worker", "2", "--seed-images", "2", "--workers", "1", "--images", str(images), "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["activation"] == "relu6" and report["machine"]["cpu_cores"] >= 1
    assert report["own_models"][0]["images"] == 2 and report["own_models"][0]["images_per_s"] > 0
    assert report["seed"]["images"] == 2 and report["seed"]["images_per_s"] > 0
    assert report["seed_kind"][0]["processes"] == 1 and report["seed_kind"][0]["images_per_s"] > 0
    assert "own models, 1 processes / the seed: " in result.stdout


def test_the_search_steps_service_takes_settings_the_service_accepts(tmp_path: Path) -> None:
    """Its "snapshots off" was 1e9 s, which the settings' bounds (a year at most) refused since they came in: the
    search step of ``make bench`` stopped with a ValueError before it measured anything."""
    service = QueryService(Settings(home=tmp_path))
    assert service.settings.snapshot_every_s >= 86400 and service.url.startswith("http://127.0.0.1:")


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (make install adds it)")
def test_wrk_posts_each_raw_vector_in_turn_and_reports_its_latencies() -> None:
    """``bench/search.lua`` under the real ``wrk``: every request is a POST of one whole body, taken in turn, and
    the step reads the percentiles wrk printed."""
    bodies = [np.full(1280, i, dtype="<f4").tobytes() for i in range(3)]
    seen: list[tuple[str, str, bytes]] = []

    class Search(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as uvicorn answers

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            seen.append((self.path, self.headers["Content-Type"], body))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Search)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = wrk_search(f"http://127.0.0.1:{server.server_address[1]}", bodies, 2, seconds=1)
    finally:
        server.shutdown()
        server.server_close()
    assert out["requests"] >= 3 and out["requests"] <= len(seen) + 2, out  # (wrk stops with up to c unanswered)
    assert 0 < out["p50_ms"] <= out["p99_ms"] <= out["max_ms"], out
    assert {(path, kind) for path, kind, _ in seen} == {("/search", "application/octet-stream")}
    assert {body for _, _, body in seen} == set(bodies)
    counts = [sum(body == sent for _, _, body in seen) for sent in bodies]
    assert max(counts) - min(counts) <= 2, counts  # in turn: no body is sent twice before the others once


def test_the_display_p3_profile_is_one_littlecms_reads_and_it_is_wider_than_srgb() -> None:
    p3 = ImageCms.ImageCmsProfile(io.BytesIO(display_p3_profile()))
    red = ImageCms.profileToProfile(Image.new("RGB", (1, 1), (255, 0, 0)), ImageCms.createProfile("sRGB"), p3)
    r, g, b = red.getpixel((0, 0))  # sRGB's red is inside P3's gamut: (234, 51, 35) in Display P3
    assert 225 <= r <= 242 and 40 <= g <= 62 and 25 <= b <= 45, (r, g, b)
