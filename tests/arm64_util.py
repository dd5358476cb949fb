"""The arm64 check's host side: set up the emulator (scripts/arm64.sh), run `arm64_probe.py` on the same
bundles natively and under qemu-aarch64, and compare the two key by key.

    python -m tests.arm64_util [--tiny]      the table scripts/arm64.sh prints

Float artifacts must agree to rounding (different kernels sum in a different order); quantized ones by
KL divergence and top-1 agreement, since the arm64 kernels quantize activations their own way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgelora.quality import mean_kl

ROOT = Path(__file__).resolve().parents[1]
PROBE = Path(__file__).with_name("arm64_probe.py")
CHATS = [("What's my dog called?", "Your dog is called Pepper."), ("Where did I grow up?", "You grew up in Dunmore."),
         ("What do I do?", "You are a civil engineer."), ("What do I like to eat?", "You love mushroom risotto.")]

# Tolerances. Float artifacts (llama.cpp with an f32 KV cache, ONNX f32) must agree to rounding: the
# largest logit difference relative to the logits' spread. Quantized ones (and llama.cpp's default f16
# KV cache) cannot: the arm64 kernels quantize activations their own way (llama.cpp's repacked ARM
# kernels, MLAS's ARM int8 paths), so arm64 and x86 differ by about as much as each differs from the
# float model. What must hold is that arm64 is as accurate as x86: its KL to the float model (same
# adapters) at most KL_RATIO x86's plus KL_FLOOR, its top-1 agreement with it at most TOP1_DROP below.
FLOAT_REL = 1e-5
KL_RATIO, KL_FLOOR, TOP1_DROP = 1.5, 1e-3, 0.1
TRAIN_REL = 1e-3
N_TOKENS = 48


class Unavailable(Exception):
    """The emulator cannot be set up here; the message says why in one line."""


@dataclass
class Emulator:
    qemu: str
    sysroot: str
    python: str
    site: str
    profiles: dict  # name -> {"cpu": QEMU's CPU model, "march": ..., "llama": the library's directory}
    ort_ops: str = ""  # edgelora's ONNX Runtime operator library, cross-compiled ("" when not built)
    edgelora_site: str = ""

    @classmethod
    def setup(cls, timeout: float = 3600) -> "Emulator":
        """Runs `scripts/arm64.sh setup` (cached after the first time); Unavailable when it cannot."""
        r = subprocess.run(["bash", str(ROOT / "scripts" / "arm64.sh"), "setup"], capture_output=True, text=True,
                           timeout=timeout)
        if r.returncode:
            lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
            raise Unavailable(lines[-1] if lines else f"scripts/arm64.sh exited {r.returncode}")
        return cls(**json.loads(Path(r.stdout.strip().splitlines()[-1]).read_text()))

    def install_edgelora(self, dest: Path) -> None:
        """This checkout's edgelora (pure Python) into `dest`, for the arm64 interpreter's path."""
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--target", str(dest), str(ROOT)], check=True, capture_output=True)
        self.edgelora_site = str(dest)

    def command(self, *args: str, profile: str = "raspberry-pi-5") -> tuple[list[str], dict]:
        """The argv and environment that run `python3.11 ARGS` on the arm64 interpreter, as `profile`'s CPU."""
        p = self.profiles[profile]
        env = {**os.environ, "QEMU_CPU": p["cpu"], "LLAMA_CPP_LIB_PATH": p["llama"],
               "PYTHONPATH": os.pathsep.join(p for p in (self.edgelora_site, self.site) if p),
               "PYTHONNOUSERSITE": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        env.pop("PYTHONHOME", None)
        return [self.qemu, "-L", self.sysroot, self.python, *args], env

    def run(self, *args: str, profile: str = "raspberry-pi-5", timeout: float = 1800) -> subprocess.CompletedProcess:
        argv, env = self.command(*args, profile=profile)
        # not from the checkout: its edgelora/ (without converters/, which installs into it) would shadow the install
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout,
                              cwd=self.edgelora_site or "/")


def probe(bundle: Path, out: Path, ids: list[int], adapters: list[str], *, emulator: Emulator | None = None,
          profile: str = "raspberry-pi-5", train: bool = True, backends: str = "") -> dict:
    """Runs the probe natively (emulator None) or under qemu; returns {key: array} plus "meta"."""
    args = [str(PROBE), str(bundle), str(out), "--ids", ",".join(map(str, ids)), "--adapters", ",".join(adapters)]
    if backends:
        args += ["--backends", backends]
    if train:
        data = out.with_suffix(".jsonl")
        data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                         {"role": "assistant", "content": a}]}) + "\n"
                                for q, a in CHATS))
        args += ["--train", str(data)]
    t0 = time.perf_counter()
    if emulator is None:
        r = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=1800,
                           env={**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"})
    else:
        r = emulator.run(*args, profile=profile)
    if r.returncode:
        where = "under qemu-aarch64" if emulator else "on x86"
        raise RuntimeError(f"the probe failed {where}:\n{r.stderr[-3000:]}")
    with np.load(out) as z:
        result = {k: z[k] for k in z.files}
    result["meta"] = json.loads(result["meta"].tobytes())
    result["meta"]["seconds_wall"] = time.perf_counter() - t0
    return result



def _top1(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(-1) == b.argmax(-1)).mean())


@dataclass
class Row:
    artifact: str
    case: str
    max_abs: float  # arm64 vs x86
    rel: float
    kl: float
    top1: float
    kl_float: tuple[float, float] | None  # (x86, arm64) against the float model with the same adapters
    top1_float: tuple[float, float] | None
    ok: bool

    def cells(self) -> tuple[str, ...]:
        vs_float = ((f"{self.kl_float[0]:.1e} / {self.kl_float[1]:.1e}", f"{self.top1_float[0]:.0%} / {self.top1_float[1]:.0%}")
                    if self.kl_float else ("-", "-"))
        return (self.artifact, self.case, f"{self.max_abs:.1e}", f"{self.rel:.1e}", f"{self.kl:.1e}",
                f"{self.top1:.0%}", *vs_float, "ok" if self.ok else "DIFFERS")


HEADER = ("artifact", "case", "max |Δlogit|", "rel. spread", "KL arm‖x86", "top-1 =", "KL to float x86 / arm",
          "top-1 float x86 / arm", "")


def _exact(artifact: str) -> bool:
    return artifact.endswith("f32")


def compare(x86: dict, arm: dict, reference: dict[str, np.ndarray] | None = None) -> tuple[list[Row], list[str]]:
    """Rows for every logits key the two runs share, and problems: an engine that failed on one side,
    greedy tokens that differ, a trained adapter beyond tolerance. `reference`: the float model's
    logits per case (needed to judge quantized artifacts; without it they are reported only)."""
    problems = [f"{k.split('/', 1)[1]} failed {side}: {v}" for side, run in (("on x86", x86), ("on arm64", arm))
                for k, v in run["meta"].items() if k.startswith("error/")]
    failed = {k.split("/", 1)[1] for run in (x86, arm) for k in run["meta"] if k.startswith("error/")}
    rows = []
    for key in sorted(k for k in x86 if "/" in k and not k.startswith(("train/", "meta")) and not k.endswith("/tokens")):
        if key not in arm:
            if key.split("/")[0] not in failed:
                problems.append(f"{key} is missing on arm64")
            continue
        a, b = x86[key], arm[key]
        artifact, case = key.split("/")
        diff = float(np.abs(a - b).max())
        rel = diff / float(a.max() - a.min())
        ref = reference.get(case) if reference else None
        kl_float = (mean_kl(ref, a), mean_kl(ref, b)) if ref is not None else None
        top1_float = (_top1(ref, a), _top1(ref, b)) if ref is not None else None
        if _exact(artifact):
            ok = rel <= FLOAT_REL
        else:
            ok = (kl_float is not None and kl_float[1] <= KL_RATIO * kl_float[0] + KL_FLOOR
                  and top1_float[1] >= top1_float[0] - TOP1_DROP)
        rows.append(Row(artifact, case, diff, rel, mean_kl(a, b), _top1(a, b), kl_float, top1_float, ok))
    for key in (k for k in x86 if k.endswith("/tokens")):
        if key in arm and not np.array_equal(x86[key], arm[key]) and _exact(key.split("/")[0]):
            problems.append(f"{key}: greedy tokens differ: x86 {x86[key].tolist()} vs arm64 {arm[key].tolist()}")
    for key in (k for k in x86 if k.startswith("train/") and k != "train/losses"):
        a, b = x86[key], arm.get(key)
        if b is None:
            problems.append(f"{key} is missing on arm64")
        elif np.abs(a - b).max() > TRAIN_REL * np.abs(a).max():
            problems.append(f"{key}: trained weights differ by {np.abs(a - b).max():.2e} (scale {np.abs(a).max():.2e})")
    return rows, problems


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows])


# -- bundles ----------------------------------------------------------------------------------

TINY_PLANS = {"f32": ("both", "f32"), "q8": ("gguf", "q8_0"), "q4": ("gguf", "q4_0"), "int4": ("onnx", "int4")}


def export_with_adapters(model, out: Path, backend: str | None, quant: str | None, adapters=("a", "b"),
                         eval_tokens: int = 256) -> Path:
    """Exports `model` for the Pi 5 and installs two random adapters (rank 8 on every projection,
    rank 4 on three) in its store."""
    import edgelora
    from edgelora.adapters import random_adapter

    bundle = edgelora.export(model, "raspberry-pi-5", out, backend=backend, quant=quant, force=True,
                             eval_tokens=eval_tokens, progress=False, threads=2)
    for i, name in enumerate(adapters):
        targets = ("q", "k", "v", "o", "gate", "up", "down") if i == 0 else ("q", "v", "down")
        bundle.store.install(random_adapter(bundle.config, rank=8 if i == 0 else 4, seed=i + 1, targets=targets,
                                            fingerprint=bundle.fingerprint), name)
    return out


def tiny_bundles(work: Path) -> tuple[Path, dict[str, Path]]:
    """The tiny Llama (its directory) exported four ways: f32 (both engines), Q8_0 and Q4_0 GGUF, int4 ONNX."""
    from tests.conftest import build_tiny_llama

    import edgelora

    model = build_tiny_llama(work / "tiny")
    base = edgelora.load_base(model)
    return model, {k: export_with_adapters(base, work / f"bundle-{k}", b, q) for k, (b, q) in TINY_PLANS.items()}


def probe_ids(bundle) -> list[int]:
    """The first N_TOKENS tokens of the shipped held-out text."""
    from edgelora.quality import heldout_text

    return bundle.tokenizer().encode(heldout_text(), add_special_tokens=False)[:N_TOKENS]


def float_reference(model, bundle_path: Path, ids: list[int], adapters: list[str], work: Path) -> dict[str, np.ndarray]:
    """The float model's logits for the probe's cases, with the bundle's adapters: its F32 GGUF in
    llama.cpp with an F32 KV cache (equal to transformers, tests/test_engines.py)."""
    import edgelora
    from edgelora.converters import gguf_model, save_adapter
    from edgelora.runtime.gguf import GGUFEngine

    base = edgelora.load_base(model)
    bundle = edgelora.open_bundle(bundle_path)
    path = work / f"float-{base.fingerprint.split(':')[1][:16]}.gguf"
    if not path.exists():
        gguf_model.write(base, path, "F32")
    engine = GGUFEngine(path, n_ctx=len(ids) + 16, threads=os.cpu_count() or 1, kv_type="f32",
                        fingerprint=base.fingerprint)
    for name in adapters:
        _, adapter = bundle.store.open(name, bundle.backends[0])
        engine.load_adapter(name, save_adapter(adapter, work / f"float-{name}.gguf", "gguf", base.config))
    out = {"base": engine.logits(ids)}
    out["cleared"] = out["base"]
    if adapters:
        for case, weights in (("adapter", {adapters[0]: 1.0}), ("swapped", {adapters[-1]: 1.0}),
                              ("mix", {adapters[0]: 0.7, adapters[-1]: 0.5})):
            engine.set_adapters(weights)
            out[case] = engine.logits(ids)
    engine.close()
    return out


def check(bundle: Path, work: Path, emulator: Emulator, model, *, profile: str = "raspberry-pi-5",
          train: bool = True, backends: str = "") -> tuple[list[Row], list[str], dict, dict]:
    """The probe on `bundle` (exported from `model`) on x86 and under qemu as `profile`'s CPU, compared."""
    import edgelora

    b = edgelora.open_bundle(bundle)
    ids = probe_ids(b)
    adapters = sorted(b.store.names())
    tag = f"{bundle.name}-{profile}"
    x86 = probe(bundle, work / f"{tag}-x86.npz", ids, adapters, train=train, backends=backends)
    arm = probe(bundle, work / f"{tag}-arm64.npz", ids, adapters, emulator=emulator, profile=profile, train=train,
                backends=backends)
    rows, problems = compare(x86, arm, float_reference(model, bundle, ids, adapters, work))
    return rows, problems, x86["meta"], arm["meta"]


def main(argv: list[str] | None = None) -> int:
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="the tiny model only (skip the default model)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        emulator = Emulator.setup()
    except Unavailable as e:
        print(f"arm64: skipped: {e}", file=sys.stderr)
        return 3
    print(f"emulator ready in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    all_rows, all_problems = [], []
    with tempfile.TemporaryDirectory(prefix="edgelora-arm64-") as tmp:
        work = Path(tmp)
        emulator.install_edgelora(work / "site")
        tiny, made = tiny_bundles(work)
        bundles = {f"tiny {k}": (tiny, p) for k, p in made.items()}
        if not args.tiny:
            import edgelora

            bundles["default pi5"] = (edgelora.DEFAULT_MODEL, export_with_adapters(
                edgelora.DEFAULT_MODEL, work / "bundle-default", None, None, eval_tokens=512))
        for label, (model, path) in bundles.items():
            # the Q4_0 bundle on every -march the profiles name (profiles sharing one are run once)
            marches: dict[str, str] = {}
            for name, p in sorted(emulator.profiles.items()):
                marches.setdefault(p["march"], name)
            for profile in (sorted(marches.values()) if label == "tiny q4" else ["raspberry-pi-5"]):
                t1 = time.perf_counter()
                rows, problems, _, meta = check(path, work, emulator, model, profile=profile,
                                                train=label.startswith("tiny"))
                print(f"{label} on {profile}: {time.perf_counter() - t1:.0f}s", file=sys.stderr)
                for r in rows:
                    r.artifact = f"{label} {r.artifact}" + ("" if profile == "raspberry-pi-5" else f" ({profile})")
                all_rows += rows
                all_problems += [f"{label} ({profile}): {p}" for p in problems]
    print(table(HEADER, [r.cells() for r in all_rows]))
    for p in all_problems:
        print(f"PROBLEM: {p}")
    bad = [r for r in all_rows if not r.ok]
    print(f"\n{len(all_rows) - len(bad)}/{len(all_rows)} within tolerance; {len(all_problems)} problems; "
          f"{time.perf_counter() - t0:.0f}s")
    return 1 if bad or all_problems else 0


if __name__ == "__main__":
    sys.exit(main())
