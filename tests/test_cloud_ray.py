"""The adapter service with its jobs on a real Ray cluster (`ray start --head` on loopback, 2 CPUs),
against the in-process runner: the same adapters bit for bit, a worker killed mid-job retried from
its checkpoint, the service killed and restarted while jobs run, queue and rate limits as before."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

import edgelora
from edgelora.adapters import random_adapter
from edgelora.cloud import CloudClient, CloudError
from edgelora.cloud.service import add_token, library_add
from edgelora.converters import load_adapter
from edgelora.models import load_base

from cloud_util import RayCluster, ServiceProcess, chats

pytestmark = pytest.mark.usefixtures("isolated_cache")
ray = pytest.importorskip("ray", reason="the Ray runner's tests need ray: pip install 'edgelora[ray]'")


@pytest.fixture(scope="module")
def cluster():
    c = RayCluster(cpus=2)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_llama, cluster):
    """Two services on the same base and library seed, one per runner, and a device bundle
    connected to the Ray one."""
    tmp = tmp_path_factory.mktemp("cloud-ray")
    base = load_base(tiny_llama)
    bundle = edgelora.export(str(tiny_llama), "x86-64", tmp / "bundle", backend="gguf", quant="f32", progress=False)
    seeds = []
    for name, seed, desc in (("pirate", 1, "speaks like a pirate: arr, matey, ahoy"),
                             ("legal", 2, "formal legal contract language, clauses and terms")):
        path = tmp / f"{name}.gguf"
        edgelora.save_adapter(random_adapter(base.config, rank=4, seed=seed, scale=0.2, name=name), path, "gguf", base.config)
        seeds.append((path, name, desc))
    svcs, tokens = {}, {}
    try:
        for engine in ("local", "ray"):
            root = tmp / engine
            tokens[engine] = add_token(root, "phone-1")
            for path, name, desc in seeds:
                library_add(root, path, str(tiny_llama), name=name, description=desc)
            extra = ("--engine", "ray", "--ray-address", cluster.address, "--queue", "4") if engine == "ray" else ()
            svcs[engine] = ServiceProcess(root, [str(tiny_llama)], None, *extra, env=cluster.env)
            svcs[engine].start()
        clients = {e: CloudClient(svcs[e].url, tokens[e], svcs[e].public_key, bundle=bundle) for e in svcs}
        ray_client = CloudClient.connect(bundle, svcs["ray"].url, tokens["ray"], svcs["ray"].public_key)
        yield {"svcs": svcs, "clients": clients, "device": ray_client, "bundle": bundle, "base": base, "tmp": tmp,
               "tiny": tiny_llama, "cluster": cluster, "tokens": tokens}
    finally:
        for s in svcs.values():
            s.stop()


def library_adapter(svc: ServiceProcess, adapter_id: str, config):
    return load_adapter(svc.root / "library" / adapter_id / "adapter.gguf", config)


def assert_same_adapter(a, b) -> None:
    assert sorted(a.tensors) == sorted(b.tensors) and a.alpha == b.alpha
    for t in a.tensors:
        np.testing.assert_array_equal(a.tensors[t].A, b.tensors[t].A)
        np.testing.assert_array_equal(a.tensors[t].B, b.tensors[t].B)


def progress_file(svc: ServiceProcess, job_id: str) -> dict:
    try:
        return json.loads((svc.root / "jobs" / job_id / "progress.json").read_text())
    except (OSError, ValueError):
        return {}


def wait_for(pred, timeout: float = 120, what: str = "it"):
    deadline = time.monotonic() + timeout
    while not (v := pred()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return v


@pytest.mark.parametrize("kind", ["examples", "compose"])
def test_a_ray_job_makes_the_same_adapter_bit_for_bit_as_the_local_runner(world, kind):
    spec = dict(name=f"same-{kind}", examples=chats(8), kind=kind, seed=3)
    spec.update(steps=40) if kind == "examples" else spec.update(description="pirate talk", budget=12)
    done = {e: c.wait(c.request(**spec)["id"], timeout=300) for e, c in world["clients"].items()}
    assert done["ray"]["status"] == "done" and done["ray"]["attempts"] == 1, done["ray"]
    cfg = world["base"].config
    assert_same_adapter(library_adapter(world["svcs"]["local"], done["local"]["adapter_id"], cfg),
                        library_adapter(world["svcs"]["ray"], done["ray"]["adapter_id"], cfg))
    progress = done["ray"]["progress"]
    assert progress.get("step") == 40 if kind == "examples" else progress.get("evaluations", 0) > 0
    assert "worker" not in done["ray"]  # where it ran is the operator's business (job.json), not the caller's
    worker = json.loads((world["svcs"]["ray"].root / "jobs" / done["ray"]["id"] / "job.json").read_text())["worker"]
    assert worker["pid"] != world["svcs"]["ray"].proc.pid


def test_a_job_that_cannot_succeed_fails_once_with_its_reason(world):
    """An application error comes back from the task as the job's error: not retried, not hidden."""
    c = world["clients"]["ray"]
    job = c.request(name="nothing", description="zebra quantum origami")
    with pytest.raises(CloudError, match="failed on the service"):
        c.wait(job["id"], timeout=120)
    st = c.status(job["id"])
    assert st["status"] == "failed" and "shares a word" in st["error"] and st["attempts"] == 1, st


def test_a_worker_killed_mid_training_is_retried_from_its_checkpoint(world):
    svc, device = world["svcs"]["ray"], world["device"]
    spec = dict(name="killed", examples=chats(8), kind="examples", steps=1200, seed=7)  # ~5 s: time to kill it
    job = device.request(**spec)
    info = wait_for(lambda: (p := progress_file(svc, job["id"])).get("step", 0) >= 25 and p, what="step 25")
    os.kill(info["worker"]["pid"], signal.SIGKILL)
    done = device.wait(job["id"], timeout=300)
    assert done["status"] == "done" and done["attempts"] == 2 and done["resumed_at_step"] >= 20, done
    # the device pulls it verified, equal to the same job run without a kill (on the local runner)
    m = device.pull(job["id"])
    assert m["name"] == "killed" and "killed" in world["bundle"].store.names()
    local = world["clients"]["local"]
    again = local.wait(local.request(**spec)["id"], timeout=300)
    cfg = world["base"].config
    assert_same_adapter(world["bundle"].store.open("killed", "gguf")[1],
                        library_adapter(world["svcs"]["local"], again["adapter_id"], cfg))


def test_four_jobs_on_two_cpus_survive_a_service_restart_and_each_ends_once(world):
    svc, c = world["svcs"]["ray"], world["clients"]["ray"]
    ids = [c.request(name=f"four-{i}", examples=chats(8), kind="examples", steps=1200, seed=i)["id"] for i in range(4)]
    # the queue holds 4: a fifth is refused at once with 503 and Retry-After, as with the local runner
    req = urllib.request.Request(svc.url + "/v1/jobs", method="POST", data=json.dumps(
        {"kind": "examples", "base": svc.health["bases"][0], "examples": chats(2)}).encode(),
        headers={"Authorization": f"Bearer {world['tokens']['ray']}", "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 503 and e.value.headers["Retry-After"]
    # two run at once on two CPUs; the service dies while they do
    seen = set()

    def two_running():
        running = [j for j in ids if progress_file(svc, j) and not (svc.root / "jobs" / j / "result").exists()]
        seen.add(len(running))
        return sum(progress_file(svc, j).get("step", 0) >= 15 for j in running) == 2

    wait_for(two_running, what="two jobs at step 15")
    assert max(seen) == 2, seen  # never more than the cluster's CPUs
    svc.kill()
    svc.extra = (*svc.extra, "--rate", "5")
    svc.start()
    done = [c.wait(j, timeout=600) for j in ids]
    assert all(d["status"] == "done" for d in done), done
    entries = [json.loads(p.read_text()) for p in (svc.root / "library").glob("*/entry.json")]
    made = sorted(e["job"] for e in entries if e.get("job") in ids)
    assert made == sorted(ids), entries  # one library entry per job
    log = (svc.root / "service.log").read_text()
    assert all(log.count(f"job {j} (examples): done") == 1 for j in ids), log[-3000:]
    assert sum(d["restarts"] for d in done) >= 2, done  # the two that were running were resumed
    # rates are the HTTP layer's, whatever runs the jobs: 5/s with a burst of 15
    codes = []
    for _ in range(30):
        try:
            with urllib.request.urlopen(urllib.request.Request(
                    svc.url + "/v1/library", headers={"Authorization": f"Bearer {world['tokens']['ray']}"}), timeout=30) as r:
                codes.append(r.status)
        except urllib.error.HTTPError as err:
            codes.append(err.code)
    assert codes[0] == 200 and codes.count(429) >= 5, codes


def test_without_ray_the_ray_engine_is_refused_in_one_line(tmp_path, tiny_llama):
    code = ("import sys; sys.modules['ray'] = None; from edgelora.cli import app; "
            "sys.argv = ['edgelora'] + sys.argv[1:]; app()")
    r = subprocess.run([sys.executable, "-c", code, "cloud", "serve", "--root", str(tmp_path / "svc"), "--base",
                        str(tiny_llama), "--engine", "ray"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines() == ["edgelora: error: --engine ray needs Ray, which is not installed: "
                                             "pip install 'edgelora[ray]'"]
    r = subprocess.run([sys.executable, "-m", "edgelora", "cloud", "serve", "--root", str(tmp_path / "svc"),
                        "--base", str(tiny_llama), "--engine", "ray", "--ray-address", "127.0.0.1:1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "no Ray cluster answers at 127.0.0.1:1" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
