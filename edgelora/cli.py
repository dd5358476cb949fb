"""The ``edgelora`` command: a thin typer layer over the Python API.

Library errors (`EdgeloraError`) become one line on stderr and exit code 2 (1 for environment
problems such as a failed download); nothing else in the library knows about exit codes.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup

from . import models as _models
from .errors import EdgeloraError
from .progress import bar
from .train import TrainConfig

_TRAIN = TrainConfig()  # the training options' defaults: TrainConfig is their one home


class _Group(TyperGroup):
    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except EdgeloraError as e:
            typer.echo(f"edgelora: error: {e}", err=True)
            raise typer.Exit(e.exit_code) from e


app = typer.Typer(cls=_Group, help="Adapt small language models on the devices where they run.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False, add_completion=False)
models_app = typer.Typer(cls=_Group, help="The registry of known base models and the local cache.", no_args_is_help=True)
app.add_typer(models_app, name="models")
devices_app = typer.Typer(cls=_Group, help="Device profiles: what each target device runs best.", no_args_is_help=True)
app.add_typer(devices_app, name="devices")


def _print_summary(summary: dict[str, object]) -> None:
    width = max(len(k) for k in summary)
    for k, v in summary.items():
        if isinstance(v, int) and k == "parameters":
            v = f"{v:,}"
        typer.echo(f"  {k:<{width}}  {v}")


@models_app.command("list")
def models_list() -> None:
    """List the models edgelora knows by name, and whether each is in the cache."""
    for name, spec in _models.REGISTRY.items():
        state = "pulled" if _models.is_pulled(name) else "not pulled"
        typer.echo(f"{name:<16} {state:<11} {spec.description} [{spec.license}]")
    typer.echo(f"cache: {_models.cache_dir()}")


@models_app.command("pull")
def models_pull(
    name: str = typer.Argument(_models.DEFAULT_MODEL, help="Model name (see `edgelora models list`)."),
    force: bool = typer.Option(False, "--force", help="Fetch and convert again even if cached."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Fetch a model into the cache (sha256 checked) and make its float32 checkpoint."""
    path = _models.pull(name, progress=not quiet, force=force)
    typer.echo(f"{name}: {path}")


@app.command()
def inspect(
    source: str = typer.Argument(..., help="A model name, a Hugging Face checkpoint directory or a .gguf file."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Print a base model's summary and fingerprint."""
    from .models import load_base

    summary = load_base(source).summary()
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)


@devices_app.command("list")
def devices_list() -> None:
    """List the shipped device profiles."""
    from .profiles import list_profiles

    rows = [(p.name, p.kind, "+".join(p.backends.order),
             "/".join(q for b, q in (("gguf", p.backends.gguf_quant), ("onnx", p.backends.onnx_quant)) if b in p.backends.order),
             f"{p.ram_mb // 1024} GB", str(p.threads), str(p.context_length), p.description) for p in list_profiles()]
    _table(("profile", "kind", "backends", "quant", "RAM", "threads", "context", "device"), rows)


@devices_app.command("show")
def devices_show(name: str = typer.Argument(..., help="Profile name or a .toml file.")) -> None:
    """Show one device profile in full."""
    from .profiles import get_profile

    typer.echo(json.dumps(get_profile(name).to_dict(), indent=2))


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for i, row in enumerate([header, *rows]):
        typer.echo("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())
        if i == 0:
            typer.echo("  ".join("-" * w for w in widths))


@app.command()
def export(
    model: str = typer.Option(_models.DEFAULT_MODEL, "--model", help="Model name, Hugging Face dir or .gguf file."),
    device: str = typer.Option(..., "--device", help="Device profile name (see `edgelora devices list`) or .toml file."),
    out: Path = typer.Option(..., "--out", help="The bundle directory to create."),
    backend: Optional[str] = typer.Option(None, "--backend", help="gguf, onnx or both (default: the profile's)."),
    quant: Optional[str] = typer.Option(None, "--quant", help="f32, f16, q8_0, q4_0, q4_k_m, int8, int4 or qdq (default: the profile's)."),
    force: bool = typer.Option(False, "--force", help="Write the bundle even if it is over the quality budget."),
    replace: bool = typer.Option(False, "--replace", help="Replace an existing bundle at --out."),
    eval_tokens: Optional[int] = typer.Option(None, "--eval-tokens", help="Evaluate quality on the first N held-out tokens only."),
    adapter_precision: Optional[str] = typer.Option(None, "--adapter-precision", help="What engines compute installed "
                                                    "adapters in: f32, f16 (half the bytes per token) or q8_0 (8 bits, about a "
                                                    "quarter). Default: the profile's on a quantized bundle (x86-64: q8_0), f32 "
                                                    "on a float one."),
    head_bits: Optional[int] = typer.Option(None, "--head-bits", help="The int4 ONNX graph's LM head: 8 or 6 bits "
                                            "(6: edgelora's operator; default: the profile's)."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Export a base model as a self-contained bundle for one device profile, with its quality measured."""
    from .bundle import export as do_export

    bundle = do_export(model, device, out, backend=backend, quant=quant, force=force, replace=replace,
                       eval_tokens=eval_tokens, progress=not quiet, adapter_precision=adapter_precision, head_bits=head_bits)
    typer.echo(f"bundle: {bundle.root}  (base {bundle.fingerprint[:23]}..., device {bundle.manifest['device']['name']})")
    _table(*bundle.artifact_table())


adapter_app = typer.Typer(cls=_Group, help="LoRA adapters: convert between formats; install into a bundle's store.",
                          no_args_is_help=True)
app.add_typer(adapter_app, name="adapter")


def _base_of(source: str):
    """(config, fingerprint) of a bundle directory or any base-model source."""
    from .bundle import open_source

    src = open_source(source, verify=False, progress=True)
    return src.config, src.fingerprint


class AdapterFormatOpt(str, Enum):
    gguf = "gguf"
    onnx = "onnx"
    peft = "peft"


@adapter_app.command("convert")
def adapter_convert(
    src: Path = typer.Argument(..., help="A PEFT dir, a GGUF LoRA or a .onnx_adapter."),
    to: AdapterFormatOpt = typer.Option(..., "--to", help="Output format."),
    out: Path = typer.Option(..., "--out", help="Output file (gguf, onnx) or directory (peft)."),
    base: str = typer.Option(..., "--base", help="The base it belongs to: a bundle dir, model name, HF dir or .gguf."),
) -> None:
    """Convert an adapter between PEFT, GGUF LoRA and .onnx_adapter (checked against its base)."""
    from .converters import load_adapter, save_adapter

    config, fingerprint = _base_of(base)
    adapter = load_adapter(src, config=config)
    adapter.check_fits(config, fingerprint)
    adapter.base_fingerprint = adapter.base_fingerprint or fingerprint
    save_adapter(adapter, out, to.value, config)
    typer.echo(f"wrote {out} ({to.value}, rank {adapter.rank}, {len(adapter.tensors)} modules, base {fingerprint[:23]}...)")


def _store(bundle_dir: Path):
    from .bundle import open_bundle

    return open_bundle(bundle_dir, verify=False).store


@adapter_app.command("install")
def adapter_install(
    bundle: Path = typer.Argument(..., help="The bundle directory."),
    src: Path = typer.Argument(..., help="A PEFT dir, a GGUF LoRA or a .onnx_adapter."),
    name: str = typer.Option(..., "--name", help="The name to install it under."),
    replace: bool = typer.Option(False, "--replace", help="Replace an adapter of the same name."),
) -> None:
    """Validate an adapter against the bundle's base and install it into the bundle's store."""
    m = _store(bundle).install(src, name, replace=replace)
    typer.echo(f"installed {name}: rank {m['rank']}, targets {','.join(m['targets'])}, for {', '.join(m['backends'])}")


@adapter_app.command("list")
def adapter_list(bundle: Path = typer.Argument(..., help="The bundle directory.")) -> None:
    """List the adapters installed in a bundle."""
    store = _store(bundle)
    rows = [(m["name"], str(m["rank"]), f"{m['alpha']:g}", ",".join(m["targets"]),
             f"{sum(f['size'] for f in m['files'].values()) / 1e6:.2f} MB", m["provenance"].get("method", m["provenance"].get("format", "")),
             m["installed"]) for m in store.list()]
    if rows:
        _table(("name", "rank", "alpha", "targets", "size", "source", "installed"), rows)
    else:
        typer.echo(f"no adapters installed in {bundle}")


@adapter_app.command("info")
def adapter_info(bundle: Path = typer.Argument(...), name: str = typer.Argument(...)) -> None:
    """Show an installed adapter's manifest (its files' hashes checked)."""
    typer.echo(json.dumps(_store(bundle).verify(name), indent=2))


@adapter_app.command("rm")
def adapter_rm(bundle: Path = typer.Argument(...), name: str = typer.Argument(...)) -> None:
    """Remove an installed adapter."""
    _store(bundle).remove(name)
    typer.echo(f"removed {name}")


@adapter_app.command("export-app")
def adapter_export_app(
    bundle: Path = typer.Argument(..., help="The bundle directory (with a CPU ONNX artifact)."),
    out: Path = typer.Option(..., "--out", help="The directory to write: what the app ships."),
    adapter: list[str] = typer.Option([], "--adapter", help="An installed adapter to ship; repeat for more."),
    replace: bool = typer.Option(False, "--replace", help="Replace an existing --out."),
) -> None:
    """Write a directory an onnxruntime-genai app loads as it is (og.Model(DIR); og.Adapters for adapters/)."""
    from .bundle import open_bundle

    path = open_bundle(bundle, verify=False).export_app(out, adapter, replace=replace)
    typer.echo(f"wrote {path}: og.Model({str(path)!r})" + "".join(
        f"; adapters.load({str(path / 'adapters' / (n + '.onnx_adapter'))!r}, {n!r})" for n in dict.fromkeys(adapter)))


def _parse_adapters(specs: list[str]) -> dict[str, float]:
    from .errors import EdgeloraError

    out = {}
    for spec in specs:
        name, _, weight = spec.partition(":")
        try:
            out[name] = float(weight) if weight else 1.0
        except ValueError:
            raise EdgeloraError(f"--adapter {spec!r}: the weight after ':' must be a number, e.g. {name}:0.5") from None
    return out


def _prompt_of(engine, text: str, raw: bool):
    if raw or not (engine.tokenizer and engine.tokenizer.chat_template):
        return text
    return [{"role": "user", "content": text}]


def _stream_text(engine, prompt, **kw) -> str:
    """Streams decoded text to stdout as tokens arrive; returns the whole text."""
    tokens: list[int] = []
    shown = ""
    for tok in engine.stream(prompt, **kw):
        tokens.append(tok)
        text = engine.tokenizer.decode(tokens, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for whole UTF-8 characters
            typer.echo(text[len(shown):], nl=False)
            shown = text
    typer.echo(engine.tokenizer.decode(tokens, skip_special_tokens=True)[len(shown):])
    return shown


@app.command()
def run(
    bundle: Path = typer.Argument(..., help="The bundle directory."),
    prompt: str = typer.Argument(..., help="The prompt (sent as a chat message when the model has a chat template)."),
    backend: Optional[str] = typer.Option(None, "--backend", help="gguf or onnx (default: the bundle's first)."),
    adapter: list[str] = typer.Option([], "--adapter", help="NAME or NAME:WEIGHT; repeat to mix adapters."),
    max_tokens: int = typer.Option(128, "--max-tokens"),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k"),
    seed: int = typer.Option(0, "--seed"),
    raw: bool = typer.Option(False, "--raw", help="Complete the prompt as plain text, without the chat template."),
) -> None:
    """Generate from a bundle, with installed adapters active."""
    from .bundle import open_bundle

    engine = open_bundle(bundle).engine(backend)
    try:
        engine.set_adapters(_parse_adapters(adapter))
        _stream_text(engine, _prompt_of(engine, prompt, raw), max_tokens=max_tokens, temperature=temperature,
                     top_p=top_p, top_k=top_k, seed=seed)
    finally:
        engine.close()


CHAT_HELP = "commands: /adapter NAME[:W] [NAME:W ...] (swap; no name = none), /adapters, /reset, /exit"


@app.command()
def chat(
    bundle: Path = typer.Argument(..., help="The bundle directory."),
    backend: Optional[str] = typer.Option(None, "--backend"),
    adapter: list[str] = typer.Option([], "--adapter", help="NAME or NAME:WEIGHT to start with."),
    max_tokens: int = typer.Option(256, "--max-tokens"),
    temperature: float = typer.Option(0.0, "--temperature"),
) -> None:
    """Chat with a bundle; swap adapters mid-conversation with /adapter NAME."""
    import sys

    from .bundle import open_bundle

    b = open_bundle(bundle)
    engine = b.engine(backend)
    engine.set_adapters(_parse_adapters(adapter))
    messages: list[dict[str, str]] = []
    typer.echo(f"edgelora chat ({engine.backend}); {CHAT_HELP}", err=True)
    try:
        while True:
            sys.stderr.write(f"[{'+'.join(engine.active_adapters) or 'base'}] > ")
            sys.stderr.flush()
            line = sys.stdin.readline()
            if not line or line.strip() in ("/exit", "/quit"):
                break
            line = line.strip()
            if not line:
                continue
            if line.startswith("/adapters"):
                typer.echo(", ".join(b.store.names()) or "no adapters installed")
            elif line.startswith("/adapter"):
                try:
                    engine.set_adapters(_parse_adapters(line.split()[1:]))
                    typer.echo(f"active: {engine.active_adapters or 'none'}", err=True)
                except EdgeloraError as e:
                    typer.echo(f"edgelora: error: {e}", err=True)
            elif line.startswith("/reset"):
                messages.clear()
            elif line.startswith("/"):
                typer.echo(CHAT_HELP, err=True)
            else:
                messages.append({"role": "user", "content": line})
                reply = _stream_text(engine, messages, max_tokens=max_tokens, temperature=temperature)
                messages.append({"role": "assistant", "content": reply})
    finally:
        engine.close()


def _train_progress(quiet: bool):
    import sys

    def show(p: dict) -> None:
        if quiet:
            return
        val = f", val {p['val_loss']:.3f}" if p.get("val_loss") is not None else ""
        end = "\n" if p["step"] == p["steps"] or not sys.stderr.isatty() else ""
        threads = f", {p['threads']} threads" if "threads" in p else ""
        sys.stderr.write(f"\rtrain step {p['step']}/{p['steps']}: loss {p['loss']:.3f}{val}, "
                         f"{p['tokens_per_s']:.0f} tok/s{threads}, ~{p['eta_s']:.0f}s left   {end}")
        sys.stderr.flush()

    return show


@app.command()
def train(
    bundle: Path = typer.Argument(..., help="The bundle to personalize (trains against its own weights: GGUF, else ONNX)."),
    data: Path = typer.Option(..., "--data", help="JSONL of chats ({\"messages\": [...]}) or prompt/completion pairs."),
    name: str = typer.Option(..., "--name", help="The adapter's name in the bundle's store."),
    rank: int = typer.Option(_TRAIN.rank, "--rank"),
    alpha: float = typer.Option(_TRAIN.alpha, "--alpha"),
    targets: str = typer.Option(",".join(_TRAIN.targets), "--targets", help="Comma-separated LoRA targets."),
    steps: int = typer.Option(_TRAIN.steps, "--steps"),
    lr: float = typer.Option(_TRAIN.lr, "--lr"),
    seq_len: int = typer.Option(_TRAIN.seq_len, "--seq-len"),
    last_layers: Optional[int] = typer.Option(_TRAIN.last_layers, "--last-layers", help="Train only the last k layers."),
    grad_accum: int = typer.Option(_TRAIN.grad_accum, "--grad-accum"),
    seed: int = typer.Option(_TRAIN.seed, "--seed"),
    threads: Optional[int] = typer.Option(None, "--threads", help="At most this many (default: the device profile's)."),
    adaptive_threads: bool = typer.Option(_TRAIN.adaptive_threads, "--adaptive-threads/--fixed-threads",
                                          help="Use fewer threads while other programs keep cores busy."),
    backend: Optional[str] = typer.Option(None, "--backend", help="Train against the bundle's gguf or onnx weights."),
    memory_mb: Optional[float] = typer.Option(None, "--memory-mb", help="Memory cap (default: the profile's budget)."),
    expanded_layers: Optional[int] = typer.Option(None, "--expanded-layers",
                                                  help="Layers kept expanded to float32 (default: all if the memory cap allows, else 2)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint (same settings and data)."),
    replace: bool = typer.Option(False, "--replace", help="Replace an installed adapter of the same name."),
    checkpoint_dir: Optional[Path] = typer.Option(None, "--checkpoint-dir", help="Default: BUNDLE/.train/NAME."),
    checkpoint_every: int = typer.Option(_TRAIN.checkpoint_every, "--checkpoint-every", help="Checkpoint every N steps..."),
    checkpoint_seconds: float = typer.Option(_TRAIN.checkpoint_seconds, "--checkpoint-seconds",
                                             help="...and when this many seconds passed since the last (0: off)."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Train a LoRA adapter on your own data, on this device, and install it into the bundle."""
    from .bundle import open_bundle
    from .train import CHECKPOINT, TrainConfig, train_adapter

    b = open_bundle(bundle, verify=False)  # training checks the files of the artifact it reads
    cfg = TrainConfig(rank=rank, alpha=alpha, targets=tuple(t.strip() for t in targets.split(",") if t.strip()),
                      steps=steps, lr=lr, seq_len=seq_len, last_layers=last_layers, grad_accum=grad_accum, seed=seed,
                      threads=threads or b.threads, backend=backend, memory_mb=memory_mb, expanded_layers=expanded_layers,
                      checkpoint_every=checkpoint_every, checkpoint_seconds=checkpoint_seconds,
                      adaptive_threads=adaptive_threads)
    checkpoint_dir = checkpoint_dir or bundle / ".train" / name
    if resume and not (checkpoint_dir / CHECKPOINT).exists():
        typer.echo(f"edgelora: no checkpoint in {checkpoint_dir}: starting from step 0", err=True)
    r = train_adapter(b, data, name, config=cfg, checkpoint_dir=checkpoint_dir, resume=resume, replace=replace,
                      progress=_train_progress(quiet))
    val = f", validation loss {r.val_losses[0][1]:.3f} -> {r.val_losses[-1][1]:.3f}" if r.val_losses else ""
    typer.echo(f"installed {name}: loss {r.losses[0]:.3f} -> {r.losses[-1]:.3f}{val}, "
               f"{r.tokens_per_second:.0f} tokens/s{' (stopped early)' if r.stopped_early else ''}")


class ConvertTarget(str, Enum):
    hf = "hf"
    gguf_f32 = "gguf-f32"
    gguf_f16 = "gguf-f16"


@app.command()
def convert(
    source: str = typer.Argument(..., help="A model name, a Hugging Face checkpoint directory or a .gguf file."),
    to: ConvertTarget = typer.Option(..., "--to", help="Output format."),
    out: Path = typer.Option(..., "--out", help="Output directory (hf) or file (gguf)."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Convert a base model between formats, in float (no quantization)."""
    from .models import load_base
    from .converters import gguf_model, hf

    base = load_base(source, progress=not quiet)
    if to is ConvertTarget.hf:
        hf.write(base, out, replace=True, progress=bar("write", not quiet))
    else:
        gguf_model.write(base, out, dtype=to.value.split("-")[1].upper(), progress=bar("write", not quiet))
    typer.echo(f"wrote {out} ({base.fingerprint})")



cloud_app = typer.Typer(cls=_Group, help="Adapters from the cloud: the reference service and the device client.",
                        no_args_is_help=True)
app.add_typer(cloud_app, name="cloud")


@cloud_app.command("serve")
def cloud_serve(
    root: Path = typer.Option(..., "--root", help="The service's directory: key, tokens, library, jobs."),
    base: list[str] = typer.Option(..., "--base", help="A base model (name, path or bundle) to serve; repeatable."),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8470, "--port"),
    queue: int = typer.Option(8, "--queue", help="Jobs queued or running at most."),
    ttl_days: float = typer.Option(30.0, "--ttl-days", help="How long a signed manifest stays valid."),
    rate: float = typer.Option(20.0, "--rate", help="Requests per second per token (burst: 3x)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Training threads per job (default: all cores; "
                                          "with --engine ray, 1: the CPUs each job asks of the cluster)."),
    engine: str = typer.Option("local", "--engine", help="Where jobs run: 'local' (one at a time in this process) "
                               "or 'ray' (tasks on a Ray cluster; pip install 'edgelora[ray]')."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="With --engine ray: 'auto' (the cluster "
                                              "`ray start` made here) or HOST:PORT; default: a cluster of this machine's cores."),
    jobs_dir: Optional[Path] = typer.Option(None, "--jobs-dir", help="Where jobs keep examples, checkpoints and "
                                            "results (default ROOT/jobs); with Ray, a directory every node mounts at this path."),
) -> None:
    """Run the adapter service (FastAPI on uvicorn) until interrupted."""
    from .cloud.service import Limits, ServiceConfig, serve

    limits = Limits(queue_size=queue, rate_per_s=rate, burst=max(1, int(3 * rate)))
    serve(ServiceConfig(root, list(base), limits=limits, ttl_s=ttl_days * 86400, threads=threads, engine=engine,
                        ray_address=ray_address, jobs_dir=jobs_dir), host=host, port=port)


@cloud_app.command("token")
def cloud_token(
    name: str = typer.Argument(..., help="Who the token is for (a device or user name)."),
    root: Path = typer.Option(..., "--root", help="The service's directory."),
) -> None:
    """Create an access token for a device or user (printed once; only its hash is kept)."""
    from .cloud.service import add_token

    typer.echo(add_token(root, name))


@cloud_app.command("add")
def cloud_add(
    adapter: Path = typer.Argument(..., help="An adapter (PEFT dir, GGUF LoRA or .onnx_adapter)."),
    root: Path = typer.Option(..., "--root", help="The service's directory."),
    base: str = typer.Option(..., "--base", help="The base model it was made for."),
    name: str = typer.Option(..., "--name"),
    description: str = typer.Option(..., "--description", help="What it does: compositions match on it."),
) -> None:
    """Add an adapter to the service's library, shared with every token."""
    from .cloud.service import library_add

    e = library_add(root, adapter, base, name=name, description=description)
    typer.echo(f"added {e['name']} as {e['id']} (rank {e['rank']}, {', '.join(e['targets'])}) for base {e['base_fingerprint'][:23]}")


def _client(bundle_dir: Path):
    from .bundle import open_bundle
    from .cloud import CloudClient

    return CloudClient.for_bundle(open_bundle(bundle_dir, verify=False))


def _job_line(job: dict) -> str:
    p = job.get("progress") or {}
    prog = (f" step {p['step']}/{p['steps']} loss {p['loss']:.3f}" if "step" in p else
            f" search {p['evaluations']}/{p['budget']} objective {p['objective']:.3f}" if "evaluations" in p else "")
    tail = f" -> adapter {job['adapter_id']}" if job.get("adapter_id") else f": {job['error']}" if job.get("error") else ""
    return f"{job['id']}  {job['kind']:<8} {job['name']:<16} {job['status']}{prog}{tail}"


@cloud_app.command("connect")
def cloud_connect(
    bundle_dir: Path = typer.Argument(..., metavar="BUNDLE"),
    url: str = typer.Option(..., "--url", help="The service, e.g. http://127.0.0.1:8470"),
    token: str = typer.Option(..., "--token", envvar="EDGELORA_CLOUD_TOKEN", help="This device's token."),
    key: str = typer.Option(..., "--key", help="The service's public key (ed25519:...) or a file holding it; pinned."),
) -> None:
    """Pin the service's key and remember its URL and this device's token in the bundle."""
    from .bundle import open_bundle
    from .cloud import CloudClient

    c = CloudClient.connect(open_bundle(bundle_dir, verify=False), url, token, key)
    typer.echo(f"connected {bundle_dir} to {c.url} (pinned key {c.key_id})")


@cloud_app.command("library")
def cloud_library(bundle_dir: Path = typer.Argument(..., metavar="BUNDLE")) -> None:
    """List the service's adapters for this bundle's base."""
    rows = [(a["id"], a["name"], str(a["rank"]), a["method"], a["description"][:60]) for a in _client(bundle_dir).library()]
    _table(("id", "name", "rank", "made by", "description"), rows)


@cloud_app.command("request")
def cloud_request(
    bundle_dir: Path = typer.Argument(..., metavar="BUNDLE"),
    name: str = typer.Option(..., "--name", help="The adapter's name on this device."),
    examples: Optional[Path] = typer.Option(None, "--examples", help="JSONL chats: train on them (or search mixture weights with --description)."),
    description: str = typer.Option("", "--description", help="The task: compose from the library."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Default: the service's (edgelora's training defaults)."),
    rank: Optional[int] = typer.Option(None, "--rank"),
    wait: bool = typer.Option(False, "--wait", help="Wait for the job, then pull and install it."),
) -> None:
    """Ask the service for an adapter: from examples, or composed from a description."""
    if examples is None and not description:
        raise typer.BadParameter("give --examples, --description, or both")
    c = _client(bundle_dir)
    kind = "examples" if examples is not None and not description else "compose"
    given = {k: v for k, v in (("steps", steps), ("rank", rank)) if v is not None}
    job = c.request(name=name, examples=examples, description=description, kind=kind, **given)
    typer.echo(_job_line(job))
    if wait:
        last = [None]

        def show(j):
            line = _job_line(j)
            if line != last[0]:
                typer.echo("  " + line, err=True)
                last[0] = line

        c.wait(job["id"], progress=show)
        m = c.pull(job["id"], name)
        typer.echo(f"installed {m['name']} (rank {m['rank']}, signed by {m['provenance']['cloud']['key_id']})")


@cloud_app.command("status")
def cloud_status(
    bundle_dir: Path = typer.Argument(..., metavar="BUNDLE"),
    job: Optional[str] = typer.Argument(None, help="A job id (default: every job this bundle requested)."),
) -> None:
    """Show the status of this bundle's jobs on the service."""
    c = _client(bundle_dir)
    ids = [job] if job else list(c.remembered_jobs())
    if not ids:
        typer.echo("no jobs requested from this bundle")
    for j in ids:
        typer.echo(_job_line(c.status(j)))


@cloud_app.command("pull")
def cloud_pull(
    bundle_dir: Path = typer.Argument(..., metavar="BUNDLE"),
    ref: str = typer.Argument(..., help="A finished job's id, or an adapter id from `cloud library`."),
    name: Optional[str] = typer.Option(None, "--name", help="Install under this name (default: the job's)."),
    replace: bool = typer.Option(False, "--replace", help="Replace an installed adapter of that name."),
) -> None:
    """Download, verify (signature, base, hashes) and install an adapter into the bundle's store."""
    m = _client(bundle_dir).pull(ref, name, replace=replace)
    typer.echo(f"installed {m['name']} (rank {m['rank']}, {', '.join(m['targets'])}, signed by {m['provenance']['cloud']['key_id']})")


@cloud_app.command("sync")
def cloud_sync(bundle_dir: Path = typer.Argument(..., metavar="BUNDLE")) -> None:
    """Catch up after being offline: pull every finished job this bundle requested."""
    rows = _client(bundle_dir).sync()
    if not rows:
        typer.echo("no jobs requested from this bundle")
    for r in rows:
        typer.echo(f"{r['id']}  {r.get('name') or ''}: {r['action']}")


@app.command()
def quickstart(
    model: str = typer.Option(_models.DEFAULT_MODEL, "--model", help="Model name or path."),
    device: str = typer.Option("raspberry-pi-5", "--device", help="Device profile to export for."),
    out: Optional[Path] = typer.Option(None, "--out", help="Where to write the bundle (default: the cache)."),
    steps: int = typer.Option(80, "--steps", help="Training steps per adapter."),
) -> None:
    """Run edgelora's whole story on the default model and say what it did."""
    from . import quickstart as story

    story.run(model, device, out, steps, story.Report(say=typer.echo, table=_table, summary=_print_summary,
                                                      progress=_train_progress(False)))


def main() -> None:
    app()
