"""Turn the steps' measurements into ``latest.json`` (flat headline numbers, ratios, targets, details)
and the table printed at the end of a run."""

from __future__ import annotations

from typing import Any

TARGETS = {
    "bucketlens_vs_limit": (">=", 0.85, "bucketlens throughput / in-process limit"),
    "bucketlens_vs_old_design": (">=", 3.0, "bucketlens throughput / old design"),
    "search_faiss_ivf_raw_c1_p50_ms": ("<", 2.0, "FAISS IVF search over HTTP p50, c=1 (raw vector)"),
    "search_faiss_ivf_http_overhead_p50_ms": ("<=", 1.0, "FAISS IVF: HTTP p50 - in-process p50, c=1 (raw)"),
    "search_faiss_ivf_raw_c8_p99_ms": ("<", 10.0, "FAISS IVF search over HTTP p99, c=8 (raw vector)"),
    "search_faiss_ivf_raw_c1_wrk_p50_ms": ("<", 2.0, "FAISS IVF search over HTTP p50, c=1 (raw), from wrk: a C client"),
    "search_faiss_ivf_raw_c8_wrk_p99_ms": ("<", 10.0, "FAISS IVF search over HTTP p99, c=8 (raw), from wrk"),
    "freshness_p50_s": ("<", 1.0, "upload -> searchable, p50"),
    "fair_backfill_vs_limit": (">=", 0.95, "fair: reembed (worker on its own core) / limit on that core"),
    "fair_live_vs_seed_as_written": (">=", 3.0, "fair: live uploads / the seed design as written, same cores"),
    "soak_worst_growth": ("<=", 0.10, "soak: most any process grew after the first 2,000 images"),
    "soak_last_vs_second_quarter": (">=", 0.90, "soak: last quarter's throughput / the second quarter's"),
}

ROWS = (  # (key, label, unit, format)
    ("images", "images (640x480 JPEG)", "", "{:.0f}"),
    ("cores", "cores", "", "{:.0f}"),
    ("limit_images_per_s", "limit: decode+embed in-process", "img/s", "{:.1f}"),
    ("bucketlens_images_per_s", "bucketlens end to end", "img/s", "{:.1f}"),
    ("old_design_images_per_s", "old design (base64 tasks, future.get)", "img/s", "{:.1f}"),
    ("bucketlens_vs_limit", "bucketlens / limit", "x", "{:.2f}"),
    ("bucketlens_vs_old_design", "bucketlens / old design", "x", "{:.2f}"),
    ("limit_cpu_ms_per_image", "CPU per image: limit", "ms", "{:.1f}"),
    ("bucketlens_cpu_ms_per_image", "CPU per image: bucketlens, all processes", "ms", "{:.1f}"),
    ("bucketlens_worker_cpu_ms_per_image", "CPU per image: bucketlens worker", "ms", "{:.1f}"),
    ("old_design_cpu_ms_per_image", "CPU per image: old design, all processes", "ms", "{:.1f}"),
    ("bucketlens_vs_limit_cpu", "limit CPU / bucketlens CPU (all processes)", "x", "{:.2f}"),
    ("worker_vs_limit_cpu", "limit CPU / bucketlens worker CPU", "x", "{:.2f}"),
    ("freshness_p50_s", "freshness p50 (upload -> searchable)", "s", "{:.3f}"),
    ("freshness_p95_s", "freshness p95", "s", "{:.3f}"),
    *((f"search_{tag}_{key}", f"{name}: {label}", unit, fmt)
      for tag, name in (("faiss_flat", "FAISS Flat"), ("faiss_ivf", "FAISS IVF"), ("milvus_hnsw", "Milvus HNSW"))
      for key, label, unit, fmt in (
          ("merge_per_s", "merged while filling", "vec/s", "{:.0f}"),
          ("json_c1_p50_ms", "search p50, c=1, JSON vector", "ms", "{:.2f}"),
          ("raw_c1_p50_ms", "search p50, c=1, raw vector", "ms", "{:.2f}"),
          ("inprocess_c1_p50_ms", "in-process p50, c=1", "ms", "{:.2f}"),
          ("http_overhead_p50_ms", "HTTP p50 - in-process p50 (raw)", "ms", "{:.2f}"),
          ("raw_c8_p50_ms", "search p50, c=8, raw vector", "ms", "{:.2f}"),
          ("raw_c8_p99_ms", "search p99, c=8, raw vector", "ms", "{:.2f}"),
          ("raw_c1_wrk_p50_ms", "wrk client: search p50, c=1, raw", "ms", "{:.2f}"),
          ("raw_c8_wrk_p50_ms", "wrk client: search p50, c=8, raw", "ms", "{:.2f}"),
          ("raw_c8_wrk_p99_ms", "wrk client: search p99, c=8, raw", "ms", "{:.2f}"),
          ("recall_at_10", "recall@10 (all / real below)", "", "{:.3f}"),
          ("recall_at_10_real", "recall@10, real queries", "", "{:.3f}"),
          ("service_rss_mb", "index service RSS", "MiB", "{:.0f}"),
      )),
    ("fair_limit_images_per_s", "fair: limit on the worker's core alone", "img/s", "{:.1f}"),
    ("fair_live_images_per_s", "fair: live uploads end to end", "img/s", "{:.1f}"),
    ("fair_backfill_images_per_s", "fair: backfill (reembed, POST /rebuild)", "img/s", "{:.1f}"),
    ("fair_seed_as_written_images_per_s", "fair: seed as written (eager torch, solo)", "img/s", "{:.1f}"),
    ("fair_seed_kind_images_per_s", "fair: seed, kinder re-creation", "img/s", "{:.1f}"),
    ("fair_limit_others_busy_vs_idle", "fair: limit, other core spinning / idle", "x", "{:.2f}"),
    ("fair_live_vs_limit", "fair: live / limit", "x", "{:.2f}"),
    ("fair_backfill_vs_limit", "fair: backfill / limit", "x", "{:.2f}"),
    ("fair_limit_after_vs_before", "fair: limit after the backfill / before", "x", "{:.2f}"),
    ("fair_backfill_vs_limit_before_and_after", "fair: backfill / mean of the limits before and after", "x",
     "{:.2f}"),
    ("fair_backfill_vs_limit_others_busy", "fair: backfill / limit with the other core spinning", "x", "{:.2f}"),
    ("fair_live_vs_seed_as_written", "fair: live / seed as written", "x", "{:.2f}"),
    ("fair_live_vs_seed_kind", "fair: live / seed, kinder", "x", "{:.2f}"),
    ("fair_backfill_duplicate_finder_core_share", "fair: backfill: duplicate finder's share of a core", "",
     "{:.0%}"),
    *((f"fair_{run}_{key}", f"fair: {run.replace('_', ' ')}: {label}", unit, fmt)
      for run in ("limit", "live", "backfill", "seed_as_written", "seed_kind")
      for key, label, unit, fmt in (("cpu_ms_per_image", "CPU per image", "ms", "{:.1f}"),
                                    ("worker_core_busy", "worker core busy", "", "{:.0%}"),
                                    ("other_cores_busy", "other cores busy", "", "{:.0%}"))),
    ("search_image_p50_ms", "search by image p50 (FAISS, type it picks)", "ms", "{:.2f}"),
    ("worker_peak_rss_mb", "worker peak RSS", "MiB", "{:.0f}"),
    ("old_design_worker_peak_rss_mb", "old design worker peak RSS", "MiB", "{:.0f}"),
    ("redis_rss_mb", "Redis RSS (stream of all vectors)", "MiB", "{:.0f}"),
    ("milvus_rss_mb", "Milvus server RSS", "MiB", "{:.0f}"),
    ("others_cpu_share", "CPU used by others during bulk run", "", "{:.0%}"),
    ("burst_objects", "burst: uploads with the workers stopped", "", "{:.0f}"),
    ("burst_refused_near_full", "burst: events refused (503 near maxmemory)", "", "{:.0f}"),
    ("burst_redis_bytes_per_queued_object", "burst: Redis bytes per queued object", "B", "{:.0f}"),
    ("burst_seconds_workers_start_to_all_indexed", "burst: workers started -> all indexed", "s", "{:.0f}"),
    ("burst_embedded_more_than_once", "burst: extra embeddings", "", "{:.0f}"),
    ("load_searches_per_s", "load: searches/s (concurrent, uploads merging)", "/s", "{:.1f}"),
    ("load_p50_ms", "load: search p50", "ms", "{:.1f}"),
    ("load_p99_ms", "load: search p99", "ms", "{:.1f}"),
    ("soak_images", "soak: distinct images uploaded", "", "{:.0f}"),
    ("soak_images_per_s", "soak: throughput", "img/s", "{:.1f}"),
    ("soak_last_vs_second_quarter", "soak: last / second quarter's throughput", "x", "{:.2f}"),
    ("soak_worst_growth", "soak: largest RSS growth after 2,000 images", "", "{:.1%}"),
    ("load_error_count", "load: searches not answered 200", "", "{:.0f}"),
)


def headline(results: dict[str, Any]) -> dict[str, Any]:
    """The flat numbers ``latest.json`` promises, from the steps' detailed results."""
    out: dict[str, Any] = {}
    limit = results.get("limit", {})
    if limit:
        out["limit_images_per_s"] = limit["limit_images_per_s"]
        out["limit_cpu_ms_per_image"] = limit["limit_cpu"][limit["limit_variant"]]["cpu_ms_per_image"]
    e2e = results.get("e2e", {})
    for key in ("bucketlens_images_per_s", "bucketlens_cpu_ms_per_image", "freshness_p50_s", "freshness_p95_s",
                "worker_peak_rss_mb"):
        if key in e2e:
            out[key] = e2e[key]
    if "bucketlens_others_cpu_share" in e2e:
        out["others_cpu_share"] = e2e["bucketlens_others_cpu_share"]
        out["bucketlens_worker_cpu_ms_per_image"] = e2e["bucketlens_stack_cpu_ms_per_image"]["worker"]
    old = results.get("old_design", {})
    for key in ("old_design_images_per_s", "old_design_worker_peak_rss_mb", "old_design_cpu_ms_per_image"):
        if key in old:
            out[key] = old[key]
    for name, q in results.get("queries", {}).items():
        if not isinstance(q, dict):
            continue
        tag = f"search_{name.lower().replace(' ', '_')}"
        out[f"{tag}_merge_per_s"] = q["merge_per_s"]
        for form in ("json", "raw", "inprocess"):
            for c in (1, 8):
                out[f"{tag}_{form}_c{c}_p50_ms"] = q[f"{form}_c{c}"]["p50_ms"]
                out[f"{tag}_{form}_c{c}_p99_ms"] = q[f"{form}_c{c}"]["p99_ms"]
        for c in (1, 8):
            if "skipped" not in (wrk := q.get(f"raw_c{c}_wrk", {"skipped": "not run"})):  # (no wrk, or errors)
                out[f"{tag}_raw_c{c}_wrk_p50_ms"], out[f"{tag}_raw_c{c}_wrk_p99_ms"] = wrk["p50_ms"], wrk["p99_ms"]
        out[f"{tag}_http_overhead_p50_ms"] = q["raw_c1"]["p50_ms"] - q["inprocess_c1"]["p50_ms"]
        out[f"{tag}_recall_at_10"] = q["recall_at_10"]
        out[f"{tag}_recall_at_10_real"] = q["recall_at_10_real"]
        out[f"{tag}_service_rss_mb"] = q["processes"]["index service"]["rss_mb"]
        out["redis_rss_mb"] = max(out.get("redis_rss_mb", 0), q["processes"].get("redis", {}).get("rss_mb", 0))
        if "milvus" in q["processes"]:
            out["milvus_rss_mb"] = q["processes"]["milvus"]["rss_mb"]
        if name == "faiss IVF":
            out["search_image_p50_ms"] = q["image_c1"]["p50_ms"]
            out["search_image_p99_ms"] = q["image_c1"]["p99_ms"]
    out.update(fair_headline(results.get("fair", {})))
    for step in ("burst", "load", "soak"):
        for key, value in results.get(step, {}).items():
            if isinstance(value, (int, float)):
                out[f"{step}_{key}"] = value
    if "load" in results:
        out["load_error_count"] = sum(results["load"]["errors"].values())
    if "limit_images_per_s" in out and "bucketlens_images_per_s" in out:
        out["bucketlens_vs_limit"] = out["bucketlens_images_per_s"] / out["limit_images_per_s"]
    if "limit_cpu_ms_per_image" in out and "bucketlens_cpu_ms_per_image" in out:
        out["bucketlens_vs_limit_cpu"] = out["limit_cpu_ms_per_image"] / out["bucketlens_cpu_ms_per_image"]
        out["worker_vs_limit_cpu"] = out["limit_cpu_ms_per_image"] / out["bucketlens_worker_cpu_ms_per_image"]
    if "old_design_images_per_s" in out and "bucketlens_images_per_s" in out:
        out["bucketlens_vs_old_design"] = out["bucketlens_images_per_s"] / out["old_design_images_per_s"]
    return out


def fair_headline(fair: dict[str, Any]) -> dict[str, Any]:
    """The fair step's rates, ratios, CPU per image and the busy share of the worker's core and the others."""
    if "ratios" not in fair:
        return {}
    out: dict[str, Any] = {f"fair_{name}": value for name, value in fair["ratios"].items()}
    limit = fair["limit_cpu"][fair["limit_variant"]]
    runs = {"limit": (fair["limit_images_per_s"], limit),
            "live": (fair["live"]["bucketlens_images_per_s"], fair["live"]),
            "backfill": (fair["backfill"]["images_per_s"], fair["backfill"]),
            **{run: (fair[run]["old_design_images_per_s"], fair[run]) for run in ("seed_as_written", "seed_kind")}}
    for run, (rate, report) in runs.items():
        cpu = {key.removeprefix("bucketlens_").removeprefix("old_design_"): v for key, v in report.items()}
        busy = cpu["core_busy_share"]
        out[f"fair_{run}_images_per_s"] = rate
        out[f"fair_{run}_cpu_ms_per_image"] = cpu["cpu_ms_per_image"]
        out[f"fair_{run}_worker_core_busy"] = sum(busy[str(c)] for c in fair["worker_core"])
        out[f"fair_{run}_other_cores_busy"] = sum(busy[str(c)] for c in fair["other_cores"]) / len(fair["other_cores"])
    if "duplicate_finder_core_share" in fair["backfill"]:
        out["fair_backfill_duplicate_finder_core_share"] = fair["backfill"]["duplicate_finder_core_share"]
    return out


def check_targets(flat: dict[str, Any]) -> dict[str, Any]:
    targets = {}
    for key, (op, bound, label) in TARGETS.items():
        value = flat.get(key)
        met = None if value is None else (value >= bound if op == ">=" else value <= bound if op == "<="
                                          else value < bound)
        targets[key] = {"target": f"{op} {bound:g}", "value": value, "met": met, "what": label}
    return targets


def table(flat: dict[str, Any], targets: dict[str, Any]) -> str:
    lines = [f"{'':44} {'value':>12}  {'':6}target", "-" * 78]
    for key, label, unit, fmt in ROWS:
        if key not in flat:
            continue
        mark = ""
        if key in targets and targets[key]["met"] is not None:
            mark = f"{targets[key]['target']}  {'met' if targets[key]['met'] else 'MISSED'}"
        lines.append(f"{label:44} {fmt.format(flat[key]):>12}  {unit:6}{mark}")
    return "\n".join(lines)
