"""The device bundle: one self-contained directory per device profile.

    bundle/
      bundle.json          base fingerprint, profile, artifacts (quantization, memory estimate,
                           quality figures), every file's size and sha256
      tokenizer/           tokenizer.json, tokenizer_config.json, chat_template.jinja
      gguf/model-q8_0.gguf llama.cpp artifact(s)
      onnx/int4/model.onnx ONNX Runtime artifact(s), with LoRA slots; beside it genai_config.json and
                           the tokenizer files, so onnxruntime-genai apps load the directory as it is
      adapters/            the adapter store (empty at export)

`export` builds it in a temporary directory beside the target and renames it into place, so an
interrupted export never leaves a half bundle that looks whole. `open_bundle` reads it back and
checks every file's hash.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from . import native
from . import quality as _quality
from ._io import atomic_dir, sha256_file, write_bytes_atomic
from .adapters import LoraAdapter
from .base import BaseModel
from .models import load_base
from .errors import CorruptFileError, EdgeloraError, SourceNotFoundError, UnsupportedFormatError
from .profiles import FLOAT_QUANTS, GGUF_QUANTS, ONNX_QUANTS, DeviceProfile, get_profile
from .progress import bar

BUNDLE_FORMAT = "edgelora-bundle"
BUNDLE_VERSION = 1
MANIFEST = "bundle.json"
EVAL_WINDOW = 512
RUNTIME_OVERHEAD_MB = 64


class MemoryBudgetError(EdgeloraError):
    """The bundle would not fit the device's memory budget."""


class QualityBudgetError(EdgeloraError):
    """The export loses more quality than the device profile allows."""


def _mb(n: float) -> float:
    return round(n / (1 << 20), 1)


@dataclass
class Artifact:
    backend: str
    quant: str
    files: list[str]
    memory: dict[str, float] = field(default_factory=dict)
    quality: dict[str, Any] = field(default_factory=dict)
    export_seconds: float = 0.0
    graph: str = ""  # for ONNX: "fused" or "optimum"

    @property
    def main(self) -> str:
        return self.files[0]

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "quant": self.quant, "graph": self.graph, "files": self.files, "memory_mb": self.memory,
                "quality": self.quality, "export_seconds": round(self.export_seconds, 1)}


def estimate_memory(base: BaseModel, profile: DeviceProfile, backend: str, quant: str, weights_bytes: int) -> dict[str, float]:
    """Resident memory at the profile's context length: weights + KV cache + activations + runtime."""
    c = base.config
    ctx = profile.context_length
    kv_bytes = {"gguf": 2, "onnx": 4}[backend]  # llama.cpp keeps K/V in F16; the ONNX graph in F32
    if quant == "qdq":
        kv_bytes = 2
    kv = 2 * c.num_layers * ctx * c.kv_dim * kv_bytes
    batch = profile.shapes.prefill_length or min(ctx, 512)
    act = 4 * batch * (3 * c.intermediate_size + 4 * c.hidden_size + c.num_heads * min(ctx, batch)) + 4 * c.vocab_size * batch
    total = weights_bytes + kv + act + RUNTIME_OVERHEAD_MB * (1 << 20)
    return {"weights": _mb(weights_bytes), "kv_cache": _mb(kv), "activations": _mb(act),
            "runtime": float(RUNTIME_OVERHEAD_MB), "total": _mb(total), "context_length": ctx}


def resolve_plan(profile: DeviceProfile, backend: str | None, quant: str | None) -> list[tuple[str, str]]:
    """(backend, quant) pairs to build: the profile's choice, overridden by --backend / --quant."""
    if backend not in (None, "gguf", "onnx", "both"):
        raise UnsupportedFormatError(f"--backend must be gguf, onnx or both, got {backend!r}")
    if quant is not None and quant not in GGUF_QUANTS + ONNX_QUANTS:
        raise UnsupportedFormatError(f"--quant must be one of {', '.join(dict.fromkeys(GGUF_QUANTS + ONNX_QUANTS))}, got {quant!r}")
    if backend == "both":
        backends = ["gguf", "onnx"]
    elif backend:
        backends = [backend]
    elif quant and quant not in ("f32",):
        backends = [b for b in ("gguf", "onnx") if quant in (GGUF_QUANTS if b == "gguf" else ONNX_QUANTS)]
    else:
        backends = list(profile.backends.order)
    plan = []
    for b in backends:
        valid = GGUF_QUANTS if b == "gguf" else ONNX_QUANTS
        q = quant or (profile.backends.gguf_quant if b == "gguf" else profile.backends.onnx_quant)
        if q not in valid:
            raise UnsupportedFormatError(f"quantization {q!r} is not available for the {b} backend (choose from {', '.join(valid)})")
        plan.append((b, q))
    return plan


# -- building artifacts ---------------------------------------------------------------------


class _ExportContext:
    """Float intermediates shared by the artifacts of one export (cached per fingerprint)."""

    def __init__(self, base: BaseModel, tmp: Path, progress: bool, profile: DeviceProfile | None = None,
                 onnx_graph: str = "fused", onnx_adapter_type: str = "f32", head_bits: int = 8):
        self.base, self.tmp, self.progress = base, tmp, progress
        self.profile, self.onnx_graph = profile, onnx_graph
        self.onnx_adapter_type = onnx_adapter_type  # what MatMulQ41 nodes read adapters in: f32, f16 or q8
        self.head_bits = head_bits  # the int4 fused graph's LM head, with MatMulQ41: 6 or 8 bits
        self._f32_gguf: Path | None = None
        self._hf_dir: Path | None = None

    def f32_gguf(self) -> Path:
        if self._f32_gguf is None:
            from .converters import gguf_model
            from .models import cache_dir

            path = cache_dir() / "float" / f"{self.base.fingerprint.split(':')[1][:16]}-f32.gguf"
            if not path.exists():
                gguf_model.write(self.base, path, "F32", progress=bar("float GGUF", self.progress))
            self._f32_gguf = path
        return self._f32_gguf

    def hf_dir(self) -> Path:
        if self._hf_dir is None:
            src = Path(self.base.source)
            if self.base.source_format == "hf" and self.base.source_dtype == "F32":
                self._hf_dir = src
            else:
                from .converters import hf

                self._hf_dir = hf.write(self.base, self.tmp / "hf", progress=bar("float checkpoint", self.progress))
        return self._hf_dir


def _build_gguf(ws: _ExportContext, quant: str, out: Path, threads: int) -> list[Path]:
    from .converters import gguf_model, gguf_quant

    target = out / "gguf" / f"model-{quant}.gguf"
    target.parent.mkdir(parents=True, exist_ok=True)
    if quant == "f32":
        shutil.copyfile(ws.f32_gguf(), target)
    elif quant == "f16":
        gguf_model.write(ws.base, target, "F16", progress=bar("F16 GGUF", ws.progress))
    else:
        gguf_quant.quantize(ws.f32_gguf(), target, quant, threads=threads)
    return [target]


def _build_onnx(ws: _ExportContext, quant: str, out: Path, threads: int) -> list[Path]:
    from .converters import genai, onnx_fused, onnx_model

    target_dir = out / "onnx" / quant
    if quant == "qdq":
        from .converters import onnx_npu
        from .runtime.npu import StaticRunner

        prof = ws.profile
        if not prof.shapes.static:
            raise UnsupportedFormatError(f"qdq is the NPU format; profile {prof.name} has no static shapes")
        tok = ws.base.tokenizer
        prefix = [tok.bos_token_id if tok.bos_token_id is not None else 0]
        sequences = calibration_sequences(ws.base, prefix, prof.context_length - 1)

        rank = prof.shapes.lora_rank

        def calibrate(root: Path, graphs: dict[str, Path]) -> dict[str, list]:
            runner = StaticRunner.open(root, provider="cpu", graphs=graphs)
            feeds = runner.record(sequences, n_decode=4)
            for adapter, seqs in (npu_calibration_adapters(ws, sequences, threads) if rank else []):
                runner.lora = onnx_npu.lora_feeds(adapter, ws.base.config, rank)
                for kind, more in runner.record(seqs, n_decode=4).items():
                    feeds[kind] += more
            return feeds

        onnx_npu.export(ws.base, target_dir, prefill_len=prof.shapes.prefill_length, ctx=prof.context_length,
                        prefix_tokens=prefix, calibrate=calibrate, lora_rank=rank,
                        progress=bar("NPU graphs (float, calibrated, prefill and decode quantized)", ws.progress))
        return sorted(p for p in target_dir.iterdir() if p.is_file())
    lib = None
    if ws.onnx_graph == "fused":
        lib = _q41_library(ws.profile) if quant == "int4" else None
        path = onnx_fused.export(ws.base, target_dir, quant, max_len=ws.profile.context_length,
                                 kernel="q41" if lib else "nbits", adapter_type=ws.onnx_adapter_type, head_bits=ws.head_bits)
        if lib:  # the bundle carries the library its graph needs (genai_config.json names it)
            shutil.copyfile(lib, target_dir / native.LIBRARY)
    else:
        path = onnx_model.export(ws.hf_dir(), target_dir, ws.base.config, quant, progress=bar(f"ONNX {quant}", ws.progress))
    # what onnxruntime-genai apps need to load this directory as it is (converters/genai.py)
    genai.write_model_dir(target_dir, ws.base.config, ws.base.tokenizer, filename=path.name,
                          context_length=ws.profile.context_length, share_buffer=ws.onnx_graph == "fused",
                          custom_ops_library=native.LIBRARY if lib else None)
    return [path] + sorted(p for p in target_dir.iterdir() if p.is_file() and p != path)  # + external data, genai


def _q41_library(profile: DeviceProfile) -> Path | None:
    """edgelora's Q4_1 operator library for a bundle of this profile: the one built here, when the
    profile's CPU is this machine's kind (an arm64 build is not made yet: arm64 bundles use MatMulNBits)."""
    import platform

    if profile.arch != platform.machine():
        return None
    return native.library()


def npu_calibration_adapters(ws: _ExportContext, sequences: list[list[int]], threads: int) -> list[tuple[LoraAdapter, list]]:
    """The adapters bound while calibrating the NPU graphs' LoRA slots, each with the sample chats it
    sees: a random one, one trained on the shipped persona chats (the quickstart's recipe, 30 steps),
    and that one doubled (A and B x2), so the ranges have room for adapters trained longer."""
    from importlib import resources

    from .adapters import LoraTensor, random_adapter
    from .train import train_adapter

    with resources.as_file(resources.files("edgelora.data").joinpath("persona_train.jsonl")) as data:
        # seq_len: a cap, not a length (the shipped chats are ~100 tokens; tiny test tokenizers make more)
        trained = train_adapter(ws.base, data, "calibration", install=False, steps=30, lr=3e-3, rank=8,
                                seq_len=1024, val_fraction=0, threads=threads).adapter
    doubled = LoraAdapter({t: LoraTensor(2 * v.A, 2 * v.B, v.alpha) for t, v in trained.tensors.items()},
                          name="calibration x2")
    return [(random_adapter(ws.base.config, rank=8, seed=0), sequences[:2]), (trained, sequences[2:5]),
            (doubled, sequences[5:])]


def calibration_sequences(base: BaseModel, prefix: list[int], max_len: int, n: int = 8) -> list[list[int]]:
    """Sample chats for calibrating activation ranges (the shipped training chats, not the held-out text)."""
    from importlib import resources

    out = []
    for name in ("persona_train.jsonl", "pirate_train.jsonl"):
        lines = resources.files("edgelora.data").joinpath(name).read_text(encoding="utf-8").splitlines()
        for line in lines[: n // 2]:
            msgs = json.loads(line)["messages"]
            text = base.tokenizer.apply_chat_template(msgs, add_generation_prompt=False) if base.tokenizer.chat_template \
                else " ".join(m["content"] for m in msgs)
            ids = base.tokenizer.encode(text, add_special_tokens=False)
            ids = ids[len(prefix):] if ids[:len(prefix)] == prefix else ids
            out.append((prefix + ids)[:max_len])
    return out


BUILDERS: dict[str, Callable[[_ExportContext, str, Path, int], list[Path]]] = {"gguf": _build_gguf, "onnx": _build_onnx}


def _engine_for(backend: str, path: Path, threads: int, n_ctx: int, base: BaseModel | None = None,
                config=None, provider: str = "htp", **kw):
    if base is not None:
        kw.setdefault("tokenizer", base.tokenizer)
        kw.setdefault("fingerprint", base.fingerprint)
    if path.parent.joinpath("npu.json").exists():
        from .runtime.npu import NpuEngine

        return NpuEngine(path.parent, config or base.config, provider=provider, threads=threads, **kw)
    if backend == "gguf":
        from .runtime.gguf import GGUFEngine

        return GGUFEngine(path, n_ctx=n_ctx, threads=threads, **kw)
    from .runtime.onnx import OnnxEngine

    return OnnxEngine(path, config or base.config, threads=threads, n_ctx=n_ctx, **kw)


def _eval_tokens(base: BaseModel, limit: int | None) -> list[int]:
    tokens = base.tokenizer.encode(_quality.heldout_text(), add_special_tokens=False)
    return tokens[:limit] if limit else tokens


def float_scores(ws: _ExportContext, tokens: list[int], threads: int, progress: bool) -> _quality.Scores:
    """The float model's scores: its F32 GGUF in llama.cpp with an F32 KV cache (equal to
    transformers within float rounding, see the tests)."""

    def compute() -> _quality.Scores:
        from .runtime.gguf import GGUFEngine

        engine = GGUFEngine(ws.f32_gguf(), n_ctx=EVAL_WINDOW, threads=threads, kv_type="f32")
        try:
            return _quality.score(engine.logits, tokens, EVAL_WINDOW, progress=bar("float perplexity", progress))
        finally:
            engine.close()

    return _quality.cached_reference(ws.base.fingerprint, tokens, EVAL_WINDOW, compute)


def npu_reference(ws: _ExportContext, tokens: list[int], window: int, prefix: list[int], threads: int,
                  progress: bool) -> _quality.Scores:
    """Float scores on the NPU's windows, each seen after the same fixed prefix the NPU graphs hold."""
    from .runtime.gguf import GGUFEngine

    engine = GGUFEngine(ws.f32_gguf(), n_ctx=window + len(prefix), threads=threads, kv_type="f32")
    try:
        return _quality.score(lambda ids: engine.logits(prefix + list(ids))[len(prefix):], tokens, window,
                              progress=bar("float perplexity (NPU windows)", progress))
    finally:
        engine.close()


def export(model: str | os.PathLike | BaseModel, device: str | os.PathLike, out: str | os.PathLike, *,
           backend: str | None = None, quant: str | None = None, force: bool = False, replace: bool = False,
           eval_tokens: int | None = None, threads: int | None = None, progress: bool = True,
           onnx_graph: str | None = None, adapter_precision: str | None = None, head_bits: int | None = None) -> "Bundle":
    """Exports `model` for the device profile `device` into the bundle directory `out`.

    `onnx_graph`: "fused" (edgelora's graph built from the weights with ONNX Runtime's fused
    kernels; the default) or "optimum" (optimum's export plus LoRA slots). `adapter_precision`:
    what llama.cpp computes installed adapters in, f32, f16 or q8_0 (the store keeps each adapter's
    f32 value beside); the ONNX graph's MatMulQ41 nodes take the same width (q8_0: 8-bit blocks).
    Default: the profile's backends.adapter_precision when every artifact is quantized, else f32.
    `head_bits`: the int4 fused graph's LM head in 8 or 6 bits (6 needs MatMulQ41's library; default:
    the profile's backends.onnx_head_bits)."""
    from .converters.gguf_lora import PRECISIONS

    if adapter_precision is not None and adapter_precision not in PRECISIONS:
        raise UnsupportedFormatError(f"adapter precision must be one of {', '.join(PRECISIONS)}, got {adapter_precision!r}")
    profile = get_profile(device)
    plan = resolve_plan(profile, backend, quant)
    if adapter_precision is None:  # a float bundle's adapters stay float: there the engines are PEFT's exactly
        quantized = all(q not in FLOAT_QUANTS for _, q in plan)
        adapter_precision = profile.backends.adapter_precision if quantized else "f32"
    onnx_graph = onnx_graph or profile.backends.onnx_graph
    head_bits = head_bits or profile.backends.onnx_head_bits
    if head_bits not in (6, 8):
        raise UnsupportedFormatError(f"the LM head is kept in 6 or 8 bits, got {head_bits}")
    if onnx_graph not in ("fused", "optimum"):
        raise UnsupportedFormatError(f"onnx_graph must be 'fused' or 'optimum', got {onnx_graph!r}")
    base = model if isinstance(model, BaseModel) else load_base(model, progress=progress)
    threads = threads or min(os.cpu_count() or 1, 4)
    out = Path(out)
    if out.exists() and not replace:
        raise UnsupportedFormatError(f"{out} already exists; pass another --out or --replace to overwrite it")
    tokens = _eval_tokens(base, eval_tokens)
    artifacts: list[Artifact] = []
    with tempfile.TemporaryDirectory(prefix="edgelora-export-") as work, atomic_dir(out, replace=replace) as tmp:
        # MatMulQ41 reads adapters in the GGUF choice's width: f32, f16, or 8-bit blocks for q8_0
        ws = _ExportContext(base, Path(work), progress, profile, onnx_graph, {"q8_0": "q8"}.get(adapter_precision, adapter_precision),
                            head_bits)
        reference = float_scores(ws, tokens, threads, progress)
        for b, q in plan:
            artifacts.append(_build_artifact(ws, b, q, tmp, threads, tokens, reference, force))
        from .converters import hf

        (tmp / "tokenizer").mkdir()
        hf.write_tokenizer(base.tokenizer, tmp / "tokenizer")
        (tmp / "adapters").mkdir()
        write_bytes_atomic(tmp / MANIFEST, json.dumps(_manifest(tmp, base, profile, artifacts, tokens, adapter_precision),
                                                        indent=2).encode())
    return open_bundle(out)


def _build_artifact(ws: _ExportContext, b: str, q: str, tmp: Path, threads: int, tokens: list[int],
                    reference: _quality.Scores, force: bool) -> Artifact:
    """Builds one backend's files into the bundle being written, then checks them against the
    profile: memory (always refused over budget) and quality (refused over budget unless forced)."""
    base, profile, progress = ws.base, ws.profile, ws.progress
    t0 = time.monotonic()
    paths = BUILDERS[b](ws, q, tmp, threads)
    art = Artifact(b, q, [p.relative_to(tmp).as_posix() for p in paths], graph=ws.onnx_graph if b == "onnx" else "")
    art.memory = estimate_memory(base, profile, b, q, sum(p.stat().st_size for p in paths))
    if art.memory["total"] > profile.memory_budget_mb:
        m = art.memory
        raise MemoryBudgetError(
            f"{b} {q} needs ~{m['total']:.0f} MB on {profile.name} (weights {m['weights']:.0f} + KV cache "
            f"{m['kv_cache']:.0f} at context {m['context_length']} + activations {m['activations']:.0f} + runtime "
            f"{m['runtime']:.0f}), over its budget of {profile.memory_budget_mb} MB; choose a smaller quantization")
    art.export_seconds = time.monotonic() - t0
    engine = _engine_for(b, paths[0], threads, EVAL_WINDOW, base, provider="cpu")
    window, ref = EVAL_WINDOW, reference
    if q == "qdq":  # the NPU window is the profile's context, after the fixed prefix token
        window = engine.n_ctx
        ref = npu_reference(ws, tokens, window, engine.prefix, threads, progress)
    try:
        scores = _quality.score(engine.logits, tokens, window, progress=bar(f"{b} {q} perplexity", progress))
    finally:
        engine.close()
    report = _quality.compare(scores, ref, window)
    art.quality = report.to_dict()
    qb = profile.quality
    art.quality["within_budget"] = report.within(qb.max_perplexity_increase, qb.min_top1_agreement)
    if not art.quality["within_budget"] and not force:
        raise QualityBudgetError(
            f"{b} {q} on {profile.name}: perplexity {report.perplexity:.3f} vs float {report.float_perplexity:.3f} "
            f"({report.perplexity_change:+.1%}, budget +{qb.max_perplexity_increase:.0%}), top-1 agreement "
            f"{report.top1_agreement:.1%} (budget {qb.min_top1_agreement:.0%}); choose another --quant or pass --force")
    return art


def _manifest(tmp: Path, base: BaseModel, profile: DeviceProfile, artifacts: list[Artifact], tokens: list[int],
              adapter_precision: str = "f32") -> dict:
    """bundle.json: the base, the profile, each artifact and every file's size and sha256."""
    from . import __version__

    files = {}
    for p in sorted(tmp.rglob("*")):
        if p.is_file() and not p.relative_to(tmp).parts[0] == "adapters":  # the store keeps its own hashes
            files[p.relative_to(tmp).as_posix()] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    return {
        "format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, "edgelora": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "base": {"name": base.name, "fingerprint": base.fingerprint, "parameters": base.num_parameters,
                 "source_format": base.source_format, "source_dtype": base.source_dtype,
                 "architecture": base.config.to_dict()},
        "device": profile.to_dict(),
        "artifacts": [a.to_dict() for a in artifacts],
        "evaluation": {"text": f"edgelora/data/{_quality.HELDOUT}", "tokens": len(tokens), "window": EVAL_WINDOW,
                       "reference": "float32 model (F32 GGUF, llama.cpp, F32 KV cache)"},
        "files": files,
        "adapters": {"gguf_precision": adapter_precision},
    }


# -- reading --------------------------------------------------------------------------------


@dataclass
class Bundle:
    root: Path
    manifest: dict[str, Any]
    _slots: dict | None = field(default=None, repr=False, compare=False)  # the CPU ONNX graph's LoRA slots, read once

    @property
    def fingerprint(self) -> str:
        return self.manifest["base"]["fingerprint"]

    @property
    def profile(self) -> DeviceProfile:
        return get_profile(self.manifest["device"]["name"])

    @property
    def artifacts(self) -> list[Artifact]:
        return [Artifact(a["backend"], a["quant"], a["files"], a["memory_mb"], a["quality"], a["export_seconds"],
                         a.get("graph", "")) for a in self.manifest["artifacts"]]

    ARTIFACT_HEADER = ("backend", "quant", "file size", "memory", "perplexity", "float ppl", "change", "top-1 agree",
                       "in budget", "export")

    def artifact_table(self) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
        """(header, rows): each artifact's size, memory and quality against the float model."""
        rows = []
        for a in self.artifacts:
            size = sum(self.manifest["files"][f]["size"] for f in a.files)
            q = a.quality
            rows.append((a.backend, a.quant, f"{size / 1e6:.1f} MB", f"{a.memory['total']:.0f} MB",
                         f"{q['perplexity']:.3f}", f"{q['float_perplexity']:.3f}", f"{q['perplexity_change']:+.2%}",
                         f"{q['top1_agreement']:.1%}", "yes" if q["within_budget"] else "NO", f"{a.export_seconds:.0f}s"))
        return self.ARTIFACT_HEADER, rows

    def artifact(self, backend: str | None = None) -> Artifact:
        arts = self.artifacts
        for a in arts:
            if backend in (None, a.backend):
                return a
        raise SourceNotFoundError(f"{self.root} has no {backend} artifact (it has {', '.join(a.backend for a in arts)})")

    def path(self, rel: str) -> Path:
        return self.root / rel

    def verify(self, files: Iterable[str] | None = None) -> None:
        """Checks the size and sha256 of `files` (default: all) against the manifest."""
        bad = []
        for rel in self.manifest["files"] if files is None else files:
            info, p = self.manifest["files"][rel], self.root / rel
            if not p.exists():
                bad.append(f"{rel} is missing")
            elif p.stat().st_size != info["size"]:
                bad.append(f"{rel} has {p.stat().st_size} bytes, expected {info['size']}")
            elif sha256_file(p) != info["sha256"]:
                bad.append(f"{rel} has the wrong sha256")
        if bad:
            raise CorruptFileError(f"{self.root}: {'; '.join(bad)}; re-export the bundle")

    def tokenizer(self):
        from .converters import hf

        return hf.read_tokenizer(self.root / "tokenizer")

    @property
    def config(self):
        from .arch import ModelConfig

        return ModelConfig.from_dict(self.manifest["base"]["architecture"])

    @property
    def threads(self) -> int:
        """The profile's thread count, capped at this machine's cores (more threads than cores
        makes llama.cpp and OpenBLAS spin against each other)."""
        return max(1, min(int(self.manifest["device"]["threads"]), os.cpu_count() or 1))

    @property
    def backends(self) -> list[str]:
        return list(dict.fromkeys(a.backend for a in self.artifacts))

    @property
    def store(self):
        """The bundle's adapter store (install, list, info, remove)."""
        from .store import AdapterStore

        return AdapterStore(self.root / "adapters", fingerprint=self.fingerprint, config=self.config,
                            backends=self.backends, genai_slots=self._genai_slots(), gguf_precision=self.adapter_precision)

    def _genai_slots(self) -> dict | None:
        """The LoRA slots (name -> type) of the graph an onnxruntime-genai app loads, if any."""
        import onnx

        from .converters import onnx_fused

        art = self._cpu_onnx_artifact()
        if art is None:
            return None
        if self._slots is None:
            self._slots = onnx_fused.graph_slots(onnx.load(str(self.path(art.main)), load_external_data=False))
        return self._slots

    @property
    def adapter_precision(self) -> str:
        """What llama.cpp computes installed adapters in: f32, f16 or q8_0 (chosen at export)."""
        return self.manifest.get("adapters", {}).get("gguf_precision", "f32")

    def _cpu_onnx_artifact(self) -> Artifact | None:
        """The ONNX artifact a CPU runtime (and an onnxruntime-genai app) loads: not the NPU's QDQ graphs."""
        return next((a for a in self.artifacts if a.backend == "onnx" and a.quant != "qdq"), None)

    def export_app(self, out: str | os.PathLike, adapters: Iterable[str] = (), *, replace: bool = False) -> Path:
        """What an onnxruntime-genai app ships, as one directory: the CPU ONNX graph with its
        genai_config.json and tokenizer (``og.Model(out)``), and each adapter in `adapters` (names
        installed in the store: checked against its sha256 and this base) as
        ``adapters/NAME.onnx_adapter`` in the graph's slot layout (``og.Adapters(model).load``)."""
        from .converters import genai

        art = self._cpu_onnx_artifact()
        if art is None:
            raise SourceNotFoundError(f"{self.root} has no CPU ONNX artifact for an onnxruntime-genai app "
                                      f"(it has {', '.join(f'{a.backend} {a.quant}' for a in self.artifacts)})")
        if genai.CONFIG not in {Path(f).name for f in art.files}:
            raise UnsupportedFormatError(f"{self.root} was exported before bundles carried {genai.CONFIG}; re-export it")
        self.verify(art.files)
        store = self.store
        chosen = {name: store.open(name, "onnx")[1] for name in dict.fromkeys(adapters)}  # sha256 and fit checked
        out = Path(out)
        if out.exists() and not replace:
            raise UnsupportedFormatError(f"{out} already exists; pass another --out or --replace to overwrite it")
        with atomic_dir(out, replace=replace) as tmp:
            for rel in art.files:
                shutil.copy2(self.path(rel), tmp / Path(rel).name)
            if chosen:
                (tmp / "adapters").mkdir()
            for name, adapter in chosen.items():
                genai.write_adapter(adapter, tmp / "adapters" / f"{name}.onnx_adapter", self.config, self._genai_slots())
        return out

    def engine(self, backend: str | None = None, *, threads: int | None = None, n_ctx: int | None = None, **kw):
        """An engine over this bundle's artifact for `backend`; adapters installed in the store (now
        or later) are loaded by name the first time `set_adapters` asks for them."""
        art = self.artifact(backend)
        if art.quant == "qdq":
            kw.setdefault("provider", "htp" if "QNNExecutionProvider" in self.manifest["device"]["backends"]["execution_providers"] else "cpu")
        engine = _engine_for(art.backend, self.path(art.main), threads or self.threads,
                             n_ctx or min(self.manifest["device"]["context_length"], 4096),
                             tokenizer=self.tokenizer(), fingerprint=self.fingerprint, config=self.config, **kw)
        store = self.store
        engine.resolver = lambda name: store.open(name, art.backend)
        return engine


def open_source(source: str | os.PathLike, *, verify: bool = True, progress: bool = False) -> "Bundle | BaseModel":
    """A bundle directory as its Bundle, any other model source as its BaseModel (both have
    `config` and `fingerprint`)."""
    path = Path(source).expanduser()
    if (path / MANIFEST).exists():
        return open_bundle(path, verify=verify)
    return load_base(source, progress=progress)


def open_bundle(path: str | os.PathLike, *, verify: bool = True) -> Bundle:
    """Reads a bundle directory and (by default) checks every file's size and sha256."""
    root = Path(path)
    manifest_path = root / MANIFEST
    if not manifest_path.exists():
        raise SourceNotFoundError(f"{root} is not an edgelora bundle (no {MANIFEST}); create one with `edgelora export`")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"{manifest_path}: not valid JSON ({e}); re-export the bundle") from e
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT \
            or manifest.get("version") != BUNDLE_VERSION:
        raise UnsupportedFormatError(f"{root}: not an edgelora bundle of version {BUNDLE_VERSION}; re-export it")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
            isinstance(i, dict) and isinstance(i.get("size"), int) and isinstance(i.get("sha256"), str)
            and not Path(rel).is_absolute() and ".." not in Path(rel).parts for rel, i in files.items()):
        raise CorruptFileError(f"{manifest_path}: its file list is missing or malformed; re-export the bundle")
    base, device, arts = manifest.get("base"), manifest.get("device"), manifest.get("artifacts")
    if not (isinstance(base, dict) and isinstance(base.get("fingerprint"), str) and isinstance(base.get("architecture"), dict)
            and isinstance(device, dict) and isinstance(device.get("name"), str) and isinstance(arts, list) and arts
            and all(isinstance(a, dict) and {"backend", "quant", "files"} <= a.keys() for a in arts)):
        raise CorruptFileError(f"{manifest_path}: its base, device or artifacts entry is missing or malformed; "
                               "re-export the bundle")
    bundle = Bundle(root, manifest)
    if verify:
        bundle.verify()
    return bundle
