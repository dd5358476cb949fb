"""The reference adapter service (``edgelora cloud serve``): FastAPI on uvicorn.

It keeps, under one root directory::

    service_key.pem        the Ed25519 signing key (created on first start, mode 0600)
    service_key.pub        its public half, ``ed25519:<base64>``: what devices pin
    tokens.json            sha256 of each device/user token -> its name
    library/<id>/          one adapter: entry.json (who, what, for which base), adapter.gguf,
                           render/<format>/ (the files served for each format, made on demand)
    jobs/<id>/             job.json (status, progress), examples.jsonl, the trainer's checkpoint

API (every route but /v1/health and /v1/key needs ``Authorization: Bearer <token>``)::

    GET  /v1/health                          service state, key id, bases served
    GET  /v1/key                             the public key
    GET  /v1/library?base=FP                 adapters for a base (shared ones and the caller's own)
    POST /v1/jobs                            {"kind": "examples"|"compose", "base": FP, "name", ...}
    GET  /v1/jobs/{id}                       status and progress
    GET  /v1/adapters/{id}/manifest?format=F signed manifest for format gguf|onnx|peft
    GET  /v1/adapters/{id}/files/{F}/{name}  a file of it (HTTP Range supported)

Jobs wait in a bounded queue and run where the service's runner puts them (`runners`): one at a
time in this process (the default) or as tasks on a Ray cluster. Their work reads and writes only
their directory under jobs/ (`jobs`); a job interrupted by a stop, or by a worker that died, resumes
from the trainer's checkpoint. The service alone holds the key and writes the library.
"""


import hashlib
import json
import os
import re
import secrets
import shutil
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from edgelora._io import atomic_dir, sha256_file, write_bytes_atomic
from edgelora.adapters import LoraAdapter
from edgelora.converters import FORMATS, keys, load_adapter, save_adapter
from edgelora.errors import EdgeloraError, SourceNotFoundError
from edgelora.store import NAME
from edgelora.train import TrainConfig

from . import signing
from . import jobs as _jobs
from .compose import ComposeError, similarities

KEY_FILE, PUB_FILE, TOKENS_FILE = "service_key.pem", "service_key.pub", "tokens.json"
_ID = re.compile(r"^[0-9a-f]{16}$")
MAIN_FILE = keys.ADAPTER_FILES  # PEFT: a directory of files


class ServiceError(EdgeloraError):
    """The adapter service cannot start or do what was asked."""


@dataclass
class Limits:
    max_body_bytes: int = 4 << 20
    max_examples: int = 2000
    max_steps: int = 2000
    max_rank: int = 64
    max_description: int = 2000
    queue_size: int = 8
    rate_per_s: float = 20.0  # per token, sustained
    burst: int = 60


@dataclass
class ServiceConfig:
    root: Path
    bases: list[str]
    limits: Limits = field(default_factory=Limits)
    ttl_s: float = 30 * 86400.0
    threads: int | None = None  # per job; a Ray task asks the cluster for this many CPUs (default 1)
    checkpoint_every: int = 10
    engine: str = "local"  # or "ray"
    ray_address: str | None = None  # "auto", HOST:PORT, or None: a cluster of this machine's cores
    jobs_dir: Path | None = None  # default root/jobs; with Ray, a directory every worker shares


def add_token(root: str | os.PathLike, name: str) -> str:
    """Creates a token for device/user `name` and returns it (only its sha256 is stored)."""
    if not NAME.match(name):
        raise ServiceError(f"token name {name!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-'")
    path = Path(root) / TOKENS_FILE
    tokens = json.loads(path.read_text()) if path.exists() else {}
    token = "elt_" + secrets.token_urlsafe(24)
    tokens[hashlib.sha256(token.encode()).hexdigest()] = {"name": name, "created": signing.iso(time.time())}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, json.dumps(tokens, indent=2).encode())
    os.chmod(path, 0o600)
    return token


class _Bucket:
    """Token-bucket rate limit per caller."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self.state: dict[str, tuple[float, float]] = {}
        self.lock = threading.Lock()

    def take(self, who: str) -> float:
        """0 if allowed, else the seconds to wait."""
        with self.lock:
            now = time.monotonic()
            level, t = self.state.get(who, (float(self.burst), now))
            level = min(self.burst, level + (now - t) * self.rate)
            if level < 1:
                self.state[who] = (level, now)
                return (1 - level) / self.rate
            self.state[who] = (level - 1, now)
            return 0.0


class Interrupted(Exception):
    """The service is stopping: the job's run ends here and resumes at the next start."""


class Library:
    """Adapters the service holds, each bound to one base fingerprint."""

    def __init__(self, root: Path):
        self.root = root / "library"
        self.root.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()

    def entries(self) -> list[dict[str, Any]]:
        out = []
        for p in sorted(self.root.iterdir()):
            if p.is_dir() and not p.name.startswith(".") and (p / "entry.json").exists():
                out.append(json.loads((p / "entry.json").read_text()))
        return sorted(out, key=lambda e: e["created"])

    def entry(self, adapter_id: str) -> dict[str, Any]:
        p = self.root / adapter_id / "entry.json"
        if not _ID.match(adapter_id) or not p.exists():
            raise SourceNotFoundError(f"no adapter {adapter_id} in the library")
        return json.loads(p.read_text())

    def visible(self, fingerprint: str | None, who: str) -> list[dict[str, Any]]:
        return [e for e in self.entries() if (fingerprint is None or e["base_fingerprint"] == fingerprint)
                and (e["public"] or e["owner"] == who)]

    def add(self, adapter: LoraAdapter, config, *, name: str, description: str, owner: str, public: bool,
            method: str, inputs_sha256: str, extra: dict | None = None, adapter_id: str | None = None,
            job: str | None = None) -> dict[str, Any]:
        """Adds `adapter` under a new id, or under `adapter_id`, where an entry already there is kept
        and returned (a job's end reported twice adds it once)."""
        adapter.check_fits(config, adapter.base_fingerprint)
        adapter_id = adapter_id or uuid.uuid4().hex[:16]
        if (self.root / adapter_id / "entry.json").exists():
            return self.entry(adapter_id)
        ranks = sorted(set(adapter.ranks.values()))
        entry = {"id": adapter_id, "name": name, "description": description, "base_fingerprint": adapter.base_fingerprint,
                 "rank": ranks[-1], "alpha": adapter.alpha, "targets": adapter.target_kinds,
                 "modules": len(adapter.tensors), "parameters": adapter.num_parameters(), "method": method,
                 "inputs_sha256": inputs_sha256, "owner": owner, "public": public,
                 "created": signing.iso(time.time()), **({"job": job} if job else {}), **(extra or {})}
        with atomic_dir(self.root / adapter_id) as tmp:
            save_adapter(adapter, tmp / MAIN_FILE["gguf"], "gguf", config)
            (tmp / "entry.json").write_text(json.dumps(entry, indent=2))
        return entry

    def load(self, adapter_id: str, config) -> LoraAdapter:
        e = self.entry(adapter_id)
        a = load_adapter(self.root / adapter_id / MAIN_FILE["gguf"], config)
        a.base_fingerprint, a.name = e["base_fingerprint"], e["name"]
        return a

    def render(self, adapter_id: str, fmt: str, config) -> tuple[Path, dict[str, dict]]:
        """The directory of files served for `fmt`, made once, and their sizes and sha256."""
        out = self.root / adapter_id / "render" / fmt
        with self.lock:
            if not out.exists():
                adapter = self.load(adapter_id, config)
                with atomic_dir(out) as tmp:
                    if fmt == "peft":
                        save_adapter(adapter, tmp, "peft", config)
                    else:
                        save_adapter(adapter, tmp / MAIN_FILE[fmt], fmt, config)
                    files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
                             for p in sorted(tmp.iterdir()) if p.is_file() and p.name != "files.json"}
                    (tmp / "files.json").write_text(json.dumps(files))
        return out, json.loads((out / "files.json").read_text())


class Service:
    def __init__(self, config: ServiceConfig, *, log=print):
        self.config, self.limits, self.log = config, config.limits, log
        root = self.root = Path(config.root)
        root.mkdir(parents=True, exist_ok=True)
        self.key = signing.load_or_create_private_key(root / KEY_FILE)
        self.public_key = signing.public_key_text(self.key)
        if not (root / PUB_FILE).exists():
            write_bytes_atomic(root / PUB_FILE, (self.public_key + "\n").encode())
        self.key_id = signing.key_id(self.key.public_key())
        if not config.bases:
            raise ServiceError("the service needs at least one base model (--base NAME_OR_PATH)")
        self.bases: dict[str, _jobs.Base] = {}
        for src in config.bases:
            b = _jobs.Base(src)
            self.bases[b.fingerprint] = b
        self.library = Library(root)
        self.jobs_dir = Path(config.jobs_dir or root / "jobs")
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.jobs: dict[str, dict[str, Any]] = {}
        self.jobs_lock = threading.Lock()
        self.bucket = _Bucket(self.limits.rate_per_s, self.limits.burst)
        self.stop_event = threading.Event()
        self._persisted: dict[str, float] = {}
        for p in sorted(self.jobs_dir.glob("*/job.json")):
            job = json.loads(p.read_text())
            self.jobs[job["id"]] = job
        from .runners import make_runner

        self.runner = make_runner(self)
        for job in sorted(self.jobs.values(), key=lambda j: j["created"]):
            if job["status"] in ("queued", "running"):  # stopped mid-job: resume from its checkpoint
                if job["status"] == "running":
                    job["restarts"] = job.get("restarts", 0) + 1
                job["status"] = "queued"
                self._save_job(job)
                self.runner.submit(job["id"])

    # -- tokens ---------------------------------------------------------------------------------

    def caller(self, authorization: str | None) -> str | None:
        if not authorization or not authorization.startswith("Bearer "):
            return None
        path = self.root / TOKENS_FILE
        tokens = json.loads(path.read_text()) if path.exists() else {}
        entry = tokens.get(hashlib.sha256(authorization[7:].strip().encode()).hexdigest())
        return entry["name"] if entry else None

    # -- jobs ------------------------------------------------------------------------------------

    def _save_job(self, job: dict, *, force: bool = True) -> None:
        now = time.monotonic()
        if force or now - self._persisted.get(job["id"], 0) > 1.0:
            self._persisted[job["id"]] = now
            write_bytes_atomic(self.jobs_dir / job["id"] / "job.json", json.dumps(job, indent=2).encode())

    def pending(self) -> int:
        return sum(j["status"] in ("queued", "running") for j in self.jobs.values())

    def submit(self, spec: dict[str, Any], who: str) -> dict[str, Any]:
        """Validates a job request and queues it (ServiceError/DataError on a bad request)."""
        from edgelora.train.data import DataError
        from edgelora.train.data import load as load_examples

        L = self.limits
        kind = spec.get("kind")
        if kind not in ("examples", "compose"):
            raise ServiceError("\"kind\" must be \"examples\" (train on them) or \"compose\" (mix library adapters)")
        base = self.bases.get(spec.get("base"))
        if base is None:
            raise SourceNotFoundError(f"this service has no base {spec.get('base')!r}; it serves {', '.join(self.bases)}")
        name = spec.get("name", "cloud")
        if not isinstance(name, str) or not NAME.match(name):
            raise ServiceError(f"adapter name {name!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-'")
        description = spec.get("description") or ""
        if not isinstance(description, str) or len(description) > L.max_description:
            raise ServiceError(f"\"description\" must be a string of at most {L.max_description} characters")
        examples = spec.get("examples") or []
        if not isinstance(examples, list) or len(examples) > L.max_examples:
            raise ServiceError(f"\"examples\" must be a list of at most {L.max_examples} chats or prompt/completion pairs")
        params = JobParams.from_request(spec, L)
        if kind == "examples" and not examples:
            raise ServiceError("a job of kind \"examples\" needs at least one example")
        if kind == "compose":
            if not description and not examples:
                raise ServiceError("a composition needs a task description, examples, or both")
            components = self._components(base.fingerprint, who, description, bool(examples))
        if self.pending() >= L.queue_size:  # before writing and tokenizing anything (checked again when queued)
            raise QueueFullError(f"the job queue is full ({L.queue_size} jobs); retry later")
        job_id = uuid.uuid4().hex[:16]
        jdir = self.jobs_dir / job_id
        jdir.mkdir()
        data = "".join(json.dumps(e) + "\n" for e in examples).encode()
        write_bytes_atomic(jdir / "examples.jsonl", data)
        if examples:
            try:
                load_examples(jdir / "examples.jsonl", base.tokenizer, params.seq_len)
            except DataError as e:
                shutil.rmtree(jdir, ignore_errors=True)
                raise DataError(str(e).replace(f"{jdir / 'examples.jsonl'}:", "example ")) from None
        if kind == "compose":  # the job reads its components from its own directory, not the library
            cdir = jdir / _jobs.COMPONENTS
            cdir.mkdir()
            for e in components:
                shutil.copyfile(self.library.root / e["id"] / MAIN_FILE["gguf"], cdir / f"{e['id']}.gguf")
            write_bytes_atomic(cdir / "components.json", json.dumps(components).encode())
        job = {"id": job_id, "kind": kind, "base": base.fingerprint, "owner": who, "name": name,
               "description": description, "share": bool(spec.get("share", False)), "params": asdict(params),
               "examples": len(examples), "inputs_sha256": hashlib.sha256(data + description.encode()).hexdigest(),
               "status": "queued", "progress": {}, "created": signing.iso(time.time()), "restarts": 0,
               "adapter_id": None, "error": None}
        with self.jobs_lock:
            if self.pending() >= L.queue_size:
                shutil.rmtree(jdir, ignore_errors=True)
                raise QueueFullError(f"the job queue is full ({L.queue_size} jobs); retry later")
            self.jobs[job_id] = job
            self._save_job(job)
        self.runner.submit(job_id)
        return job

    def _components(self, fingerprint: str, who: str, description: str, searched: bool) -> list[dict[str, str]]:
        """The library adapters a composition may mix: all the caller sees (compositions aside), or
        for a search on examples the 8 closest by description (else the newest)."""
        visible = self.library.visible(fingerprint, who)
        if not visible:
            raise ServiceError(f"the library has no adapters for base {fingerprint[:23]}; "
                               "send examples with kind \"examples\" instead")
        entries = [e for e in visible if e["method"] != "compose"]
        if not entries:
            raise ComposeError("the library has only compositions for this base, nothing to compose from")
        docs = [f"{e['name'].replace('-', ' ').replace('_', ' ')} {e['description']}" for e in entries]
        if searched and len(entries) > 8:
            keep = sorted(similarities(description, docs).argsort(kind="stable")[::-1][:8]) \
                if description else list(range(len(entries) - 8, len(entries)))
            entries, docs = [entries[i] for i in keep], [docs[i] for i in keep]
        out = [{"id": e["id"], "name": e["name"], "doc": d, "created": e["created"]} for e, d in zip(entries, docs)]
        return sorted(out, key=lambda e: (e["name"], e["created"], e["id"]))  # a search's path follows this order

    # -- what runners report -----------------------------------------------------------------------

    def started(self, job: dict) -> None:
        job["status"], job["started"] = "running", signing.iso(time.time())
        self._save_job(job)

    def progress(self, job: dict, info: dict, *, check_stop: bool = True) -> None:
        """A progress report from the job's run; in this process's runs, the place a stop ends them."""
        if check_stop and self.stop_event.is_set():
            raise Interrupted()
        info = dict(info)
        job["attempts"] = info.pop("attempt", job.get("attempts", 1))
        if "resumed_at_step" in info:
            job["resumed_at_step"] = info.pop("resumed_at_step")
        if info:
            job["progress"] = info
        self._save_job(job, force=False)

    def finish(self, job: dict) -> None:
        """Adds the job's result to the library (once) and marks the job done."""
        base = self.bases[job["base"]]
        try:
            adapter, result = _jobs.read_result(self.jobs_dir / job["id"], job, base.config)
            entry = self.library.add(adapter, base.config, name=job["name"], description=job["description"],
                                     owner=job["owner"], public=job["share"], inputs_sha256=job["inputs_sha256"],
                                     method=result["method"], extra=result["extra"],
                                     adapter_id=_jobs.adapter_id(job["id"]), job=job["id"])
        except EdgeloraError as e:
            return self.failed(job, f"its result was refused: {e}")
        job.update(status="done", adapter_id=entry["id"], finished=signing.iso(time.time()))
        self._save_job(job)
        self.log(f"job {job['id']} ({job['kind']}): done")

    def failed(self, job: dict, error: str) -> None:
        job.update(status="failed", error=error, finished=signing.iso(time.time()))
        self._save_job(job)
        self.log(f"job {job['id']} ({job['kind']}): failed: {error}")

    # -- serving ---------------------------------------------------------------------------------

    def signed_manifest(self, adapter_id: str, fmt: str, who: str) -> dict[str, Any]:
        entry = self._entry_for(adapter_id, who)
        if fmt not in FORMATS:
            raise ServiceError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        _, files = self.library.render(adapter_id, fmt, self.bases[entry["base_fingerprint"]].config)
        manifest = {
            "adapter_id": adapter_id, "name": entry["name"], "description": entry["description"],
            "base_fingerprint": entry["base_fingerprint"], "format": fmt, "rank": entry["rank"],
            "alpha": entry["alpha"], "targets": entry["targets"], "modules": entry["modules"],
            "parameters": entry["parameters"], "files": files,
            "provenance": {"method": entry["method"], "inputs_sha256": entry["inputs_sha256"],
                           "created": entry["created"], "service_key_id": self.key_id,
                           **({"components": entry["components"]} if "components" in entry else {})},
        }
        return signing.sign(manifest, self.key, ttl_s=self.config.ttl_s)

    def file_path(self, adapter_id: str, fmt: str, name: str, who: str) -> Path:
        entry = self._entry_for(adapter_id, who)
        if fmt not in FORMATS:
            raise SourceNotFoundError(f"adapter {adapter_id} has no file {fmt}/{name}")
        out, files = self.library.render(adapter_id, fmt, self.bases[entry["base_fingerprint"]].config)
        if name not in files:  # only the files its manifest lists
            raise SourceNotFoundError(f"adapter {adapter_id} has no file {fmt}/{name}")
        return out / name

    def _entry_for(self, adapter_id: str, who: str) -> dict[str, Any]:
        entry = self.library.entry(adapter_id)
        if not (entry["public"] or entry["owner"] == who) or entry["base_fingerprint"] not in self.bases:
            raise SourceNotFoundError(f"no adapter {adapter_id} in the library")
        return entry

    def close(self) -> None:
        self.stop_event.set()
        self.runner.close()


class ClusterError(ServiceError):
    """The cluster the service was told to run jobs on cannot be used (Ray missing or unreachable)."""
    exit_code = 1


class QueueFullError(ServiceError):
    """The job queue is full."""


_TRAIN = {f.name: f.default for f in fields(TrainConfig)}


@dataclass(frozen=True)
class JobParams:
    """A job's parameters, validated from a request. The training defaults are TrainConfig's (the
    one source); `budget` is the number of loss evaluations a composition search may spend."""
    steps: int = _TRAIN["steps"]
    rank: int = _TRAIN["rank"]
    lr: float = _TRAIN["lr"]
    seq_len: int = _TRAIN["seq_len"]
    seed: int = _TRAIN["seed"]
    budget: int = 40

    @classmethod
    def from_request(cls, spec: dict[str, Any], limits: "Limits") -> "JobParams":
        p = cls(**{f.name: spec[f.name] for f in fields(cls) if f.name in spec})
        for k, hi in (("steps", limits.max_steps), ("rank", limits.max_rank), ("seq_len", 4096), ("budget", 400)):
            v = getattr(p, k)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= hi:
                raise ServiceError(f"\"{k}\" must be an integer from 1 to {hi}")
        if not isinstance(p.seed, int) or isinstance(p.seed, bool):
            raise ServiceError("\"seed\" must be an integer")
        if not isinstance(p.lr, (int, float)) or isinstance(p.lr, bool) or not 0 < p.lr < 1:
            raise ServiceError("\"lr\" must be a number between 0 and 1")
        return p


def create_app(service: Service):
    from fastapi import Depends, FastAPI, HTTPException, Request
    from fastapi.responses import FileResponse, JSONResponse

    from edgelora.train.data import DataError

    app = FastAPI(title="edgelora adapter service", version="1", docs_url=None, redoc_url=None)

    @app.exception_handler(EdgeloraError)
    async def _edgelora_error(request, exc: EdgeloraError):
        status = 404 if isinstance(exc, SourceNotFoundError) else 503 if isinstance(exc, QueueFullError) else \
            422 if isinstance(exc, (DataError, ServiceError, ComposeError)) else 400
        headers = {"Retry-After": "5"} if status == 503 else None
        return JSONResponse({"detail": str(exc)}, status_code=status, headers=headers)

    def caller(request: Request) -> str:
        who = service.caller(request.headers.get("authorization"))
        if who is None:
            raise HTTPException(401, "missing or unknown token; ask the service's operator for one "
                                     "(edgelora cloud token)", headers={"WWW-Authenticate": "Bearer"})
        wait = service.bucket.take(who)
        if wait:
            raise HTTPException(429, f"too many requests for token {who!r}; retry in {wait:.1f}s",
                                headers={"Retry-After": str(max(1, round(wait)))})
        return who

    async def json_body(request: Request) -> Any:
        limit = service.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise HTTPException(413, f"request body of {int(declared)} bytes is over the limit of {limit} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPException(413, f"request body is over the limit of {limit} bytes")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks) or b"null")
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise HTTPException(400, f"request body is not JSON ({e})") from None

    @app.get("/v1/health")
    def health():
        return {"status": "ok", "key_id": service.key_id, "bases": list(service.bases),
                "queued": service.pending(), "queue_size": service.limits.queue_size,
                "max_body_bytes": service.limits.max_body_bytes}

    @app.get("/v1/key")
    def key():
        return {"public_key": service.public_key, "key_id": service.key_id}

    @app.get("/v1/library")
    def library(base: str | None = None, who: str = Depends(caller)):
        keys = ("id", "name", "description", "base_fingerprint", "rank", "targets", "method", "created", "public")
        return {"adapters": [{k: e[k] for k in keys} for e in service.library.visible(base, who)]}

    @app.post("/v1/jobs", status_code=201)
    def create_job(body: Any = Depends(json_body), who: str = Depends(caller)):
        if not isinstance(body, dict):
            raise HTTPException(400, "the job request must be a JSON object")
        return _public(service.submit(body, who))

    @app.get("/v1/jobs/{job_id}")
    def job_status(job_id: str, who: str = Depends(caller)):
        job = service.jobs.get(job_id)
        if job is None or job["owner"] != who:
            raise HTTPException(404, f"no job {job_id}")
        return _public(job)

    @app.get("/v1/adapters/{adapter_id}/manifest")
    def manifest(adapter_id: str, format: str = "gguf", who: str = Depends(caller)):  # noqa: A002
        return service.signed_manifest(adapter_id, format, who)

    @app.get("/v1/adapters/{adapter_id}/files/{fmt}/{name}")
    def file(adapter_id: str, fmt: str, name: str, who: str = Depends(caller)):
        return FileResponse(service.file_path(adapter_id, fmt, name, who), media_type="application/octet-stream")

    return app


def _public(job: dict) -> dict:
    return {k: v for k, v in job.items() if k not in ("owner", "worker")}


class Running:
    """A service running in a thread of this process (for the quickstart, benchmarks and tests)."""

    def __init__(self, config: ServiceConfig, host: str = "127.0.0.1", port: int = 0, log=None):
        import socket

        import uvicorn

        self.service = Service(config, log=log or (lambda *_: None))
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        self.port = sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.service), log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise ServiceError(f"the adapter service did not start on {self.url}")
            time.sleep(0.02)

    @property
    def public_key(self) -> str:
        return self.service.public_key

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.service.close()

    def __enter__(self) -> "Running":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(config: ServiceConfig, host: str = "127.0.0.1", port: int = 8470) -> None:
    """Runs the service in the foreground until interrupted."""
    import uvicorn

    service = Service(config)
    print(f"edgelora adapter service on http://{host}:{port}")
    print(f"  root:       {config.root}")
    print(f"  bases:      {', '.join(f'{fp[:23]} ({b.label})' for fp, b in service.bases.items())}")
    print(f"  public key: {service.public_key}  (devices pin it: edgelora cloud connect --key ...)")
    print(f"  library:    {len(service.library.entries())} adapters; jobs queued: {service.pending()}")
    print(f"  jobs:       {service.runner.describe()} in {service.jobs_dir}")
    try:
        uvicorn.run(create_app(service), host=host, port=port, log_level="warning")
    finally:
        service.close()


def library_add(root: str | os.PathLike, adapter_path: str | os.PathLike, base: str, *, name: str,
                description: str) -> dict[str, Any]:
    """Adds an adapter file (any format) to a service's library, shared with every token, for `base`
    (a model name or path, or a bundle): the operator's way to seed compositions."""
    if not NAME.match(name):
        raise ServiceError(f"adapter name {name!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-'")
    b = _jobs.Base(base)
    adapter = load_adapter(adapter_path, b.config)
    adapter.check_fits(b.config, b.fingerprint)
    adapter.base_fingerprint, adapter.name = b.fingerprint, name
    return Library(Path(root)).add(adapter, b.config, name=name, description=description, owner="", public=True,
                                   method=str(adapter.provenance.get("method", "import")),
                                   inputs_sha256=sha256_file(adapter_path) if Path(adapter_path).is_file() else "")
