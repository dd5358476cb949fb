"""Where the service's jobs run.

- `LocalRunner` (the default): one job at a time in a thread of the service's process. Nothing to
  install, one machine.
- `RayRunner` (``--engine ray``, extra ``edgelora[ray]``): each job is a Ray task that asks for
  `threads` CPUs, so a cluster runs as many at once as it has CPUs for. A worker process that dies is
  replaced and the task retried (`max_retries`); the retry resumes from the job's checkpoint in the
  shared jobs directory. Worker processes are reused, and each keeps the bases it opened.

Both hand the service the same three events: progress, a result in the job's directory, a failure.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from . import jobs

if TYPE_CHECKING:
    from .service import Service

ENGINES = ("local", "ray")


def make_runner(service: "Service"):
    engine = service.config.engine
    if engine == "local":
        return LocalRunner(service)
    if engine == "ray":
        return RayRunner(service, service.config.ray_address)
    from .service import ServiceError

    raise ServiceError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")


class LocalRunner:
    """Jobs one at a time in a thread of the service's process."""

    def __init__(self, service: "Service"):
        self.service = service
        self.queue: queue.Queue[str] = queue.Queue()
        self.thread = threading.Thread(target=self._work, name="edgelora-jobs", daemon=True)
        self.thread.start()

    def describe(self) -> str:
        return "one at a time in this process"

    def submit(self, job_id: str) -> None:
        self.queue.put(job_id)

    def _work(self) -> None:
        from .service import Interrupted

        svc = self.service
        while not svc.stop_event.is_set():
            try:
                job_id = self.queue.get(timeout=0.2)
            except queue.Empty:
                continue
            job = svc.jobs[job_id]
            svc.started(job)
            try:
                jobs.execute(job, svc.jobs_dir / job_id, svc.bases[job["base"]], threads=svc.config.threads,
                             checkpoint_every=svc.config.checkpoint_every, progress=lambda i, j=job: svc.progress(j, i))
            except Interrupted:
                return  # stays "running": resumed at the next start
            except Exception as e:  # noqa: BLE001  (the caller's error or a bug: said on the job, serving goes on)
                svc.failed(job, jobs.error_of(e))
            else:
                svc.finish(job)

    def close(self) -> None:
        self.thread.join(timeout=30)


_BASES: dict[str, jobs.Base] = {}  # per Ray worker process: the bases it has opened


def _ray_job(jdir: str, job: dict, base_label: str, threads: int, checkpoint_every: int) -> dict:
    """A job as a Ray task. Application errors come back as {"error": ...} (retrying cannot mend
    them); only a dying process makes Ray retry."""
    try:
        base = _BASES.get(base_label)
        if base is None:
            base = _BASES[base_label] = jobs.Base(base_label)
        if base.fingerprint != job["base"]:
            return {"error": f"the base at {base_label} on {socket.gethostname()} is {base.fingerprint[:23]}, "
                             f"not {job['base'][:23]}: every node needs the service's bases at the same paths"}
        report = jobs.ProgressFile(Path(jdir), pid=os.getpid(), host=socket.gethostname())
        jobs.execute(job, Path(jdir), base, threads=threads, checkpoint_every=checkpoint_every, progress=report)
        report.flush()
    except Exception as e:  # noqa: BLE001  (reported on the job, not lost in a worker's log)
        return {"error": jobs.error_of(e)}
    return {}


def _token_available() -> bool:
    """A Ray cluster token this process could present (where Ray's own loader looks)."""
    return bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
                or (Path.home() / ".ray" / "auth_token").is_file())


def _probe(address: str | None) -> None:
    """Refuses at once a HOST:PORT nobody listens on (ray.init would wait minutes for it)."""
    from .service import ClusterError

    if not address or address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"--ray-address must be 'auto' or HOST:PORT (the head's GCS port, 6379 by default), got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise ClusterError(f"no Ray cluster answers at {address} ({e.strerror or e}); start one there with "
                           "`ray start --head` or fix --ray-address") from None


class RayRunner:
    """Jobs as Ray tasks on a cluster (`address`: "auto", HOST:PORT, or None to start one here)."""

    def __init__(self, service: "Service", address: str | None = None, max_retries: int = 3):
        from .service import ClusterError

        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise ClusterError("--engine ray needs Ray, which is not installed: pip install 'edgelora[ray]'")
        _probe(address)
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # Ray reports usage unless told not to; we do not opt users in
        if address and "RAY_AUTH_MODE" not in os.environ and _token_available():
            # `ray start` turns token authentication on when it finds a token, and ray.init does the
            # same for "auto", but not for an explicit address; a token client also joins a cluster without it.
            # Ray reads it when imported, so before that.
            os.environ["RAY_AUTH_MODE"] = "token"
        import ray
        self.ray, self.service, self.max_retries = ray, service, max_retries
        self.threads = service.config.threads or 1
        try:
            ray.init(address=address, namespace="edgelora", include_dashboard=False, log_to_driver=False,
                     logging_level="error", ignore_reinit_error=True)
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = f"at {address}" if address else "here"
            raise ClusterError(f"cannot start or reach a Ray cluster {where} ({str(e).splitlines()[0]}); start one with "
                               "`ray start --head`, and if it uses token authentication give the service its token "
                               "(~/.ray/auth_token, RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH)") from None
        self.task = ray.remote(num_cpus=self.threads, max_retries=max_retries)(_ray_job)
        self.inflight: dict = {}  # ObjectRef -> job id
        self.seen: dict[str, float] = {}  # job id -> mtime of the progress.json last read
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._watch, name="edgelora-ray", daemon=True)
        self.thread.start()

    def describe(self) -> str:
        cpus = self.ray.cluster_resources().get("CPU", 0)
        return f"Ray tasks of {self.threads} CPU(s) on a cluster of {cpus:g} CPUs ({len(self.ray.nodes())} nodes)"

    def submit(self, job_id: str) -> None:
        svc = self.service
        job = svc.jobs[job_id]
        jdir = svc.jobs_dir / job_id
        (jdir / jobs.PROGRESS).unlink(missing_ok=True)  # a report from an earlier run is not this one's
        ref = self.task.remote(str(jdir), job, svc.bases[job["base"]].label, self.threads, svc.config.checkpoint_every)
        with self.lock:
            self.inflight[ref] = job_id

    def _watch(self) -> None:
        svc = self.service
        while not svc.stop_event.is_set():
            with self.lock:
                refs = list(self.inflight)
            if not refs:
                svc.stop_event.wait(0.2)
                continue
            try:
                self._watch_once(refs)
            except Exception as e:  # noqa: BLE001  (a lost cluster, a bug: said, and the watch goes on)
                svc.log(f"watching the Ray jobs: {type(e).__name__}: {e}")
                svc.stop_event.wait(2.0)

    def _watch_once(self, refs: list) -> None:
        ray, svc = self.ray, self.service
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0.2)
        for ref in refs:
            self._read_progress(self.inflight[ref])
        for ref in ready:
            with self.lock:
                job_id = self.inflight.pop(ref)
            job = svc.jobs[job_id]
            try:
                out = ray.get(ref)
            except ray.exceptions.RayError as e:
                if svc.stop_event.is_set():
                    return  # the service is stopping: the job resumes at the next start
                svc.failed(job, f"its worker died {self.max_retries + 1} times "
                                f"({type(e).__name__}: {str(e).splitlines()[0][:200]})")
                continue
            if out.get("error"):
                svc.failed(job, out["error"])
            else:
                svc.finish(job)

    def _read_progress(self, job_id: str) -> None:
        path = self.service.jobs_dir / job_id / jobs.PROGRESS
        try:
            mtime = path.stat().st_mtime
            if self.seen.get(job_id) == mtime:
                return
            info = json.loads(path.read_text())
        except (OSError, ValueError):  # not written yet, or replaced while read
            return
        self.seen[job_id] = mtime
        job = self.service.jobs[job_id]
        job["worker"] = info.pop("worker", None)
        info.pop("time", None)
        if job["status"] == "queued":
            self.service.started(job)
        self.service.progress(job, info, check_stop=False)

    def close(self) -> None:
        self.thread.join(timeout=30)
        self.ray.shutdown()  # the cluster stops this driver's tasks; they stay "running" and resume at the next start
