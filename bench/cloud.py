"""The adapter service on loopback with the default model: time from request to an installed
adapter (a 20-example training job, a composition from a description, a composition searched on
examples), then requests per second, latency and errors with N concurrent clients (each its own
process and token) reading the library, signed manifests and adapter files.

    python bench/cloud.py [--steps 40] [--clients 16] [--seconds 10]

Writes bench/out/cloud.json.
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
    args = ap.parse_args()

    import edgelora
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
    port = free_port()
    log = open(tmp / "service.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "edgelora", "cloud", "serve", "--root", str(root), "--base",
                             str(bundle.root), "--port", str(port), "--rate", "1000"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "/v1/health", timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
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
    path = common.write_json("cloud", {"machine": common.machine(), "jobs": rows, "load": load})
    print(f"\nwrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
