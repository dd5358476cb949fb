"""The ``edgelora`` command: a thin typer layer over the Python API.

Library errors (`EdgeloraError`) become one line on stderr and exit code 2 (1 for environment
problems such as a failed download); nothing else in the library knows about exit codes.
"""

from __future__ import annotations

import json
import time
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup

from . import models as _models
from .errors import EdgeloraError
from .progress import bar


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
    from .base import load_base

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


def _artifact_rows(bundle) -> list[tuple[str, ...]]:
    rows = []
    for a in bundle.artifacts:
        size = sum(bundle.manifest["files"][f]["size"] for f in a.files)
        q = a.quality
        rows.append((a.backend, a.quant, f"{size / 1e6:.1f} MB", f"{a.memory['total']:.0f} MB",
                     f"{q['perplexity']:.3f}", f"{q['float_perplexity']:.3f}", f"{q['perplexity_change']:+.2%}",
                     f"{q['top1_agreement']:.1%}", "yes" if q["within_budget"] else "NO", f"{a.export_seconds:.0f}s"))
    return rows


ARTIFACT_HEADER = ("backend", "quant", "file size", "memory", "perplexity", "float ppl", "change", "top-1 agree",
                   "in budget", "export")


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
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Export a base model as a self-contained bundle for one device profile, with its quality measured."""
    from .bundle import export as do_export

    bundle = do_export(model, device, out, backend=backend, quant=quant, force=force, replace=replace,
                       eval_tokens=eval_tokens, progress=not quiet)
    typer.echo(f"bundle: {bundle.root}  (base {bundle.fingerprint[:23]}..., device {bundle.manifest['device']['name']})")
    _table(ARTIFACT_HEADER, _artifact_rows(bundle))


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
    from .base import load_base
    from .converters import gguf_model, hf

    base = load_base(source, progress=not quiet)
    if to is ConvertTarget.hf:
        hf.write(base, out, replace=True, progress=bar("write", not quiet))
    else:
        gguf_model.write(base, out, dtype=to.value.split("-")[1].upper(), progress=bar("write", not quiet))
    typer.echo(f"wrote {out} ({base.fingerprint})")


@app.command()
def quickstart(
    model: str = typer.Option(_models.DEFAULT_MODEL, "--model", help="Model name or path."),
) -> None:
    """Run edgelora's whole story on the default model and say what it did."""
    from .base import load_base

    t0 = time.monotonic()
    typer.echo(f"[1] base model: {model}")
    if model in _models.REGISTRY:
        hf_dir = _models.ensure_model(model)
        typer.echo(f"    float32 checkpoint: {hf_dir}")
        typer.echo(f"    source GGUF:        {_models.gguf_path(model)}")
    base = load_base(model)
    t = time.monotonic()
    summary = base.summary()
    typer.echo(f"    fingerprint computed in {time.monotonic() - t:.1f}s")
    _print_summary(summary)
    typer.echo(f"done in {time.monotonic() - t0:.1f}s")


def main() -> None:
    app()
