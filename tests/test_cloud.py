"""The adapter service and the device client, for real: the service runs as its own process
(`edgelora cloud serve`) on 127.0.0.1 and the client talks HTTP to it, sometimes through a proxy
that alters or cuts what passes."""

from __future__ import annotations

import http.server
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

import edgelora
from edgelora.adapters import AdapterBaseMismatchError, random_adapter
from edgelora.converters import load_adapter
from edgelora.models import load_base
from edgelora.cloud import AuthError, CloudClient, CloudError, ServiceUnreachableError, SignatureError, TamperedError
from edgelora.cloud import signing
from edgelora.cloud.service import add_token

from cloud_util import ServiceProcess, chats

pytestmark = pytest.mark.usefixtures("isolated_cache")

class Proxy:
    """A loopback HTTP proxy in front of the service that can rewrite or cut responses."""

    def __init__(self, target: str):
        self.target, self.rewrite, self.cut_files_once, self.ranges = target, None, False, []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("authorization", "range", "accept")}
                if "range" in {k.lower() for k in headers}:
                    proxy.ranges.append((self.path, self.headers["Range"]))
                req = urllib.request.Request(proxy.target + self.path, headers=headers)
                try:
                    r = urllib.request.urlopen(req, timeout=30)
                except urllib.error.HTTPError as e:
                    r = e
                body = r.read()
                if proxy.rewrite:
                    body = proxy.rewrite(self.path, body)
                cut = proxy.cut_files_once and "/files/" in self.path
                self.send_response(r.status if hasattr(r, "status") else r.code)
                for k, v in r.headers.items():
                    if k.lower() in ("content-type", "content-range", "accept-ranges", "retry-after"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if cut:
                    proxy.cut_files_once = False
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_llama, tiny_llama_tied):
    """A running service serving two bases, a library seeded with two described adapters, a device
    bundle of the first base, and a token."""
    tmp = tmp_path_factory.mktemp("cloud")
    base = load_base(tiny_llama)
    other = load_base(tiny_llama_tied)
    bundle = edgelora.export(str(tiny_llama), "x86-64", tmp / "bundle", backend="gguf", quant="f32", progress=False)
    root = tmp / "service"
    token = add_token(root, "phone-1")
    lib = {}
    for name, seed, desc in (("pirate", 1, "speaks like a pirate: arr, matey, ahoy"),
                             ("legal", 2, "formal legal contract language, clauses and terms")):
        path = tmp / f"{name}.gguf"
        a = random_adapter(base.config, rank=4, seed=seed, scale=0.2, name=name)
        edgelora.save_adapter(a, path, "gguf", base.config)
        r = subprocess.run([sys.executable, "-m", "edgelora", "cloud", "add", str(path), "--root", str(root),
                            "--base", str(tiny_llama), "--name", name, "--description", desc],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        lib[name] = a
    svc = ServiceProcess(root, [str(tiny_llama), str(tiny_llama_tied)]).start()
    client = CloudClient.connect(bundle, svc.url, token, svc.public_key)
    yield {"svc": svc, "bundle": bundle, "client": client, "token": token, "base": base, "other": other,
           "lib": lib, "tmp": tmp, "root": root}
    if svc.proc.poll() is None:
        svc.proc.terminate()
        svc.proc.wait(timeout=30)


def installed(bundle) -> list[str]:
    return bundle.store.names()


def no_partials(bundle) -> bool:
    d = bundle.store.root / ".cloud-partial"
    return not d.exists() or not any(d.iterdir())


def test_job_from_examples_is_trained_signed_and_installed(world):
    c, bundle = world["client"], world["bundle"]
    job = c.request(name="facts", examples=chats(12), steps=30, kind="examples", description="my personal facts")
    assert job["status"] in ("queued", "running")
    done = c.wait(job["id"], timeout=300)
    m = c.pull(done["id"])
    assert m["name"] == "facts" and "facts" in installed(bundle)
    prov = m["provenance"]
    assert prov["method"] == "train" and prov["cloud"]["key_id"] == world["svc"].health["key_id"]
    entry = json.loads((world["root"] / "library" / done["adapter_id"] / "entry.json").read_text())
    assert entry["train"]["loss_last"] < entry["train"]["loss_first"]
    # the installed adapter is the service's, bit for bit, and the engine runs it
    ours = load_adapter(bundle.store.path("facts", "gguf"), bundle.config)
    theirs = load_adapter(world["root"] / "library" / done["adapter_id"] / "adapter.gguf", bundle.config)
    for t in theirs.tensors:
        np.testing.assert_array_equal(ours.delta(t), theirs.delta(t))
    e = bundle.engine("gguf")
    ids = bundle.tokenizer().encode("What is my dog called?")
    plain = e.logits(ids)
    e.set_adapters({"facts": 1.0})
    assert not np.allclose(e.logits(ids), plain, atol=1e-3)
    e.close()


def test_composition_from_a_description_picks_the_matching_adapter(world):
    c, bundle = world["client"], world["bundle"]
    names = {a["name"] for a in c.library()}
    assert {"pirate", "legal"} <= names
    job = c.wait(c.request(name="arr", description="answer like a pirate would, matey")["id"], timeout=120)
    m = c.pull(job["id"])
    assert [x["name"] for x in m["provenance"]["components"]] == ["pirate"]
    got = load_adapter(bundle.store.path("arr", "gguf"), bundle.config)
    want = world["lib"]["pirate"]
    for t in want.tensors:
        np.testing.assert_allclose(got.delta(t), want.delta(t), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("fmt", ["onnx", "peft"])
def test_every_format_the_device_asks_for_is_served_signed_and_lossless(world, fmt):
    c, bundle = world["client"], world["bundle"]
    adapter_id = next(a["id"] for a in c.library() if a["name"] == "pirate")
    envelope = c._json("GET", f"/v1/adapters/{adapter_id}/manifest?format={fmt}")
    files = set(c.verify(envelope, adapter_id=adapter_id, fmt=fmt)["files"])
    assert files == ({"adapter.onnx_adapter", "adapter.onnx_adapter.json"} if fmt == "onnx"
                     else {"adapter_config.json", "adapter_model.safetensors"})
    m = c.pull(adapter_id, f"pirate-{fmt}", fmt=fmt)
    assert m["provenance"]["cloud"]["format"] == fmt
    got = load_adapter(bundle.store.path(f"pirate-{fmt}", "gguf"), bundle.config)
    for t, want in world["lib"]["pirate"].tensors.items():
        np.testing.assert_allclose(got.delta(t), world["lib"]["pirate"].delta(t), rtol=1e-6, atol=1e-8)


def test_composition_from_examples_searches_weights_that_lower_the_loss(world):
    c = world["client"]
    job = c.request(name="mixed", description="", examples=chats(4), kind="compose", budget=16)
    job = c.wait(job["id"], timeout=300)
    entry = json.loads((world["root"] / "library" / job["adapter_id"] / "entry.json").read_text())
    s = entry["search"]
    assert s["evaluations"] <= 16 and s["objective"] < s["objective_start"]
    m = c.pull(job["id"])
    assert m["provenance"]["method"] == "compose" and len(m["provenance"]["components"]) >= 1


@pytest.mark.parametrize("where", ["file", "manifest", "signature", "unsigned", "expired", "other-key"])
def test_tampered_or_unverifiable_adapters_are_refused_and_nothing_is_installed(world, where):
    c, bundle = world["client"], world["bundle"]
    adapter_id = next(a["id"] for a in c.library() if a["name"] == "legal")
    proxy = Proxy(world["svc"].url)
    key = c.key_text
    if where == "other-key":
        key = signing.public_key_text(signing.load_or_create_private_key(world["tmp"] / "other.pem"))

    def rewrite(path: str, body: bytes) -> bytes:
        if where == "file" and "/files/" in path:
            b = bytearray(body)
            b[len(b) // 2] ^= 0x01
            return bytes(b)
        if "/manifest" not in path:
            return body
        env = json.loads(body)
        if where == "manifest":
            env["manifest"]["rank"] += 1
        elif where == "signature":
            sig = bytearray(env["signature"].encode())
            sig[5] = ord("A") if sig[5] != ord("A") else ord("B")
            env["signature"] = sig.decode()
        elif where == "unsigned":
            env.pop("signature")
        elif where == "expired":
            private = signing.load_or_create_private_key(world["root"] / "service_key.pem")
            env = signing.sign({k: v for k, v in env["manifest"].items() if k not in ("issued", "expires", "schema")},
                               private, ttl_s=60, now=time.time() - 3600)
        return json.dumps(env).encode()

    proxy.rewrite = rewrite
    before = installed(bundle)
    try:
        client = CloudClient(proxy.url, world["token"], key, bundle=bundle)
        with pytest.raises((SignatureError, TamperedError)) as e:
            client.pull(adapter_id, "evil")
    finally:
        proxy.close()
    assert installed(bundle) == before and no_partials(bundle)
    msg = str(e.value)
    assert "\n" not in msg and "refus" in msg
    if where == "expired":
        assert "expired" in msg


def test_an_adapter_for_another_base_is_refused(world):
    c, bundle = world["client"], world["bundle"]
    other = world["other"].fingerprint
    job = c.wait(c.request(name="elsewhere", examples=chats(4), kind="examples", steps=3, base=other)["id"], timeout=120)
    before = installed(bundle)
    with pytest.raises(AdapterBaseMismatchError, match="made for base"):
        c.pull(job["id"])
    assert installed(bundle) == before and no_partials(bundle)


def test_a_download_cut_half_way_resumes_with_a_range_request(world):
    c, bundle = world["client"], world["bundle"]
    adapter_id = next(a["id"] for a in c.library() if a["name"] == "pirate")
    size = c._json("GET", f"/v1/adapters/{adapter_id}/manifest?format=gguf")["manifest"]["files"]["adapter.gguf"]["size"]
    proxy = Proxy(world["svc"].url)
    proxy.cut_files_once = True
    try:
        client = CloudClient(proxy.url, world["token"], c.key_text, bundle=bundle, chunk_bytes=1024, backoff_s=0.05)
        m = client.pull(adapter_id, "pirate-resumed")
    finally:
        proxy.close()
    assert m["name"] == "pirate-resumed"
    ((path, rng),) = proxy.ranges
    start = int(rng.split("=")[1].rstrip("-"))
    assert "/files/gguf/adapter.gguf" in path and size // 4 < start <= size // 2
    assert no_partials(bundle)


def test_service_stopped_mid_job_offline_then_resumed_and_synced(world, run_cli):
    c, bundle, svc = world["client"], world["bundle"], world["svc"]
    job = c.request(name="long", examples=chats(8), kind="examples", steps=300, seed=7)
    deadline = time.monotonic() + 120
    while (c.status(job["id"]).get("progress") or {}).get("step", 0) < 25:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    svc.kill()
    # offline: every cloud call says so, the installed adapters keep working
    offline = CloudClient.for_bundle(bundle, retries=1, backoff_s=0.01)
    with pytest.raises(ServiceUnreachableError, match="cannot reach the adapter service.*keep working offline"):
        offline.status(job["id"])
    r = run_cli("cloud", "status", str(bundle.root))
    assert r.returncode == 1 and "cannot reach the adapter service" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    e = bundle.engine("gguf")
    e.set_adapters({"facts": 1.0})
    assert e.generate([{"role": "user", "content": "What is my dog called?"}], max_tokens=4).tokens
    e.close()
    # back: the job resumes from its checkpoint, and sync installs it
    svc.start()
    done = c.wait(job["id"], timeout=300)
    assert done["restarts"] == 1 and done["resumed_at_step"] >= 10
    results = {r["id"]: r for r in c.sync()}
    assert results[job["id"]]["action"] == "installed as long"
    # the same job uninterrupted ends with the same adapter
    again = c.wait(c.request(name="long-again", examples=chats(8), kind="examples", steps=300, seed=7)["id"], timeout=300)
    lib = world["root"] / "library"
    a = load_adapter(lib / done["adapter_id"] / "adapter.gguf", bundle.config)
    b = load_adapter(lib / again["adapter_id"] / "adapter.gguf", bundle.config)
    for t in a.tensors:
        np.testing.assert_array_equal(a.tensors[t].B, b.tensors[t].B)


def test_bad_token_size_and_rate_limits(world, run_cli):
    c, bundle, svc = world["client"], world["bundle"], world["svc"]
    bad = CloudClient(svc.url, "elt_not-a-token", c.key_text, bundle=bundle)
    with pytest.raises(AuthError, match="refused this device's token"):
        bad.library()
    with pytest.raises(CloudError, match="over the service's limit"):
        c.request(name="huge", examples=[{"prompt": "x" * 100_000, "completion": "y"}] * 50, kind="examples")
    with socket.create_connection(("127.0.0.1", svc.port)) as s:  # the service enforces it too
        s.sendall(f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {world['token']}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: 50000000\r\n\r\n".encode())
        assert b" 413 " in s.recv(4096).split(b"\r\n")[0] + b" "
    with pytest.raises(CloudError, match="no assistant turn") as e:
        c.request(name="bad", examples=[{"messages": [{"role": "user", "content": "hi"}]}], kind="examples")
    assert "example 1" in str(e.value)
    # rates: a service allowing 0.5 requests/s per token (burst 1) refuses most of 8 quick ones
    slow_root = world["tmp"] / "slow-service"
    slow_token = add_token(slow_root, "phone-2")
    slow = ServiceProcess(slow_root, [str(world["tmp"] / "bundle")], None, "--rate", "0.5").start()
    try:
        codes = []
        for _ in range(8):
            req = urllib.request.Request(slow.url + "/v1/library", headers={"Authorization": f"Bearer {slow_token}"})
            try:
                codes.append(urllib.request.urlopen(req, timeout=30).status)
            except urllib.error.HTTPError as err:
                codes.append(err.code)
                assert err.code != 429 or int(err.headers["Retry-After"]) >= 1
    finally:
        slow.proc.terminate()
        slow.proc.wait(timeout=30)
    assert codes[0] == 200 and codes.count(429) >= 4, codes
    env = {"EDGELORA_CLOUD_TOKEN": "elt_wrong"}
    r = run_cli("cloud", "connect", str(bundle.root), "--url", svc.url, "--key", c.key_text, env=env)
    assert r.returncode == 0  # connecting checks the key, not the token
    r = run_cli("cloud", "library", str(bundle.root))
    assert r.returncode == 2 and "refused this device's token" in r.stderr
    CloudClient.connect(bundle, svc.url, world["token"], c.key_text)


def test_cli_request_wait_and_pull(world, run_cli):
    bundle = world["bundle"]
    r = run_cli("cloud", "request", str(bundle.root), "--name", "legalese", "--description",
                "formal contract clauses", "--wait")
    assert r.returncode == 0, r.stderr
    assert "installed legalese" in r.stdout and "legalese" in installed(bundle)
    r = run_cli("cloud", "status", str(bundle.root))
    assert r.returncode == 0 and "done" in r.stdout
    r = run_cli("cloud", "request", str(bundle.root), "--name", "x", "--description", "zebra quantum origami")
    assert r.returncode == 0
    job_id = r.stdout.split()[0]
    with pytest.raises(CloudError, match="failed on the service"):
        world["client"].wait(job_id, timeout=60)
    r = run_cli("cloud", "pull", str(bundle.root), job_id)
    assert r.returncode == 2 and "shares a word" in r.stderr


def test_full_queue_refuses_before_writing(world):
    """A job on a full queue is refused (the HTTP layer answers QueueFullError with 503 and
    Retry-After) before its examples are written or tokenized."""
    from edgelora.cloud.service import Limits, QueueFullError, Service, ServiceConfig

    root = world["tmp"] / "queue-service"
    svc = Service(ServiceConfig(root, [str(world["tmp"] / "bundle")], Limits(queue_size=1)), log=lambda *a: None)
    try:
        fp = next(iter(svc.bases))
        svc.submit({"kind": "examples", "base": fp, "examples": chats(4), "steps": 2000}, "phone")
        bad = [{"messages": [{"role": "user", "content": "hi"}]}]  # would fail tokenizing: never reached
        with pytest.raises(QueueFullError, match="queue is full"):
            svc.submit({"kind": "examples", "base": fp, "examples": bad, "steps": 5}, "phone")
        assert len(list((root / "jobs").iterdir())) == 1
    finally:
        svc.close()


def test_job_parameters_default_to_the_trainers_and_bad_ones_are_refused():
    from edgelora.cloud.service import JobParams, Limits, ServiceError
    from edgelora.train import TrainConfig

    p, t = JobParams.from_request({}, Limits()), TrainConfig()
    assert (p.steps, p.rank, p.lr, p.seq_len, p.seed) == (t.steps, t.rank, t.lr, t.seq_len, t.seed)
    assert JobParams.from_request({"steps": 7, "lr": 0.01}, Limits()).steps == 7
    for bad, field in (({"steps": 0}, "steps"), ({"rank": "8"}, "rank"), ({"lr": 2}, "lr"), ({"steps": True}, "steps")):
        with pytest.raises(ServiceError, match=f'"{field}"'):
            JobParams.from_request(bad, Limits())
