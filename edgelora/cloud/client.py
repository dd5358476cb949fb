"""The device side of the adapter service: request, watch, pull, verify, install; offline-first.

    client = CloudClient.for_bundle(bundle)           # url, token and pinned key from bundle/cloud.json
    job = client.request(description="answer like a pirate", name="pirate")
    client.wait(job["id"])
    client.pull(job["id"])                             # verified, then installed atomically

Nothing reaches the adapter store before the manifest's Ed25519 signature verifies against the
pinned key, its dates are valid, its base is this bundle's, and every downloaded file has the signed
size and sha256. Downloads resume where they stopped (HTTP Range) and retry with backoff; with the
service unreachable every call raises `ServiceUnreachableError` and the installed adapters keep
working. Jobs requested from this bundle are remembered in ``cloud.json`` so `sync` can catch up.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable

from edgelora._io import sha256_file, write_bytes_atomic
from edgelora.adapters import AdapterBaseMismatchError
from edgelora.converters import load_adapter
from edgelora.errors import EdgeloraError, SourceNotFoundError

from . import signing

STATE_FILE = "cloud.json"
PARTIAL_DIR = ".cloud-partial"


class CloudError(EdgeloraError):
    """The adapter service refused a request or a job failed."""


class ServiceUnreachableError(CloudError):
    """The service cannot be reached (offline, stopped, wrong URL)."""

    exit_code = 1


class AuthError(CloudError):
    """The service refused the device's token."""


class TamperedError(CloudError):
    """A downloaded file does not match its signed manifest."""


def _unreachable(url: str, reason: object) -> ServiceUnreachableError:
    return ServiceUnreachableError(
        f"cannot reach the adapter service at {url} ({reason}); installed adapters keep working offline; "
        "run `edgelora cloud sync` once it is reachable again")


class CloudClient:
    def __init__(self, url: str, token: str, public_key: str, *, bundle=None, timeout: float = 15.0,
                 retries: int = 4, backoff_s: float = 0.5, chunk_bytes: int = 1 << 16,
                 on_chunk: Callable[[str, int], None] | None = None):
        self.url = url.rstrip("/")
        self.token = token
        self.key = signing.load_public_key(public_key)
        self.key_text = public_key
        self.key_id = signing.key_id(self.key)
        self.bundle = bundle
        self.timeout, self.retries, self.backoff_s, self.chunk_bytes = timeout, retries, backoff_s, chunk_bytes
        self.on_chunk = on_chunk  # (file name, bytes so far): progress, or a test's way to cut a download

    # -- set-up -----------------------------------------------------------------------------------

    @staticmethod
    def connect(bundle, url: str, token: str, public_key: str) -> "CloudClient":
        """Pins `public_key` for `bundle` and records the service's url and the token in
        ``bundle/cloud.json`` (mode 0600); later calls use `CloudClient.for_bundle`."""
        client = CloudClient(url, token, public_key, bundle=bundle)
        try:
            theirs = client.health()["key_id"]
        except ServiceUnreachableError:
            theirs = None  # pin now, check at the first pull
        if theirs is not None and theirs != client.key_id:
            raise signing.SignatureError(f"the service at {client.url} signs with key {theirs}, not the key given "
                                         f"({client.key_id}); check the key with the service's operator")
        state = client._state()
        state.update(url=client.url, token=token, public_key=signing.public_key_line(public_key))
        client._save_state(state)
        return client

    @classmethod
    def for_bundle(cls, bundle, **kw) -> "CloudClient":
        path = Path(bundle.root) / STATE_FILE
        if not path.exists():
            raise CloudError(f"{bundle.root} is not connected to an adapter service; run "
                             "`edgelora cloud connect BUNDLE --url URL --token TOKEN --key KEY` first")
        state = json.loads(path.read_text())
        return cls(state["url"], state["token"], state["public_key"], bundle=bundle, **kw)

    def _state(self) -> dict[str, Any]:
        path = Path(self.bundle.root) / STATE_FILE
        return json.loads(path.read_text()) if path.exists() else {"jobs": {}}

    def _save_state(self, state: dict[str, Any]) -> None:
        path = Path(self.bundle.root) / STATE_FILE
        write_bytes_atomic(path, json.dumps(state, indent=2).encode())
        os.chmod(path, 0o600)

    def remembered_jobs(self) -> dict[str, dict[str, Any]]:
        """The jobs this bundle requested, as last seen (works offline)."""
        return self._state().get("jobs", {})

    def _remember(self, job: dict[str, Any], **extra) -> None:
        if self.bundle is None:
            return
        state = self._state()
        rec = state.setdefault("jobs", {}).setdefault(job["id"], {})
        new = {**rec, **{k: job.get(k) for k in ("id", "kind", "name", "status", "adapter_id", "error", "created")}, **extra}
        if new != rec:  # `wait` polls status: write only what changed
            rec.update(new)
            self._save_state(state)

    # -- HTTP -------------------------------------------------------------------------------------

    def _open(self, method: str, path: str, body: Any = None, headers: dict | None = None):
        """An open response (retrying connection errors, 5xx and 429 with backoff); errors mapped."""
        data = None if body is None else json.dumps(body).encode()
        hdrs = {"Authorization": f"Bearer {self.token}", "Accept": "application/json", **(headers or {})}
        if data is not None:
            hdrs["Content-Type"] = "application/json"
        last: object = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.backoff_s * 2 ** (attempt - 1), 8.0))
            req = urllib.request.Request(self.url + path, data=data, headers=hdrs, method=method)
            try:
                return urllib.request.urlopen(req, timeout=self.timeout)
            except urllib.error.HTTPError as e:
                detail = _detail(e)
                if e.code in (429, 502, 503, 504) and attempt < self.retries:
                    last = f"HTTP {e.code}: {detail}"
                    retry_after = e.headers.get("Retry-After")
                    if retry_after and retry_after.isdigit():
                        time.sleep(min(int(retry_after), 10))
                    continue
                if e.code == 401:
                    raise AuthError(f"the adapter service refused this device's token ({detail})") from None
                if e.code == 404:
                    raise SourceNotFoundError(f"the adapter service: {detail}") from None
                raise CloudError(f"the adapter service refused the request (HTTP {e.code}): {detail}") from None
            except (urllib.error.URLError, ConnectionError, socket.timeout, http.client.HTTPException) as e:
                last = getattr(e, "reason", None) or e
                if method != "GET" and not isinstance(getattr(e, "reason", None), ConnectionRefusedError):
                    break  # the request may have been received: do not send a job twice
        raise _unreachable(self.url, last)

    def _json(self, method: str, path: str, body: Any = None) -> Any:
        with self._open(method, path, body) as r:
            try:
                return json.loads(r.read())
            except (json.JSONDecodeError, http.client.HTTPException, ConnectionError, socket.timeout) as e:
                raise _unreachable(self.url, f"a broken reply: {e}") from None

    # -- API --------------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return self._json("GET", "/v1/health")

    def library(self, base: str | None = None) -> list[dict[str, Any]]:
        base = base or (self.bundle.fingerprint if self.bundle is not None else None)
        q = f"?base={urllib.parse.quote(base)}" if base else ""
        return self._json("GET", f"/v1/library{q}")["adapters"]

    def request(self, *, name: str, examples: str | os.PathLike | list | None = None, description: str = "",
                base: str | None = None, share: bool = False, **params) -> dict[str, Any]:
        """Asks for an adapter: trained on `examples` (a JSONL path or a list of chats), or composed
        from the library (`description`, optionally with examples: pass kind="compose")."""
        if isinstance(examples, (str, os.PathLike)):
            p = Path(examples)
            if not p.exists():
                raise SourceNotFoundError(f"no such examples file: {p}")
            lines = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
            try:
                examples = [json.loads(ln) for ln in lines]
            except json.JSONDecodeError as e:
                raise CloudError(f"{p}: not JSONL ({e}); one JSON chat per line") from None
        kind = params.pop("kind", None) or ("examples" if examples and not description else "compose")
        body = {"kind": kind, "base": base or self.bundle.fingerprint, "name": name, "description": description,
                "examples": examples or [], "share": share, **params}
        size, limit = len(json.dumps(body)), self.health().get("max_body_bytes")
        if limit and size > limit:  # the service would cut the upload off; say why instead
            raise CloudError(f"the request is {size:,} bytes, over the service's limit of {limit:,} bytes; "
                             "send fewer or shorter examples")
        job = self._json("POST", "/v1/jobs", body)
        self._remember(job)
        return job

    def status(self, job_id: str) -> dict[str, Any]:
        job = self._json("GET", f"/v1/jobs/{urllib.parse.quote(job_id)}")
        self._remember(job)
        return job

    def wait(self, job_id: str, *, timeout: float = 3600.0, poll_s: float = 0.25,
             progress: Callable[[dict], None] | None = None) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            job = self.status(job_id)
            if progress:
                progress(job)
            if job["status"] == "done":
                return job
            if job["status"] == "failed":
                raise CloudError(f"job {job_id} failed on the service: {job['error']}")
            if time.monotonic() > deadline:
                raise CloudError(f"job {job_id} is still {job['status']} after {timeout:.0f}s; check later with `edgelora cloud status`")
            time.sleep(poll_s)

    def pull(self, job_or_adapter: str, name: str | None = None, *, fmt: str | None = None,
             replace: bool = False) -> dict[str, Any]:
        """Downloads, verifies and installs an adapter (by job id or adapter id) into the bundle's
        store; returns the store's manifest. Nothing is installed unless every check passes."""
        bundle = self.bundle
        if bundle is None:
            raise CloudError("pulling an adapter needs a bundle to install it into")
        state = self._state()
        try:
            job = self.status(job_or_adapter)
        except SourceNotFoundError:
            if job_or_adapter in state.get("jobs", {}):
                raise
            job = None  # not a job of ours: an adapter id from the library
        if job is not None:
            if job["status"] != "done":
                raise CloudError(f"job {job_or_adapter} is {job['status']}" +
                                 (f": {job['error']}" if job.get("error") else "; pull it when it is done"))
            adapter_id, name = job["adapter_id"], name or job["name"]
        else:
            adapter_id = job_or_adapter
        fmt = fmt or ("gguf" if "gguf" in bundle.backends else "onnx")
        envelope = self._json("GET", f"/v1/adapters/{adapter_id}/manifest?format={fmt}")
        manifest = self.verify(envelope, adapter_id=adapter_id, fmt=fmt)
        name = name or manifest["name"]
        files = self._download_all(adapter_id, fmt, manifest["files"])
        try:
            path = files[0].parent if fmt == "peft" else next(p for p in files if p.suffix in (".gguf", ".onnx_adapter"))
            adapter = load_adapter(path, bundle.config)
            if adapter.base_fingerprint not in (None, manifest["base_fingerprint"]):
                raise AdapterBaseMismatchError(f"adapter file names base {adapter.base_fingerprint}, its signed manifest "
                                               f"{manifest['base_fingerprint']}; refusing it")
            if sorted(adapter.target_kinds) != sorted(manifest["targets"]) or adapter.num_parameters() != manifest["parameters"]:
                raise TamperedError("the adapter file's targets or size differ from its signed manifest; refusing it")
            adapter.provenance = {**manifest["provenance"], "cloud": {
                "service": self.url, "key_id": self.key_id, "adapter_id": adapter_id, "format": fmt,
                "signed_manifest": manifest, "signature": envelope["signature"]}}
            installed = bundle.store.install(adapter, name, replace=replace)
        finally:
            shutil.rmtree(files[0].parent, ignore_errors=True)
        for jid, rec in self.remembered_jobs().items():  # as `status` above left them
            if rec.get("adapter_id") == adapter_id:
                self._remember({**rec, "id": jid}, installed_as=name)
        return installed

    def sync(self) -> list[dict[str, Any]]:
        """Catches up after being offline: every job this bundle requested that is done and not yet
        installed is pulled; returns one record per remembered job."""
        out = []
        for job_id, rec in list(self._state().get("jobs", {}).items()):
            if rec.get("installed_as") or rec.get("refused"):
                out.append({**rec, "action": f"installed as {rec['installed_as']}" if rec.get("installed_as")
                            else f"refused: {rec['refused']}"})
                continue
            job = self.status(job_id)
            if job["status"] == "done":
                name = rec.get("name") or job["name"]
                try:
                    self.pull(job_id, name, replace=name in self.bundle.store.names())
                except ServiceUnreachableError:
                    raise
                except EdgeloraError as e:  # refused (signature, base, hashes): say so, go on with the rest
                    self._remember(job, refused=str(e))
                    out.append({**job, "action": f"refused: {e}"})
                    continue
                out.append({**job, "action": f"installed as {name}"})
            else:
                out.append({**job, "action": job["status"] + (f": {job['error']}" if job.get("error") else "")})
        return out

    # -- verification and download ---------------------------------------------------------------

    def verify(self, envelope: Any, *, adapter_id: str | None = None, fmt: str | None = None) -> dict[str, Any]:
        """The signed manifest if it verifies and is for this bundle's base; else an error."""
        manifest = signing.verify(envelope, self.key)
        if adapter_id and manifest.get("adapter_id") != adapter_id or fmt and manifest.get("format") != fmt:
            raise signing.SignatureError(f"the service signed a manifest for {manifest.get('adapter_id')}/{manifest.get('format')}, "
                                         f"not the requested {adapter_id}/{fmt}; refusing it")
        if self.bundle is not None and manifest.get("base_fingerprint") != self.bundle.fingerprint:
            raise AdapterBaseMismatchError(
                f"adapter {manifest.get('name')} was made for base {manifest.get('base_fingerprint')}, this bundle's base is "
                f"{self.bundle.fingerprint}; request one for this base")
        files = manifest.get("files")
        if not isinstance(files, dict) or not files or any(
                "/" in n or n.startswith(".") or not isinstance(i, dict) or not isinstance(i.get("size"), int)
                or not isinstance(i.get("sha256"), str) for n, i in files.items()):
            raise signing.SignatureError("the signed manifest lists no usable files; refusing it")
        return manifest

    def _download_all(self, adapter_id: str, fmt: str, files: dict[str, dict]) -> list[Path]:
        partial = Path(self.bundle.store.root) / PARTIAL_DIR / f"{adapter_id}-{fmt}"
        partial.mkdir(parents=True, exist_ok=True)
        paths = []
        try:
            for fname, info in files.items():
                p = partial / fname
                self._download(f"/v1/adapters/{adapter_id}/files/{fmt}/{fname}", p, info["size"])
                if sha256_file(p) != info["sha256"]:
                    p.unlink()
                    raise TamperedError(f"{fname} does not match the sha256 its signed manifest gives; "
                                        "refusing it (the download was altered or corrupted)")
                paths.append(p)
        except EdgeloraError as e:
            if not isinstance(e, ServiceUnreachableError):  # keep a partial download for resuming
                shutil.rmtree(partial, ignore_errors=True)
            raise
        return paths

    def _download(self, path: str, dest: Path, size: int) -> None:
        """Fetches into `dest`, continuing a partial file with a Range request, retrying with backoff."""
        last: object = None
        for attempt in range(self.retries + 1):
            have = dest.stat().st_size if dest.exists() else 0
            if have > size:
                dest.unlink()
                have = 0
            if have == size:
                return
            if attempt:
                time.sleep(min(self.backoff_s * 2 ** (attempt - 1), 8.0))
            r = self._open("GET", path, headers={"Range": f"bytes={have}-"} if have else None)  # retries itself
            with r:
                mode = "ab" if have and r.status == 206 else "wb"
                got = have if mode == "ab" else 0
                try:
                    with open(dest, mode) as f:
                        while block := r.read(self.chunk_bytes):
                            if got + len(block) > size:
                                raise TamperedError(f"{dest.name} is longer than its signed size of {size} bytes; refusing it")
                            f.write(block)
                            got += len(block)
                            if self.on_chunk:
                                self.on_chunk(dest.name, got)
                except (http.client.HTTPException, ConnectionError, socket.timeout, urllib.error.URLError) as e:
                    last = e  # cut mid-stream: continue from what arrived
                    continue
            if got == size:
                return
            last = f"the connection closed after {got} of {size} bytes"
        raise _unreachable(self.url, f"download of {dest.name} did not finish: {last}")


def _detail(e: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(e.read() or b"{}")
        return str(body.get("detail", body)) if isinstance(body, dict) else str(body)
    except (json.JSONDecodeError, OSError, http.client.HTTPException):
        return e.reason or f"HTTP {e.code}"
