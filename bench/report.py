"""Turn the steps' measurements into ``latest.json`` (flat headline numbers, ratios, targets, details)
and the table printed at the end of a run."""

from __future__ import annotations

from typing import Any

TARGETS = {
    "bucketlens_vs_limit": (">=", 0.85, "bucketlens throughput / in-process limit"),
    "bucketlens_vs_old_design": (">=", 3.0, "bucketlens throughput / old design"),
    "search_http_overhead_p50_ms_100k": ("<=", 2.0, "HTTP search p50 - in-process p50 (100k)"),
    "freshness_p50_s": ("<", 1.0, "upload -> searchable, p50"),
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
    ("search_vector_p50_ms_10k", "search by vector p50, 10k, c=1", "ms", "{:.2f}"),
    ("inprocess_search_p50_ms_10k", "in-process FAISS p50, 10k", "ms", "{:.2f}"),
    ("search_vector_p50_ms_100k", "search by vector p50, 100k, c=1", "ms", "{:.2f}"),
    ("search_vector_p99_ms_100k", "search by vector p99, 100k, c=1", "ms", "{:.2f}"),
    ("search_vector_c8_p50_ms_100k", "search by vector p50, 100k, c=8", "ms", "{:.2f}"),
    ("search_vector_c8_p99_ms_100k", "search by vector p99, 100k, c=8", "ms", "{:.2f}"),
    ("inprocess_search_p50_ms_100k", "in-process FAISS p50, 100k, c=1", "ms", "{:.2f}"),
    ("inprocess_search_c8_p50_ms_100k", "in-process FAISS p50, 100k, c=8", "ms", "{:.2f}"),
    ("search_http_overhead_p50_ms_100k", "HTTP overhead p50, 100k", "ms", "{:.2f}"),
    ("search_image_p50_ms", "search by image p50 (largest index)", "ms", "{:.2f}"),
    ("worker_peak_rss_mb", "worker peak RSS", "MiB", "{:.0f}"),
    ("old_design_worker_peak_rss_mb", "old design worker peak RSS", "MiB", "{:.0f}"),
    ("index_peak_rss_mb", "index service peak RSS (largest index)", "MiB", "{:.0f}"),
    ("others_cpu_share", "CPU used by others during bulk run", "", "{:.0%}"),
    ("burst_objects", "burst: uploads with the workers stopped", "", "{:.0f}"),
    ("burst_refused_near_full", "burst: events refused (503 near maxmemory)", "", "{:.0f}"),
    ("burst_redis_bytes_per_queued_object", "burst: Redis bytes per queued object", "B", "{:.0f}"),
    ("burst_seconds_workers_start_to_all_indexed", "burst: workers started -> all indexed", "s", "{:.0f}"),
    ("burst_embedded_more_than_once", "burst: extra embeddings", "", "{:.0f}"),
    ("load_searches_per_s", "load: searches/s (concurrent, uploads merging)", "/s", "{:.1f}"),
    ("load_p50_ms", "load: search p50", "ms", "{:.1f}"),
    ("load_p99_ms", "load: search p99", "ms", "{:.1f}"),
    ("load_error_count", "load: searches not answered 200", "", "{:.0f}"),
)


def short(size: int) -> str:
    return f"{size // 1000}k" if size % 1000 == 0 else str(size)


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
    queries = results.get("queries", {})
    sizes = sorted(int(k) for k in queries if k.isdigit())
    for size in sizes:
        q, tag = queries[str(size)], short(size)
        out[f"search_vector_p50_ms_{tag}"] = q["vector_c1"]["p50_ms"]
        out[f"search_vector_p99_ms_{tag}"] = q["vector_c1"]["p99_ms"]
        out[f"search_vector_c8_p50_ms_{tag}"] = q["vector_c8"]["p50_ms"]
        out[f"search_vector_c8_p99_ms_{tag}"] = q["vector_c8"]["p99_ms"]
        out[f"inprocess_search_p50_ms_{tag}"] = q["inprocess_c1"]["p50_ms"]
        out[f"inprocess_search_p99_ms_{tag}"] = q["inprocess_c1"]["p99_ms"]
        out[f"inprocess_search_c8_p50_ms_{tag}"] = q["inprocess_c8"]["p50_ms"]
        out[f"search_http_overhead_p50_ms_{tag}"] = q["vector_c1"]["p50_ms"] - q["inprocess_c1"]["p50_ms"]
    if sizes:
        largest = queries[str(sizes[-1])]
        out["search_image_p50_ms"] = largest["image_c1"]["p50_ms"]
        out["search_image_p99_ms"] = largest["image_c1"]["p99_ms"]
        out["index_peak_rss_mb"] = queries["index_peak_rss_mb"]
    for step in ("burst", "load"):
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
