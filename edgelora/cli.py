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
