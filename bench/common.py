"""Shared by the benchmarks: the default model's bundles, timing, tables and JSON output."""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

from edgelora.runtime.engine import SPEED_PROMPT

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results"  # committed: the README's table is made from it (bench/report.py)
PROMPT = SPEED_PROMPT  # a chat prompt whose answer runs long: what decode speeds are measured on


SIZES = ("135m", "1b")
# Llama-3.2-1B's shape (tied embeddings, llama3 rope scaling); its tokenizer is the default model's,
# the embedding padded to Llama 3's 128256 rows as Llama 3's is (what a token costs includes them)
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
                rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
                rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192})


NAMES = {"135m": "SmolLM2-135M", "1b": "Llama-3.2-1B shape (random weights)"}


def named(stem: str, size: str, threads: int | None = None) -> str:
    """A cache entry's or output file's stem: the 135M model's keeps its old name, other sizes carry
    theirs; results of one thread count carry it (adapters-1b-2t.json)."""
    return (stem if size == "135m" else f"{stem}-{size}") + (f"-{threads}t" if threads else "")


def hf_dir(size: str) -> str:
    """The float Hugging Face checkpoint behind `size` (what PEFT+torch and genai's builder read)."""
    import edgelora

    return str(edgelora.models.ensure_model(edgelora.DEFAULT_MODEL)) if size == "135m" else model(size)


def model(size: str = "135m") -> str:
    """The model a benchmark runs at `size`: the default model, or a Llama-3.2-1B-shaped model with
    random weights made here once (no download; decode and training speed do not depend on the
    values, so its quality figures mean nothing and are not shown)."""
    import edgelora

    if size == "135m":
        return edgelora.DEFAULT_MODEL
    if size != "1b":
        raise SystemExit(f"--size must be one of {', '.join(SIZES)}, not {size!r}")
    out = edgelora.models.cache_dir() / "bench" / "llama-3.2-1b-shape"
    if not (out / "model.safetensors").exists():
        import shutil
        import tempfile

        import torch
        import transformers as tf

        src = edgelora.models.ensure_model(edgelora.DEFAULT_MODEL)
        print(f"making a Llama-3.2-1B-shaped model with random weights in {out} (once)", file=sys.stderr)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".1b-"))
        for f in src.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                shutil.copy(f, tmp / f.name)
        torch.manual_seed(0)
        cfg = tf.LlamaConfig(bos_token_id=1, eos_token_id=2, **LLAMA_1B)
        m = tf.LlamaForCausalLM(cfg).to(torch.bfloat16)  # bf16, as Llama 3.2 ships
        m.save_pretrained(tmp, safe_serialization=True, max_shard_size="10GB")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    return str(out)


# What a bundle's files are made by: a cached bench bundle is rebuilt when any of these changed.
EXPORTER = ("converters", "edgelora/bundle.py", "edgelora/base.py", "edgelora/arch.py", "edgelora/rope.py")


def exporter_key() -> str:
    import hashlib

    h = hashlib.sha256()
    for entry in EXPORTER:
        for f in sorted((ROOT / entry).rglob("*.py")) if (ROOT / entry).is_dir() else [ROOT / entry]:
            h.update(f.relative_to(ROOT).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def bundle(device: str, backend: str, quant: str, *, name: str | None = None, size: str = "135m",
           adapter_precision: str = "f32"):
    """A bundle of the model at `size`, exported once and kept in the cache; exported again when the
    exporter's code (EXPORTER) changed since."""
    import edgelora

    stem = name or f"{device}-{backend}-{quant}"
    path = edgelora.models.cache_dir() / "bench" / named(stem, size)
    key, stamp = exporter_key(), path.with_name(path.name + ".exporter")
    if (path / "bundle.json").exists() and stamp.exists() and stamp.read_text() == key:
        return edgelora.open_bundle(path, verify=False)
    if path.exists():
        print(f"exporting {path.name} again: the exporter changed since it was made", file=sys.stderr)
    b = edgelora.export(model(size), device, path, backend=backend, quant=quant, force=True, replace=True,
                        eval_tokens=None if size == "135m" else 256, adapter_precision=adapter_precision)
    stamp.write_text(key)
    return b


GENAI_BUILDER_PACKAGES = ("torch==2.13.0", "transformers>=5", "onnx", "onnx_ir", "peft", "sentencepiece")


def genai_python(given: str | None = None) -> str:
    """A Python whose onnxruntime-genai model builder runs: `given`, else a venv in the cache made
    once (the builder needs transformers 5, edgelora's tests pin 4.x; torch stays the CPU build)."""
    import subprocess

    if given:
        return given
    import edgelora
    import onnxruntime_genai

    venv = edgelora.models.cache_dir() / "genai-builder"
    py = venv / "bin" / "python"
    if not py.exists():
        print(f"making {venv} for onnxruntime-genai's builder (once, a few minutes)", file=sys.stderr)
        tmp = venv.with_name(venv.name + ".partial")
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(tmp)], check=True)
        subprocess.run([str(tmp / "bin" / "python"), "-m", "pip", "install", "-q", *GENAI_BUILDER_PACKAGES,
                        f"onnxruntime-genai=={onnxruntime_genai.__version__}"], check=True)
        tmp.rename(venv)  # a venv's scripts name their directory: use its python by path only
    return str(py)


def genai_build(hf_dir: str | Path, out: Path, python: str, adapter_dir: Path | None = None) -> Path:
    """onnxruntime-genai's own int4 CPU build of a float checkpoint (with a PEFT adapter built in
    when given: its builder's `adapter_path`), cached at `out`."""
    import subprocess

    if (out / "genai_config.json").exists():
        return out
    tmp = out.with_name(out.name + ".partial")
    cmd = [python, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(tmp), "-p", "int4", "-e", "cpu"]
    if adapter_dir is not None:
        cmd += ["--extra_options", f"adapter_path={adapter_dir}"]
    print(f"onnxruntime-genai's builder: {out.name}", file=sys.stderr)
    built = subprocess.run(cmd, capture_output=True, text=True)
    if built.returncode:
        raise RuntimeError(f"onnxruntime-genai's builder failed: {(built.stderr.strip().splitlines() or ['?'])[-1]}")
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def genai_model(path: Path, threads: int):
    """An og.Model of a genai build, its session pinned to `threads` (as every other side is)."""
    import onnxruntime_genai as og

    cfg_path = path / "genai_config.json"
    gcfg = json.loads(cfg_path.read_text())
    gcfg["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
    cfg_path.write_text(json.dumps(gcfg, indent=2))
    cfg = og.Config(str(path))
    cfg.clear_providers()
    return og.Model(cfg)


def genai_rate(model, tokens: int) -> float:
    """Decode tokens/s of genai's own generator after the speed prompt (prefill excluded)."""
    import onnxruntime_genai as og

    tok = og.Tokenizer(model)
    prompt = tok.encode(PROMPT[0]["content"])
    params = og.GeneratorParams(model)  # min_length: no early end of sequence, `tokens` are always timed
    params.set_search_options(max_length=4096, min_length=len(prompt) + tokens, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    t0 = time.perf_counter()
    n = 0
    while n < tokens and not gen.is_done():  # count only tokens really generated (not calls after EOS)
        gen.generate_next_token()
        n += 1
    return n / (time.perf_counter() - t0)


def read_bandwidth(threads: int = 1, gib: float = 1.0) -> float:
    """The machine's read bandwidth in bytes/s: `threads` threads each summing its share of `gib`
    GiB with numpy (which releases the GIL), best of three. A decode that reads B bytes per token
    at r tokens/s uses B*r of it."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    parts = [np.ones(int(gib * (1 << 30)) // 8 // threads) for _ in range(threads)]
    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(4):  # the first pass faults the pages in
            t = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = max(best, sum(p.nbytes for p in parts) / (time.perf_counter() - t))
    return best


def artifact_bytes(b, art) -> int:
    """The artifact's files' bytes."""
    return sum(b.manifest["files"][f]["size"] for f in art.files)


def initializer_bytes(init) -> int:
    """An ONNX initializer's bytes (from its dims and type: no data loaded)."""
    import numpy as np
    from onnx import helper

    return int(np.prod(init.dims, dtype=np.int64)) * np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize


def read_bytes(b, art) -> int:
    """What one decoded token reads at least: the artifact's files once, less an ONNX graph's
    embedding table when nothing but the lookup reads it (a token takes one row; a tied 8-bit head
    reads the whole table, a 6-bit head or a float graph's own head does not)."""
    total = artifact_bytes(b, art)
    if art.backend != "onnx":
        return total
    import onnx

    model = onnx.load(str(b.root / art.files[0]), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    lookup = [n for n in model.graph.node if n.op_type in ("Gather", "GatherBlockQuantized") and "input_ids" in n.input]
    table = {t for n in lookup for t in n.input if t in inits}
    for n in model.graph.node:  # through the Reshape in front of GatherBlockQuantized
        if n.op_type == "Reshape" and any(o in x.input for o in n.output for x in lookup):
            table |= {t for t in n.input if t in inits and t.startswith("embed")}
    readers = {n.name for n in model.graph.node for t in n.input if t in table}
    if readers - {n.name for n in lookup} - {n.name for n in model.graph.node if n.op_type == "Reshape"}:
        return total  # the head reads the table too
    return total - sum(initializer_bytes(inits[t]) for t in table)


def best_of(fn: Callable[[], float], repeat: int = 3) -> float:
    """The best (lowest-noise) of `repeat` measurements of a rate returned by `fn`."""
    return max(fn() for _ in range(repeat))


def median_seconds(fn: Callable[[], object], repeat: int = 20) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def decode_rate(engine, max_tokens: int = 64) -> float:
    g = engine.generate(PROMPT, max_tokens=max_tokens)
    return g.decode_tokens_per_second


def table(header: tuple[str, ...], rows: list[tuple]) -> str:
    cells = [tuple(str(c) for c in header)] + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(name: str, data: dict) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=str))
    return path


def machine() -> dict:
    import platform

    return {"python": sys.version.split()[0], "machine": platform.machine(), "cpus": os.cpu_count(),
            "load_average": os.getloadavg()}


def llama_cpp_decode_rate(llm, prompt: str, tokens: int) -> float:
    """llama.cpp's own decode tokens/s on a llama_cpp.Llama (its perf counters, prompt processing
    excluded), on its own LoRA nodes (edgelora's fused node off while it runs)."""
    import llama_cpp

    from edgelora.runtime.gguf import llama_cpp_own_lora

    with llama_cpp_own_lora():
        llm.reset()
        llama_cpp.llama_perf_context_reset(llm.ctx)
        llm.create_completion(prompt, max_tokens=tokens, temperature=0.0)
    perf = llama_cpp.llama_perf_context(llm.ctx)
    return perf.n_eval / (perf.t_eval_ms / 1e3)


@contextlib.contextmanager
def env(**values: str | None) -> Iterator[None]:
    """Environment variables set (None: left as they are) for the block, then restored."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update({k: v for k, v in values.items() if v is not None})
    try:
        yield
    finally:
        for k, v in saved.items():
            if values[k] is None:
                continue
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
