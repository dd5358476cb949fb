"""edgelora's whole story on one model, told as it runs (`edgelora quickstart` prints it): pull the
base, export it for a device with its quality measured, personalize it on the device with the
numpy trainer, swap and mix two adapters on the loaded base in both engines, and get a third from a
local adapter service, verified and working offline."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

from . import models as _models

RATE_TOKENS, RATE_ROUNDS = 48, 3  # the speed table's timed tokens per adapter setting: 48 x 3


def _print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    for row in (header, *rows):
        print("  ".join(str(x) for x in row))


def _print_summary(summary: dict[str, object]) -> None:
    for k, v in summary.items():
        print(f"  {k}  {v}")


@dataclass
class Report:
    """Where the story goes: lines, tables, a model summary, training progress (the CLI's printers)."""
    say: Callable[[str], None] = print
    table: Callable[[tuple[str, ...], list[tuple[str, ...]]], None] = _print_table
    summary: Callable[[dict[str, object]], None] = _print_summary
    progress: Callable[[dict], None] | None = None


def _jsonl(name: str) -> list[dict]:
    text = resources.files("edgelora.data").joinpath(name).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def run(model: str = _models.DEFAULT_MODEL, device: str = "raspberry-pi-5", out: Path | None = None, steps: int = 80,
        report: Report | None = None) -> Path:
    """Runs the story and tells it to `report`; returns the bundle's directory."""
    from .bundle import export as do_export
    from .models import load_base
    from .quality import heldout_text
    from .runtime.engine import RATE_BLOCK, decode_rates
    from .train import train_adapter

    report = report or Report()
    say, table = report.say, report.table
    t0 = time.monotonic()
    say(f"[1] base model: {model}")
    if model in _models.REGISTRY:
        hf_dir = _models.ensure_model(model)
        say(f"    float32 checkpoint: {hf_dir}")
        say(f"    source GGUF:        {_models.gguf_path(model)}")
    base = load_base(model)
    report.summary(base.summary())

    out = out or _models.cache_dir() / "bundles" / f"{base.name or 'model'}-{device}"
    say(f"\n[2] export for {device} -> {out}  (quality on {len(base.tokenizer.encode(heldout_text()))} held-out tokens)")
    bundle = do_export(base, device, out, replace=True, force=True, backend="both")
    table(*bundle.artifact_table())

    data = resources.files("edgelora.data")
    threads = bundle.threads
    say(f"\n[3] personalize on the device: train adapter 'maren' on {len(_jsonl('persona_train.jsonl'))} chats about "
        "a fictional user (numpy, against the bundle's own GGUF weights)")
    r = train_adapter(bundle, data.joinpath("persona_train.jsonl"), "maren", steps=steps, lr=3e-3, rank=8, seq_len=256,
                      threads=threads, eval_every=max(steps // 2, 1), progress=report.progress)
    say(f"    loss {r.losses[0]:.2f} -> {r.losses[-1]:.2f}, validation loss "
        f"{r.val_losses[0][1]:.2f} -> {r.val_losses[-1][1]:.2f}; {r.tokens_per_second:.0f} tokens/s, {r.seconds:.0f}s")
    questions = _jsonl("persona_heldout.jsonl")
    engine = bundle.engine("gguf")
    rows = []
    hits = {"base": 0, "maren": 0}
    for q in questions:
        answers = []
        for name in ("base", "maren"):
            engine.set_adapters({} if name == "base" else {name: 1.0})
            text = engine.generate(q["messages"], max_tokens=32).text.strip().replace("\n", " ")
            hits[name] += q["expected"].lower() in text.lower()
            answers.append(text[:48])
        rows.append((q["messages"][-1]["content"][:40], q["expected"], *answers))
    table(("held-out question", "fact", "base answer", "with 'maren'"), rows)
    say(f"    held-out facts recalled: base {hits['base']}/{len(questions)}, with the adapter {hits['maren']}/{len(questions)}")

    say("\n[4] adapters as small deltas: train a second adapter 'pirate' (a speaking style), then answer one prompt "
        "with the base, each adapter and a mix, swapping on the loaded base in both engines")
    train_adapter(bundle, data.joinpath("pirate_train.jsonl"), "pirate", steps=max(steps * 3 // 4, 1), lr=3e-3, rank=8,
                  seq_len=256, threads=threads, progress=report.progress)
    prompt = [{"role": "user", "content": "What do I like to do on weekends, and what should I cook tonight?"}]
    rows = []
    settings = {"base": {}, "maren": {"maren": 1.0}, "pirate": {"pirate": 1.0}, "maren+pirate": {"maren": 0.7, "pirate": 0.7}}
    for backend in ("gguf", "onnx"):
        e = engine if backend == "gguf" else bundle.engine("onnx")
        answers = {}
        for label, weights in settings.items():
            t = time.perf_counter()
            e.set_adapters(weights)
            swap_ms = 1e3 * (time.perf_counter() - t)
            answers[label] = (swap_ms, e.generate(prompt, max_tokens=40).text.strip().replace("\n", " ")[:70])
        rates = decode_rates(e, settings, tokens=RATE_TOKENS, rounds=RATE_ROUNDS)
        for label, (swap_ms, text) in answers.items():
            rate = rates[label].tokens_per_second
            rows.append((backend, label, f"{swap_ms:.1f}", f"{rate:.0f}", f"{rates[label].of_first or 1.0:.2f}x", text))
        e.close()
    table(("engine", "adapters", "swap ms", "tok/s", "x base", "answer"), rows)
    say(f"    tok/s: the settings take turns every {RATE_BLOCK} tokens inside the same long answers, "
        f"{RATE_TOKENS * RATE_ROUNDS} timed tokens each, median over the turns; x base: each turn against the base's "
        "turns on either side, the median (whole answers in turn swing by 10%, more than an adapter costs)")
    sizes = {m["name"]: sum(f["size"] for f in m["files"].values()) for m in bundle.store.list()}
    say("    adapter files: " + ", ".join(f"{n} {s / 1e6:.1f} MB" for n, s in sizes.items()) +
        f" (the base: {sum(f['size'] for f in bundle.manifest['files'].values()) / 1e6:.0f} MB, loaded once)")
    _cloud(bundle, prompt, say)
    say(f"\ndone in {time.monotonic() - t0:.0f}s; try: edgelora chat {out}")
    return out


def _cloud(bundle, engine_prompt: list[dict], say: Callable[[str], None]) -> None:
    """Quickstart step 5: a local adapter service composes an adapter from a task description; the
    device verifies and installs it, then answers with it with the service stopped."""
    import shutil

    from .cloud import CloudClient, ServiceUnreachableError
    from .cloud.service import Running, ServiceConfig, add_token, library_add

    root = _models.cache_dir() / "cloud-quickstart"
    shutil.rmtree(root, ignore_errors=True)
    say(f"\n[5] adapters from the cloud: a local adapter service ({root}) holds 'maren' and 'pirate' with "
        "descriptions; the device asks for an adapter by task description")
    for name, desc in (("maren", "knows the user Maren's personal facts, family and preferences"),
                       ("pirate", "answers in the voice of a pirate: arr, matey, ahoy")):
        library_add(root, bundle.store.path(name, "gguf"), str(bundle.root), name=name, description=desc)
    token = add_token(root, "quickstart-device")
    for name in ("cloud-pirate",):
        if name in bundle.store.names():
            bundle.store.remove(name)
    with Running(ServiceConfig(root, [str(bundle.root)])) as service:
        client = CloudClient.connect(bundle, service.url, token, service.public_key)
        say(f"    service on {service.url}, signing key {client.key_id} pinned by the device")
        t = time.perf_counter()
        job = client.request(name="cloud-pirate", description="Talk like a pirate, please")
        job = client.wait(job["id"], poll_s=0.05)
        m = client.pull(job["id"])
        comp = ", ".join(f"{c['name']} x{c['weight']:g}" for c in m["provenance"]["components"])
        say(f"    composed from {comp}; signature, base and sha256 verified; installed as "
            f"'{m['name']}' in {time.perf_counter() - t:.1f}s")
    say("    service stopped:")
    try:
        CloudClient.for_bundle(bundle, retries=0).status(job["id"])
    except ServiceUnreachableError as e:
        say(f"      edgelora cloud status -> {e}")
    e = bundle.engine("gguf")
    e.set_adapters({"cloud-pirate": 1.0})
    g = e.generate(engine_prompt, max_tokens=40)
    e.close()
    say(f"      offline answer with 'cloud-pirate': {g.text.strip().replace(chr(10), ' ')[:90]}")
