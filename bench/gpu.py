"""``python -m bench.gpu``: the model and the worker's per-image work on a CUDA GPU, measured in-process.

No S3, Redis or Celery. Four figures, written to one JSON file (``--out``):

- ``network``: images per second of the recipe's network alone, input already on the GPU (the worker's
  ``TorchEmbedder.net`` on the tensor ``embed`` gives it), by batch size, in float32 and float16, for three layouts:
  ``shipped`` (weights as built), ``channels_last`` (weights converted) and ``channels_last+benchmark``
  (``torch.backends.cudnn.benchmark`` on, which lets cuDNN time its algorithms for each new shape).
- ``embedder``: images per second of ``TorchEmbedder.embed`` itself, what a worker calls: uint8 pixels in host
  memory in, centred and normalised vectors out (the copy to the GPU and the finish included).
- ``agreement``: cosine of each variant's vectors with eager torch float32 on the CPU, on real photos.
- ``limit``: the pipeline's in-process limit on this machine. Decode and local features (the CPU's part of what a
  worker does to an image, ``bench.limit``'s functions) run in N processes; this process embeds each batch on the GPU
  as it arrives. Beside it the same processes without the GPU (what the CPU alone allows), and
  ``bench.limit.measure_limit``'s one-process variants (``serial`` is a CUDA worker as configured: one process).
- ``own``: N worker processes, each with its own model on the GPU, decoding, extracting local features and embedding
  batch after batch: what ``bucketlens worker`` runs on CUDA (one process per core), less S3 and Redis.
- ``seed``: the design bucketlens replaced (``bench.old_design``) as the seed wrote it, on this GPU: one worker
  process (``--pool=solo``), eager torch, one image per task (base64 in, decode, the model on a batch of one, local
  features, the vector as a JSON list out). Without Celery and Redis, which only slow it: an upper bound on its rate,
  so ``own`` over it is a lower bound on bucketlens against the seed. With ``--seed-kind``, also its kinder
  re-creation: ``own``'s N processes, each task one image.

``--relu6`` measures a swish model's network (``--model lite0-copy-v2``) with the ReLU6 activations its Lite weights
were trained with, as ``lite0-copy-v3`` (the default) builds it (``measure_limit``'s own embedders keep the network as
built: skip them with ``--threads-images 0``).

Timing: warm-up first, then ``--repeats`` timed runs of enough batches for ~0.2 s each, synchronised with the GPU
before the clock is read; the median counts. The input batches rotate among real decoded images.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import logging
import multiprocessing
import platform
import statistics
import subprocess
import sys
import time
from multiprocessing.pool import Pool
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from bucketlens.settings import Settings
from vision.decode import decode_for
from vision.embedders import load_embedder
from vision.embedders.torch_runtime import TorchEmbedder
from vision.models import DEFAULT_MODEL, Recipe, recipe

from . import CACHE, RESULTS
from .limit import decode_batch, describe, local_bytes, measure_limit
from .procs import CpuMeter, cores

log = logging.getLogger(__name__)
LAYOUTS = ("shipped", "channels_last", "channels_last+benchmark")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, help="folder of JPEGs to decode (default: 256 of the bench's set)")
    parser.add_argument("--photos", type=Path, help="folder of real photos for the agreement (default: --images)")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--device", default="cuda", help="cuda; cpu only for a dry run of this script")
    parser.add_argument("--batches", default="1,8,32,64,128,256", help="batch sizes of the network and embedder")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help=f"of {', '.join(LAYOUTS)}")
    parser.add_argument("--relu6", action="store_true", help="the network with ReLU6, not Swish (see above)")
    parser.add_argument("--workers", default="1,2,4,8,15", help="decode processes of the limit")
    parser.add_argument("--steps", default="models,limit", help="of models, limit, own, seed (see above)")
    parser.add_argument("--own", default="1,4,8,15", help="processes of the 'own' step")
    parser.add_argument("--seed-images", type=int, default=256, help="images of the 'seed' step")
    parser.add_argument("--seed-kind", default="", help="processes of the seed's kinder re-creation (the 'seed' step): "
                        "N worker processes, one image per task, as the 'own' step runs them (e.g. 8,15)")
    parser.add_argument("--per-worker", type=int, default=256, help="images per decode process in the limit")
    parser.add_argument("--threads-images", type=int, default=512, help="images of measure_limit's variants (0: skip)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=0.2, help="length of one timed run")
    parser.add_argument("--commit", default="", help="the source's commit, recorded in the result")
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu-latest.json")
    return parser.parse_args(argv)


def machine(device: str) -> dict[str, Any]:
    found: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(), "cpu_cores": cores(),
                             "cpu": _cpu_model()}
    if device == "cuda":
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                              "--format=csv,noheader"], capture_output=True, text=True)
        found.update(gpu=torch.cuda.get_device_name(0), nvidia_smi=smi.stdout.strip(), cuda=torch.version.cuda,
                     cudnn=torch.backends.cudnn.version(), cudnn_allow_tf32=torch.backends.cudnn.allow_tf32)
    return found


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def rate(step: Any, batches: Sequence[Any], size: int, device: str, repeats: int, seconds: float) -> float:
    """Images per second of ``step`` over ``batches`` (rotated; each ``size`` images): median of ``repeats`` runs
    of ~``seconds`` each, after a warm-up."""
    for batch in batches:
        step(batch)
    sync(device)
    started = time.perf_counter()
    step(batches[0])
    sync(device)
    calls = max(2, round(seconds / max(time.perf_counter() - started, 1e-6)))
    rates = []
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        for i in range(calls):
            step(batches[i % len(batches)])
        sync(device)
        rates.append(calls * size / (time.perf_counter() - started))
    return statistics.median(rates)


def torch_embedder(settings: Settings, relu6: bool) -> TorchEmbedder:
    embedder = load_embedder(settings)
    assert isinstance(embedder, TorchEmbedder), type(embedder)
    if relu6:
        net = embedder.net.net
        for module in (net, *net._blocks):
            module._swish = torch.nn.ReLU6()
    return embedder


def set_layout(embedder: TorchEmbedder, layout: str) -> None:
    torch.backends.cudnn.benchmark = layout.endswith("+benchmark")
    memory = torch.channels_last if layout.startswith("channels_last") else torch.contiguous_format
    embedder.net.to(memory_format=memory)  # type: ignore[call-overload]  # in torch, not in its stubs


def device_input(embedder: TorchEmbedder, pixels: np.ndarray) -> torch.Tensor:
    """The tensor ``TorchEmbedder.embed`` hands its network (an NHWC batch seen as NCHW), already on the device."""
    return torch.from_numpy(pixels).to(embedder.device).permute(0, 3, 1, 2).to(embedder.dtype)


def tile(pixels: np.ndarray, size: int, count: int) -> list[np.ndarray]:
    """``count`` batches of ``size`` images taken in turn from ``pixels``."""
    order = np.arange(size * count) % len(pixels)
    return [np.ascontiguousarray(pixels[order[i * size : (i + 1) * size]]) for i in range(count)]


def models(args: argparse.Namespace, pixels: np.ndarray, photos: np.ndarray) -> dict[str, list[dict[str, Any]]]:
    """The ``network``, ``embedder`` and ``agreement`` figures."""
    reference = torch_embedder(Settings(model=args.model, device="cpu", runtime="torch", torch_threads=cores()),
                               args.relu6)
    expected = reference.embed(photos)
    out: dict[str, list[dict[str, Any]]] = {"network": [], "embedder": [], "agreement": []}
    sizes = [int(size) for size in args.batches.split(",")]
    for half in (False, True):
        settings = Settings(model=args.model, device=args.device, runtime="torch", half=half)
        embedder = torch_embedder(settings, args.relu6)
        dtype = str(embedder.dtype).removeprefix("torch.")
        for layout in args.layouts.split(","):
            set_layout(embedder, layout)
            out["agreement"].append({"dtype": dtype, "layout": layout, **agreement(embedder.embed(photos), expected)})
            for size in sizes:
                host = tile(pixels, size, 3)
                on_device = [device_input(embedder, batch) for batch in host]
                with torch.inference_mode():
                    network = rate(embedder.net, on_device, size, args.device, args.repeats, args.seconds)
                whole = rate(embedder.embed, host, size, args.device, args.repeats, args.seconds)
                row = {"dtype": dtype, "layout": layout, "batch": size}
                out["network"].append({**row, "images_per_s": round(network, 1)})
                out["embedder"].append({**row, "images_per_s": round(whole, 1)})
                log.warning("%s %s batch %d: network %.0f img/s, embed %.0f img/s", dtype, layout, size, network, whole)
        if not half and args.device == "cuda":  # what float32 gives without TF32 convolutions (cuDNN's default)
            set_layout(embedder, "shipped")
            torch.backends.cudnn.allow_tf32 = False
            out["agreement"].append({"dtype": dtype, "layout": "shipped, tf32 off",
                                     **agreement(embedder.embed(photos), expected)})
            torch.backends.cudnn.allow_tf32 = True
        del embedder
    torch.backends.cudnn.benchmark = False
    return out


def agreement(vectors: np.ndarray, expected: np.ndarray) -> dict[str, Any]:
    cosine = np.sum(vectors.astype(np.float64) * expected, axis=1)  # both L2-normalised
    return {"images": len(cosine), "min_cosine": round(float(cosine.min()), 6),
            "mean_cosine": round(float(cosine.mean()), 6)}


def prepare(task: tuple[Recipe, Sequence[bytes], int]) -> tuple[np.ndarray, int]:
    """In a decode process: one batch decoded and its local features extracted, as a worker does before the
    model; returns the model's input and the features' bytes."""
    recipe_, blobs, max_pixels = task
    images = decode_batch(recipe_, blobs, max_pixels)
    return np.stack([image.pixels for image in images]), local_bytes(recipe_, images)


def feed(pool: Pool, recipe_: Recipe, embedder: TorchEmbedder | None, blobs: Sequence[bytes],
         settings: Settings) -> dict[str, Any]:
    """Images per second of ``pool`` decoding ``blobs`` in tasks of ``settings.batch_size`` while this process
    embeds each batch as it arrives (or, without an embedder, throws it away)."""
    size = settings.batch_size
    tasks = [(recipe_, blobs[i : i + size], settings.max_pixels) for i in range(0, len(blobs), size)]
    meter = CpuMeter()
    embedding = 0.0
    for pixels, _ in pool.imap_unordered(prepare, tasks):
        if embedder is not None:
            started = time.perf_counter()
            embedder.embed(pixels)
            embedding += time.perf_counter() - started
    wall = meter.elapsed()
    cpu = meter.report(len(blobs))
    return {"images_per_s": round(len(blobs) / wall, 1), "embed_share": round(embedding / wall, 3),
            "cores_busy": round(float(cpu["machine_busy_share"]) * cores(), 2),  # type: ignore[arg-type]
            "main_process_cpu_ms_per_image": cpu["bench_process_cpu_ms_per_image"]}


def limit(args: argparse.Namespace, pools: dict[int, Pool], blobs: list[bytes]) -> dict[str, Any]:
    """The pipeline's limit: decode processes feeding the GPU embedder (float16, as workers run it)."""
    settings = Settings(model=args.model, device=args.device, runtime="torch")
    embedder = torch_embedder(settings, args.relu6)
    rows = []
    for workers, pool in pools.items():
        share = cycle(blobs, max(args.per_worker * workers, 2 * settings.batch_size * workers))
        pool.map(prepare, [(embedder.recipe, share[:1], settings.max_pixels)] * workers)  # each process's ORB made
        cpu_only = feed(pool, embedder.recipe, None, share, settings)
        with_gpu = feed(pool, embedder.recipe, embedder, share, settings)
        rows.append({"workers": workers, "images": len(share), "cpu_only": cpu_only, "with_gpu": with_gpu})
        log.warning("limit, %d decode processes: %.0f img/s without the GPU, %.0f with it (embed %.0f %% of the "
                    "time)", workers, cpu_only["images_per_s"], with_gpu["images_per_s"], 100 * with_gpu["embed_share"])
    del embedder
    threads = measure_limit(settings, cycle(blobs, args.threads_images), cores()) if args.threads_images else {}
    return {"batch_size": settings.batch_size, "dtype": "float16" if args.device == "cuda" else "float32",
            "processes": rows, "threads": threads}


def _own_worker(model: str, device: str, blobs: list[bytes], size: int, barrier: Any, results: Any) -> None:
    """One worker process as ``worker_concurrency`` > 1 would run it on CUDA: its own model, then decode + local
    features + embed, batch after batch (``size`` images each)."""
    settings = Settings(model=model, device=device, runtime="torch")
    embedder = load_embedder(settings)
    embedder.embed(prepare((embedder.recipe, blobs[:size], settings.max_pixels))[0])  # warm-up, as the seed's
    barrier.wait()  # every process has its model, warmed up: time only the work
    started = time.perf_counter()
    for i in range(0, len(blobs), size):
        pixels, _ = prepare((embedder.recipe, blobs[i : i + size], settings.max_pixels))
        embedder.embed(pixels)
    results.put((len(blobs), started, time.perf_counter()))


def own(args: argparse.Namespace, blobs: list[bytes], counts: str, size: int) -> list[dict[str, Any]]:
    """Images per second of N worker processes (each of ``counts``) with a model each on the GPU, in batches of
    ``size`` (spawned: CUDA does not survive fork)."""
    context = multiprocessing.get_context("spawn")
    rows = []
    for n in (int(x) for x in counts.split(",")):
        barrier, results = context.Barrier(n), context.Queue()
        share = cycle(blobs, args.per_worker)
        procs = [context.Process(target=_own_worker, args=(args.model, args.device, share, size, barrier, results))
                 for _ in range(n)]
        for proc in procs:
            proc.start()
        meter = CpuMeter()
        done = [results.get(timeout=600) for _ in procs]
        for proc in procs:
            proc.join()
        wall = max(end for _, _, end in done) - min(start for _, start, _ in done)
        images = sum(count for count, _, _ in done)
        cpu = meter.report(images)
        rows.append({"processes": n, "images": images, "images_per_s": round(images / wall, 1),
                     "cores_busy": round(float(cpu["machine_busy_share"]) * cores(), 2)})  # type: ignore[arg-type]
        log.warning("own models, %d processes, batches of %d: %.0f img/s", n, size, rows[-1]["images_per_s"])
    return rows


def seed(args: argparse.Namespace, blobs: list[bytes]) -> dict[str, Any]:
    """Images per second of the seed's worker as written (see the module's docstring), in this process."""
    settings = Settings(model=args.model, device=args.device, runtime="torch")
    embedder = torch_embedder(settings, args.relu6)
    tasks = [base64.b64encode(blob).decode() for blob in cycle(blobs, args.seed_images)]  # the caller's side

    def task(payload: str) -> str:
        vectors, _ = describe(embedder, decode_batch(embedder.recipe, [base64.b64decode(payload)], settings.max_pixels))
        return json.dumps(vectors[0].tolist())

    task(tasks[0])  # the solo worker's warm-up task
    meter = CpuMeter()
    for payload in tasks:
        task(payload)
    wall = meter.elapsed()
    cpu = meter.report(len(tasks))
    row = {"images": len(tasks), "images_per_s": round(len(tasks) / wall, 1),
           "dtype": str(embedder.dtype).removeprefix("torch."),
           "cores_busy": round(float(cpu["machine_busy_share"]) * cores(), 2)}  # type: ignore[arg-type]
    log.warning("the seed as written, one image per task: %.1f img/s", row["images_per_s"])
    return row


def cycle(blobs: list[bytes], count: int) -> list[bytes]:
    return [blobs[i % len(blobs)] for i in range(count)]


def jpegs(folder: Path) -> list[bytes]:
    return [path.read_bytes() for path in sorted(folder.iterdir()) if path.suffix.lower() in {".jpg", ".jpeg"}]


def table(report: dict[str, Any]) -> str:
    lines = [f"{report['machine'].get('gpu', report['machine']['cpu'])}, torch {report['machine']['torch']}"]
    for row in report.get("own_models", []):
        lines.append(f"own models, {row['processes']:>3} processes: {row['images_per_s']:>7.0f} img/s, "
                     f"{row['cores_busy']:.1f} cores busy")
    if "seed" in report:
        seed_rate = report["seed"]["images_per_s"]
        lines.append(f"the seed as written (one process, one image per task): {seed_rate:.1f} img/s")
        for row in report.get("own_models", []):
            lines.append(f"  own models, {row['processes']} processes / the seed: "
                         f"{row['images_per_s'] / seed_rate:.1f}x")
        for row in report.get("seed_kind", []):
            lines.append(f"the seed, kinder ({row['processes']} processes, one image per task): "
                         f"{row['images_per_s']:.1f} img/s")
    if "network" not in report:
        return "\n".join(lines)
    for part in ("network", "embedder"):
        lines.append(f"\n{part}: images/s by batch size")
        rows: dict[tuple[str, str], dict[int, float]] = {}
        for row in report[part]:
            rows.setdefault((row["dtype"], row["layout"]), {})[row["batch"]] = row["images_per_s"]
        sizes = sorted({size for cells in rows.values() for size in cells})
        lines.append(f"{'':32}" + "".join(f"{size:>9}" for size in sizes))
        for (dtype, layout), cells in rows.items():
            lines.append(f"{dtype + ' ' + layout:32}" + "".join(f"{cells[size]:>9.0f}" for size in sizes))
    lines.append("\nagreement with float32 on the CPU (min / mean cosine)")
    lines += [f"  {r['dtype']} {r['layout']}: {r['min_cosine']:.6f} / {r['mean_cosine']:.6f} ({r['images']} photos)"
              for r in report["agreement"]]
    lines.append(f"\nlimit, batches of {report['limit']['batch_size']}: decode processes -> img/s without the GPU, "
                 "with it, embed share, cores busy")
    for row in report["limit"]["processes"]:
        alone, fed = row["cpu_only"], row["with_gpu"]
        lines.append(f"  {row['workers']:>3}: {alone['images_per_s']:>8.0f} {fed['images_per_s']:>8.0f}"
                     f" {fed['embed_share']:>6.2f} {fed['cores_busy']:>6.1f}")
    variants = report["limit"]["threads"].get("limit_variants", {})
    lines.append("  one process: " + ", ".join(f"{name} {value:.0f}" for name, value in variants.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    started = time.perf_counter()
    # Decode processes are forked before this process touches CUDA: a child of an initialised CUDA context is unsafe.
    context = multiprocessing.get_context("fork")
    pools = {int(n): context.Pool(int(n)) for n in args.workers.split(",")}
    try:
        if args.images is None:
            from .images import ensure_images

            blobs = [path.read_bytes() for path in ensure_images(CACHE, 256)]
        else:
            blobs = jpegs(args.images)
        chosen = recipe(args.model)
        max_pixels = Settings().max_pixels
        pixels = np.stack([decode_for(chosen, blob, max_pixels).pixels for blob in blobs])
        photos = np.stack([decode_for(chosen, blob, max_pixels).pixels
                           for blob in (jpegs(args.photos) if args.photos else blobs[:32])])
        report: dict[str, Any] = {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": "python -m bench.gpu " + " ".join(argv if argv is not None else sys.argv[1:]),
            "commit": args.commit, "model": args.model, "activation": "relu6" if args.relu6 else chosen.activation,
            "machine": machine(args.device), "images": len(blobs),
        }
        steps = args.steps.split(",")
        if "models" in steps:
            report.update(models(args, pixels, photos))
        if "limit" in steps:
            report["limit"] = limit(args, pools, blobs)
        if "own" in steps:
            report["own_models"] = own(args, blobs, args.own, Settings().batch_size)
        if "seed" in steps:
            report["seed"] = seed(args, blobs)
            if args.seed_kind:
                report["seed_kind"] = own(args, blobs, args.seed_kind, 1)
    finally:
        for pool in pools.values():
            pool.terminate()
    report["seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    print(f"\n{args.out} ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
