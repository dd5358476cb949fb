"""The adapter service on loopback with the default model: time from request to an installed
adapter (a 20-example training job, a composition from a description, a composition searched on
examples), then requests per second, latency and errors with N concurrent clients (each its own
process and token) reading the library, signed manifests and adapter files; then each job engine
side by side: the in-process runner and Ray tasks on a local cluster (`ray start --head`) of 1 and
2 CPUs, each job on 1 thread: request to installed (the first job, and a later one on a warm
worker), `--jobs` jobs at once (jobs per hour), and Ray's cost per job against the in-process runner.

    python bench/cloud.py [--steps 40] [--clients 16] [--seconds 10] [--engine local|ray|both] [--jobs 4]

Writes bench/results/cloud.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from importlib import resources
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hammer(args) -> dict:
    """One client: library, manifest and file GETs in a loop for `seconds`."""
    url, token, adapter_id, seconds = args
    paths = ["/v1/library", f"/v1/adapters/{adapter_id}/manifest?format=gguf",
             f"/v1/adapters/{adapter_id}/files/gguf/adapter.gguf"]
    lat, errors, codes, nbytes = [], 0, {}, 0
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        req = urllib.request.Request(url + paths[i % 3], headers={"Authorization": f"Bearer {token}"})
        t = time.perf_counter()
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                nbytes += len(r.read())
                codes[r.status] = codes.get(r.status, 0) + 1
        except urllib.error.HTTPError as e:
            codes[e.code] = codes.get(e.code, 0) + 1
            errors += 1
        except OSError:
            errors += 1
        lat.append(time.perf_counter() - t)
        i += 1
    return {"requests": len(lat), "errors": errors, "codes": codes, "latencies": lat, "bytes": nbytes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40, help="training steps of the 20-example job")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--engine", choices=("local", "ray", "both"), default="both",
                    help="the job engines to compare (ray needs edgelora[ray])")
    ap.add_argument("--jobs", type=int, default=4, help="jobs submitted at once for the throughput figure")
    ap.add_argument("--workers", default="1,2", help="CPUs of the Ray cluster (threads of the in-process runner)")
    ap.add_argument("--engines-only", action="store_true", help="only the job engines' table")
    args = ap.parse_args()
    if args.engines_only:
        lines = resources.files("edgelora.data").joinpath("pirate_train.jsonl").read_text().splitlines()
        tmp = Path(tempfile.mkdtemp(prefix="edgelora-bench-cloud-"))
        engines = engine_table(args, common.bundle("raspberry-pi-5", "gguf", "q8_0"),
                               [json.loads(x) for x in lines if x.strip()][:20], tmp)
        print(f"\nwrote {common.write_json('cloud-engines', {'machine': common.machine(), 'engines': engines})}",
              file=sys.stderr)
        return

    from edgelora.adapters import random_adapter
    from edgelora.converters import save_adapter
    from edgelora.cloud import CloudClient
    from edgelora.cloud.service import add_token, library_add

    bundle = common.bundle("raspberry-pi-5", "gguf", "q8_0")
    tmp = Path(tempfile.mkdtemp(prefix="edgelora-bench-cloud-"))
    root = tmp / "service"
    token = add_token(root, "bench-device")
    legal = tmp / "legal.gguf"
    save_adapter(random_adapter(bundle.config, rank=8, seed=3, scale=0.01, name="legal"), legal, "gguf", bundle.config)
    library_add(root, legal, str(bundle.root), name="legal", description="formal legal contract language")
    proc, url = start_service(root, bundle)
    try:
        client = CloudClient.connect(bundle, url, token, (root / "service_key.pub").read_text().strip())
        for name in ("cloud-pirate", "cloud-composed", "cloud-searched"):
            if name in bundle.store.names():
                bundle.store.remove(name)
        lines = resources.files("edgelora.data").joinpath("pirate_train.jsonl").read_text().splitlines()
        examples = [json.loads(x) for x in lines if x.strip()][:20]

        def timed(label, **request):
            t0 = time.perf_counter()
            job = client.request(**request)
            job = client.wait(job["id"], poll_s=0.1)
            t1 = time.perf_counter()
            m = client.pull(job["id"])
            t2 = time.perf_counter()
            print(f"  {label}: {t2 - t0:.1f}s", file=sys.stderr)
            return {"what": label, "total_s": t2 - t0, "service_s": t1 - t0, "pull_verify_install_s": t2 - t1,
                    "rank": m["rank"], "size_bytes": sum(f["size"] for f in m["files"].values())}

        print("request -> installed adapter (default model, service training on all cores)", file=sys.stderr)
        rows = [timed(f"20-example job, {args.steps} steps", name="cloud-pirate", examples=examples, kind="examples",
                      description="answers in the voice of a pirate", steps=args.steps, share=True),
                timed("composition from a description", name="cloud-composed", description="talk like a pirate"),
                timed("composition searched on 4 examples", name="cloud-searched", examples=examples[:4],
                      description="pirate", kind="compose", budget=20)]
        adapter_id = next(a["id"] for a in client.library() if a["name"] == "cloud-pirate")
        tokens = [add_token(root, f"bench-{i}") for i in range(args.clients)]
        print(f"{args.clients} concurrent clients for {args.seconds:g}s", file=sys.stderr)
        t = time.perf_counter()
        with mp.get_context("spawn").Pool(args.clients) as pool:
            results = pool.map(hammer, [(url, tok, adapter_id, args.seconds) for tok in tokens])
        wall = time.perf_counter() - t
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    lat = sorted(x for r in results for x in r["latencies"])
    n = len(lat)
    load = {"clients": args.clients, "seconds": args.seconds, "requests": n,
            "requests_per_s": n / args.seconds, "errors": sum(r["errors"] for r in results),
            "p50_ms": 1e3 * statistics.median(lat), "p95_ms": 1e3 * lat[int(0.95 * (n - 1))],
            "p99_ms": 1e3 * lat[int(0.99 * (n - 1))], "MB_per_s": sum(r["bytes"] for r in results) / args.seconds / 1e6,
            "codes": {str(k): sum(r["codes"].get(k, 0) for r in results) for k in {c for r in results for c in r["codes"]}},
            "wall_s": wall}
    print(common.table(("request -> installed", "total s", "service s", "pull+verify+install s", "rank", "file KB"),
                       [(r["what"], f"{r['total_s']:.1f}", f"{r['service_s']:.1f}", f"{r['pull_verify_install_s']:.2f}",
                         r["rank"], f"{r['size_bytes'] / 1e3:.0f}") for r in rows]))
    print()
    print(common.table(("clients", "requests/s", "errors", "p50 ms", "p95 ms", "p99 ms", "MB/s", "status codes"),
                       [(load["clients"], f"{load['requests_per_s']:.0f}", load["errors"], f"{load['p50_ms']:.1f}",
                         f"{load['p95_ms']:.1f}", f"{load['p99_ms']:.1f}", f"{load['MB_per_s']:.1f}",
                         json.dumps(load["codes"]))]))
    engines = engine_table(args, bundle, examples, tmp)
    path = common.write_json("cloud", {"machine": common.machine(), "jobs": rows, "load": load, "engines": engines})
    print(f"\nwrote {path}", file=sys.stderr)


def start_service(root: Path, bundle, *extra: str):
    port = free_port()
    log = open(root / "service.log", "a")
    proc = subprocess.Popen([sys.executable, "-m", "edgelora", "cloud", "serve", "--root", str(root), "--base",
                             str(bundle.root), "--port", str(port), "--rate", "1000", *extra],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        if proc.poll() is not None:
            raise SystemExit(f"the service did not start: {(root / 'service.log').read_text()[-2000:]}")
        try:
            urllib.request.urlopen(url + "/v1/health", timeout=1).close()
            return proc, url
        except OSError:
            time.sleep(0.1)
    raise SystemExit("the service did not start in 120 s")


def start_cluster(cpus: int, tmp: Path):
    """`ray start --head --block` with `cpus` CPUs; returns (process, address)."""
    port, temp = free_port(), Path(tempfile.mkdtemp(prefix="elray-", dir="/tmp"))
    log = open(tmp / f"ray-{cpus}.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", f"--port={port}",
                             f"--num-cpus={cpus}", "--include-dashboard=false", "--disable-usage-stats",
                             f"--temp-dir={temp}"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    for _ in range(600):
        if "Ray runtime started" in (tmp / f"ray-{cpus}.log").read_text():
            return proc, f"127.0.0.1:{port}"
        time.sleep(0.2)
    raise SystemExit("ray start did not finish in 120 s")


def engine_table(args, bundle, examples, tmp: Path) -> list[dict]:
    """Each engine on the same jobs: one 40-step job to an installed adapter (cold, then warm), then
    `--jobs` at once."""
    import os
    import signal

    from edgelora.cloud import CloudClient
    from edgelora.cloud.service import add_token

    engines = ["local", "ray"] if args.engine == "both" else [args.engine]
    out = []
    for engine in engines:
        for w in [int(x) for x in args.workers.split(",")]:
            root = tmp / f"engine-{engine}-{w}"
            token = add_token(root, "bench")
            cluster = proc = None
            try:
                if engine == "ray":
                    cluster, address = start_cluster(w, tmp)
                    extra = ("--engine", "ray", "--ray-address", address, "--threads", "1", "--queue", str(args.jobs + 2))
                else:
                    extra = ("--threads", str(w), "--queue", str(args.jobs + 2))
                proc, url = start_service(root, bundle, *extra)
                client = CloudClient(url, token, (root / "service_key.pub").read_text().strip(), bundle=bundle)
                single = []
                for k in range(2):
                    name = f"bench-{engine}-{w}-{k}"
                    if name in bundle.store.names():
                        bundle.store.remove(name)
                    t = time.perf_counter()
                    job = client.wait(client.request(name=name, examples=examples, kind="examples", steps=args.steps,
                                                     seed=k)["id"], poll_s=0.05)
                    client.pull(job["id"])
                    single.append(time.perf_counter() - t)
                    bundle.store.remove(name)
                print(f"  {engine} {w}: one job {single[0]:.1f}s cold, {single[1]:.1f}s warm", file=sys.stderr)
                t = time.perf_counter()
                ids = [client.request(name=f"batch-{i}", examples=examples, kind="examples", steps=args.steps,
                                      seed=10 + i)["id"] for i in range(args.jobs)]
                for j in ids:
                    client.wait(j, poll_s=0.1)
                batch = time.perf_counter() - t
                print(f"  {engine} {w}: {args.jobs} jobs in {batch:.1f}s", file=sys.stderr)
            finally:
                if proc is not None:
                    proc.terminate()
                    proc.wait(timeout=60)
                if cluster is not None:
                    os.killpg(cluster.pid, signal.SIGTERM)
                    cluster.wait(timeout=60)
            out.append({"engine": engine, "cpus": w, "threads_per_job": 1 if engine == "ray" else w,
                        "cold_s": single[0], "warm_s": single[1], "batch_jobs": args.jobs, "batch_s": batch,
                        "jobs_per_hour": 3600 * args.jobs / batch})
    local = {r["cpus"]: r for r in out if r["engine"] == "local"}
    one = local.get(1)
    print(f"\njob engines: {args.steps}-step jobs on {len(examples)} examples, request to installed adapter")
    print(common.table(("engine", "CPUs", "threads/job", "first job s", "later job s", f"{args.jobs} jobs s",
                        "jobs/hour", "x local 1 CPU", "cost/job vs local s"),
                       [(r["engine"], r["cpus"], r["threads_per_job"], f"{r['cold_s']:.1f}", f"{r['warm_s']:.1f}",
                         f"{r['batch_s']:.1f}", f"{r['jobs_per_hour']:.0f}",
                         f"{r['jobs_per_hour'] / one['jobs_per_hour']:.2f}x" if one else "-",
                         f"{r['warm_s'] - one['warm_s']:+.2f}" if one and r["engine"] == "ray" and r["cpus"] == 1 else "-")
                        for r in out]))
    return out


if __name__ == "__main__":
    main()
