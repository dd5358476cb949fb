"""A hostile user's inputs (issue 16): adapters that would make the model output NaN, corrupt files,
names, concurrent writers, killed runs, type-confused JSON and odd values. Each gets one line (an
`EdgeloraError`; exit 2 from the CLI) or works; nothing is lost, overwritten or crashes natively.
The fuzz tests mutate every reader's input (truncations, byte flips, type-confused JSON) and check
the property "one-line EdgeloraError, or a value whose tensors are finite"; GGUF LoRA files the
reader accepts are then loaded by llama.cpp in a subprocess, so a crash there would show."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import edgelora
from edgelora.adapters import AdapterError, LoraAdapter, LoraTensor, random_adapter
from edgelora.converters import gguf_model, load_adapter, save_adapter
from edgelora.errors import CorruptFileError, EdgeloraError
from edgelora.runtime.engine import EngineError, EngineInputError
from edgelora.train import TrainerError, train_adapter
from edgelora.train.data import DataError
from tests.conftest import train_killed_at
from tests.peft_util import make_peft_adapter

pytestmark = pytest.mark.usefixtures("isolated_cache")


@pytest.fixture(scope="module")
def bundle(tiny_llama, tmp_path_factory, isolated_cache):
    return edgelora.export(tiny_llama, "x86-64", tmp_path_factory.mktemp("hard") / "b", backend="both", quant="f32",
                           eval_tokens=512, progress=False)


@pytest.fixture
def store(bundle):
    s = bundle.store
    for name in s.names():
        s.remove(name)
    return s


def _chats(path: Path, n: int = 8) -> Path:
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Dog's name? ({i})"},
                                                     {"role": "assistant", "content": "Pepper."}]}) + "\n"
                            for i in range(n)))
    return path


def _one_line(result, code: int = 2, text: str = "") -> str:
    """The CLI's error: exit `code`, one line starting 'edgelora: error:' (containing `text`)."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, result.stderr
    assert len(lines) == 1 and lines[0].startswith("edgelora: error: "), result.stderr
    assert text in lines[0], lines[0]
    return lines[0]


def _refused_or_loaded(read, path: Path) -> str:
    """The fuzz property: `read(path)` raises an EdgeloraError with a one-line message, or returns a
    value whose arrays are all finite. Anything else is recorded (the test fails listing them all)."""
    try:
        value = read(path)
    except EdgeloraError as e:
        if not str(e) or "\n" in str(e):
            _CRASHES.append(f"{path.name}: a message of {len(str(e).splitlines())} lines: {e!r}")
        return "refused"
    except Exception as e:  # noqa: BLE001 - the point of the test
        _CRASHES.append(f"{path.name}: {type(e).__name__}: {e}")
        return "crashed"
    if isinstance(value, LoraAdapter) and not all(np.isfinite(t.A).all() and np.isfinite(t.B).all()
                                                  for t in value.tensors.values()):
        _CRASHES.append(f"{path.name}: loaded with non-finite tensors")
    return "loaded"


_CRASHES: list[str] = []


@pytest.fixture(autouse=True)
def _no_crashes():
    _CRASHES.clear()
    yield
    assert not _CRASHES, f"{len(_CRASHES)} inputs not refused in one line: " + "; ".join(_CRASHES[:20])


def _mutants(src: Path, out: Path, n: int, seed: int, header: int | None = None) -> list[Path]:
    """Truncations at `n` points and `n` single-byte flips (half in the first `header` bytes)."""
    data = src.read_bytes()
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, keep in enumerate(np.linspace(0, len(data) - 1, n).astype(int)):
        paths.append(out / f"cut{i}{src.suffix}")
        paths[-1].write_bytes(data[:keep])
    head = min(header or len(data), len(data))
    for i in range(n):
        pos = int(rng.integers(head if i % 2 == 0 else len(data)))
        flipped = bytearray(data)
        flipped[pos] ^= int(rng.integers(1, 256))
        paths.append(out / f"flip{i}-{pos}{src.suffix}")
        paths[-1].write_bytes(bytes(flipped))
    return paths


def _tensor_offsets(path: Path) -> dict[str, int]:
    import gguf

    r = gguf.GGUFReader(str(path))
    return {t.name: int(t.data_offset) for t in r.tensors}


# -- finding 2: adapters that would make the model output NaN ------------------------------------


def test_adapters_with_extreme_values_are_refused_at_install(bundle, store, tmp_path, run_cli):
    good = random_adapter(bundle.config, rank=2, fingerprint=bundle.fingerprint, name="x")
    src = save_adapter(good, tmp_path / "x.gguf", "gguf", bundle.config)
    off = next(iter(_tensor_offsets(src).values()))  # the first tensor's data (F32)
    for i, (b2, b3) in enumerate([(0x00, 0x7F), (0x80, 0x7F)]):  # a float's exponent byte: ~1.7e38, then Inf/NaN
        bad = tmp_path / f"flip{i}.gguf"
        data = bytearray(src.read_bytes())
        data[off + 2], data[off + 3] = b2, b3
        bad.write_bytes(bytes(data))
        with pytest.raises(EdgeloraError, match="NaN or Inf|beyond any base weight"):
            store.install(bad, "flipped")
        _one_line(run_cli("adapter", "install", str(bundle.root), str(bad), "--name", "flipped"))
    huge = LoraAdapter({t: LoraTensor(v.A, np.full_like(v.B, 3e38), v.alpha) for t, v in good.tensors.items()},
                       base_fingerprint=bundle.fingerprint)
    with pytest.raises(AdapterError, match="beyond any base weight"):
        store.install(huge, "huge")
    for alpha in (float("nan"), 0.0, -1.0):
        with pytest.raises(AdapterError, match="alpha"):
            LoraAdapter({"layers.0.q": LoraTensor(np.ones((2, 64)), np.ones((64, 2)), alpha)})
    assert store.names() == []


def test_peft_configs_with_bad_alpha_or_rank_are_refused(bundle, store, tiny_llama, tmp_path, run_cli):
    src = make_peft_adapter(tiny_llama, tmp_path / "p", r=4, alpha=8)
    cfg = json.loads((src / "adapter_config.json").read_text())
    cases = {"alpha 1e30": ({**cfg, "lora_alpha": 1e30}, "beyond any base weight"),
             "alpha NaN": ({**cfg, "lora_alpha": float("nan")}, "alpha"),
             "alpha as text": ({**cfg, "lora_alpha": "sixteen"}, "lora_alpha is 'sixteen'"),
             "r mismatch": ({**cfg, "r": 8}, "rank 8, its tensors have rank 4"),
             "a list": ([], "must be a JSON object"), "null": (None, "must be a JSON object")}
    for case, (content, text) in cases.items():
        d = tmp_path / case.replace(" ", "-")
        shutil.copytree(src, d)
        (d / "adapter_config.json").write_text(json.dumps(content))
        with pytest.raises(EdgeloraError, match=text.replace("(", r"\(")):
            store.install(d, "p")
        _one_line(run_cli("adapter", "install", str(bundle.root), str(d), "--name", "p"), text=text)
    assert store.names() == []


def test_mix_weights_must_be_finite_and_bounded(bundle, store, run_cli):
    store.install(random_adapter(bundle.config, rank=2, fingerprint=bundle.fingerprint), "x")
    for backend in ("gguf", "onnx"):
        with bundle.engine(backend) as e:
            for w in (float("nan"), float("inf"), 1e30, -100.0):
                with pytest.raises(AdapterError, match="out of range"):
                    e.set_adapters({"x": w})
            with pytest.raises(AdapterError, match="not a string"):
                e.set_adapters("x")
            assert e.active_adapters == {}
    _one_line(run_cli("run", str(bundle.root), "hi", "--adapter", "x:1e30", "--backend", "gguf"), text="out of range")


def test_an_engine_with_non_finite_logits_raises_instead_of_answering(bundle, tmp_path):
    """Past every check (an adapter handed to the runtime directly), NaN logits are an error, not tokens of id 0."""
    good = random_adapter(bundle.config, rank=2, fingerprint=bundle.fingerprint, targets=("down",))
    bad = LoraAdapter({t: LoraTensor(v.A, np.full_like(v.B, 3e38), v.alpha) for t, v in good.tensors.items()},
                      base_fingerprint=bundle.fingerprint)
    for backend, fmt in (("gguf", "gguf"), ("onnx", "onnx")):
        path = save_adapter(good, tmp_path / f"a.{fmt}", fmt, bundle.config)
        with bundle.engine(backend) as e:
            with pytest.raises(AdapterError, match="beyond any base weight"):
                e.load_adapter("a", path, bad)  # the engine's own check
            # past it (the backend's hooks called directly), the runtime gets the bad values
            with np.errstate(over="ignore"):
                e._load_adapter("inf", save_adapter(bad, tmp_path / f"bad.{fmt}", fmt, bundle.config, check=False), bad)
            e._adapters.paths["inf"], e._adapters.values["inf"] = Path("-"), bad
            e._activate({"inf": 1.0})
            with pytest.raises(EngineError, match="NaN or Inf logits"):
                e.generate([1, 2, 3], max_tokens=2)


# -- findings 4 and 5: corrupt bases are refused before work -------------------------------------


def test_training_checks_the_bundle_files_it_reads(bundle, tmp_path, run_cli):
    art = bundle.artifact("gguf")
    path = bundle.path(art.main)
    original = path.read_bytes()
    try:
        data = bytearray(original)
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        with pytest.raises(CorruptFileError, match="wrong sha256"):
            train_adapter(edgelora.open_bundle(bundle.root, verify=False), _chats(tmp_path / "d.jsonl"), "t",
                          steps=1, seq_len=64, install=False)
        _one_line(run_cli("train", str(bundle.root), "--data", str(tmp_path / "d.jsonl"), "--name", "t", "--steps", "1"),
                  text="wrong sha256")
    finally:
        path.write_bytes(original)


def test_a_checkpoint_with_non_finite_weights_is_refused_at_intake(tiny_llama, tmp_path, run_cli):
    from safetensors.numpy import load_file, save_file

    bad = tmp_path / "nan-model"
    shutil.copytree(tiny_llama, bad)
    tensors = load_file(bad / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name][3, 5] = np.nan
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CorruptFileError, match="layers.1.down holds 1 NaN or Inf"):
        edgelora.load_base(bad).fingerprint
    _one_line(run_cli("inspect", str(bad)), text="NaN or Inf")
    _one_line(run_cli("export", "--model", str(bad), "--device", "x86-64", "--out", str(tmp_path / "b"), "-q"),
              text="NaN or Inf")
    assert not (tmp_path / "b").exists()


# -- finding 7: resume ---------------------------------------------------------------------------


def test_resume_refuses_another_runs_checkpoint(bundle, tmp_path, run_cli):
    data, other = _chats(tmp_path / "d.jsonl"), _chats(tmp_path / "e.jsonl", n=9)
    ck = tmp_path / "ck"
    kw = dict(steps=4, lr=1e-2, rank=2, seq_len=64, checkpoint_every=2, install=False)
    train_adapter(bundle, data, "r", checkpoint_dir=ck, **kw)
    for change, text in (({"rank": 4}, "rank 2 -> 4"), ({"steps": 3}, "steps 4 -> 3"), ({"lr": 2e-2}, "lr 0.01 -> 0.02")):
        with pytest.raises(TrainerError, match=text):
            train_adapter(bundle, data, "r", checkpoint_dir=ck, resume=True, **{**kw, **change})
    with pytest.raises(TrainerError, match=r"the data \(its sha256\)"):
        train_adapter(bundle, other, "r", checkpoint_dir=ck, resume=True, **kw)
    train_adapter(bundle, data, "r", checkpoint_dir=ck, resume=True, **{**kw, "threads": 1, "checkpoint_every": 1})
    r = run_cli("train", str(bundle.root), "--data", str(data), "--name", "r", "--steps", "4", "--rank", "3",
                "--seq-len", "64", "--checkpoint-dir", str(ck), "--resume", "-q")
    _one_line(r, text="rank 2 -> 3")
    assert "r" not in bundle.store.names()
    (ck / "checkpoint.npz").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(TrainerError, match="not a readable checkpoint"):
        train_adapter(bundle, data, "r", checkpoint_dir=ck, resume=True, **kw)


def test_a_run_killed_before_its_first_step_checkpoint_resumes_from_a_timed_one(bundle, tmp_path):
    """checkpoint_every is far away; the time-based checkpoint still saves the run."""
    data, ck = _chats(tmp_path / "d.jsonl"), tmp_path / "ck"
    kw = dict(steps=8, lr=1e-2, rank=2, seq_len=64, checkpoint_every=1000, checkpoint_seconds=1e-6, seed=4)
    whole = train_adapter(bundle, data, "w", install=False, **kw).adapter
    proc = train_killed_at(bundle.root, data, "k", ck, 5, **kw)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    resumed = train_adapter(bundle, data, "k", install=False, checkpoint_dir=ck, resume=True, **kw)
    assert resumed.steps == 8 and len(resumed.losses) == 8
    for t in whole.targets:
        np.testing.assert_array_equal(resumed.adapter.tensors[t].B, whole.tensors[t].B)


# -- findings 8 and 9: the store's leftovers and concurrent writers ------------------------------


def test_stale_temporaries_are_removed_unless_a_writer_is_live(bundle, store):
    root = store.root
    for debris in (".a.x1.tmp", ".b.old", ".c.removing"):
        (root / debris).mkdir()
        (root / debris / "adapter.gguf").write_bytes(b"\0" * 1024)
    fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a live writer: its temporaries are not touched
        assert (bundle.store.root / ".a.x1.tmp").exists()
    finally:
        os.close(fd)
    bundle.store  # opened with no writer: the debris goes
    assert not [p for p in root.iterdir() if p.name.endswith((".tmp", ".old", ".removing"))]


def test_two_installs_of_one_name_at_once_one_wins_the_other_gets_a_line(bundle, store, tmp_path):
    src = save_adapter(random_adapter(bundle.config, rank=2, fingerprint=bundle.fingerprint), tmp_path / "a.gguf", "gguf",
                       bundle.config)
    cmd = [sys.executable, "-m", "edgelora", "adapter", "install", str(bundle.root), str(src), "--name", "same"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2, 2], results
    for code, err in results:
        if code:
            assert len(err.strip().splitlines()) == 1 and "already installed" in err, err
    assert store.names() == ["same"]
    store.verify("same")


# -- one line instead of a traceback -------------------------------------------------------------


def test_engine_requests_that_are_refused(bundle):
    for backend in ("gguf", "onnx"):
        e = bundle.engine(backend)
        for bad, text in (([10**9], "not a token id"), ([-1], "not a token id"), ([1.5], "not a token id"),
                          ([], "empty"), ("", "empty")):
            with pytest.raises(EngineInputError, match=text):
                e.generate(bad, max_tokens=2)
        for kw, text in (({"temperature": float("nan")}, "temperature"), ({"top_p": 0}, "top_p"),
                         ({"top_k": -1}, "top_k"), ({"max_tokens": -1}, "max_tokens")):
            with pytest.raises(EngineInputError, match=text):
                e.generate([1, 2], **kw)
        with pytest.raises(EngineInputError, match="do not fit the context"):
            e.logits([1] * (e.n_ctx + 1))
        e.close()
        with pytest.raises(EngineInputError, match="closed"):
            e.generate([1, 2], max_tokens=2)
        e.close()  # twice is fine


def test_cli_values_and_files_that_get_one_line(bundle, tiny_llama, tmp_path, run_cli):
    root = str(bundle.root)
    _one_line(run_cli("run", root, "", "--raw"), text="the prompt is empty")
    _one_line(run_cli("run", root, "hi", "--temperature", "nan"), text="temperature")
    _one_line(run_cli("run", root, "word " * 5000, "--raw", "--backend", "onnx"), text="fills the context")
    bad_utf8 = tmp_path / "latin1.jsonl"
    bad_utf8.write_bytes(_chats(tmp_path / "ok.jsonl").read_bytes() + b'{"prompt": "caf\xe9", "completion": "x"}\n')
    _one_line(run_cli("train", root, "--data", str(bad_utf8), "--name", "t", "--steps", "1"), text=f"{bad_utf8}:9: not UTF-8")
    _one_line(run_cli("train", root, "--data", str(tmp_path), "--name", "t", "--steps", "1"), text="is not a file")
    for content, text in (([], "not an edgelora bundle"), ({"format": "edgelora-bundle"}, "not an edgelora bundle")):
        d = tmp_path / f"b{len(str(content))}"
        d.mkdir()
        (d / "bundle.json").write_text(json.dumps(content))
        _one_line(run_cli("run", str(d), "hi"), text=text)
    manifest = json.loads((bundle.root / "bundle.json").read_text())
    for key in ("files", "artifacts", "base"):
        d = tmp_path / f"no-{key}"
        d.mkdir()
        (d / "bundle.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != key}))
        _one_line(run_cli("run", str(d), "hi"), text="missing or malformed")
    cfg = json.loads((tiny_llama / "config.json").read_text())
    for case, content in {"list": [1, 2, 3], "no sizes": {k: v for k, v in cfg.items() if k != "hidden_size"},
                          "text size": {**cfg, "hidden_size": "sixty-four"}, "null": None}.items():
        d = tmp_path / f"cfg-{case.replace(' ', '-')}"
        shutil.copytree(tiny_llama, d)
        (d / "config.json").write_text(json.dumps(content))
        _one_line(run_cli("inspect", str(d)))


# -- fuzz: every reader --------------------------------------------------------------------------


def test_fuzz_gguf_model_and_lora_readers_then_llama_cpp(bundle, tmp_path):
    from edgelora.converters import gguf_lora

    model_src = bundle.path(bundle.artifact("gguf").main)
    for p in _mutants(model_src, tmp_path / "m", 12, seed=1, header=4096):
        _refused_or_loaded(lambda q: gguf_model.read(q).fingerprint, p)
    lora_src = save_adapter(random_adapter(bundle.config, rank=2, fingerprint=bundle.fingerprint), tmp_path / "l.gguf",
                            "gguf", bundle.config)
    loaded = [p for p in _mutants(lora_src, tmp_path / "l", 30, seed=2, header=2048)
              if _refused_or_loaded(lambda q: gguf_lora.read(q, bundle.config), p) == "loaded"
              and _refused_or_loaded(lambda q: load_adapter(q, bundle.config).check_fits(bundle.config), p) == "loaded"]
    # what the reader accepts goes to llama.cpp, in a subprocess (a native crash would show as a signal):
    # it loads and runs, or is refused in one line (a flip in a metadata name llama.cpp needs)
    script = textwrap.dedent(f"""
        import sys, edgelora
        b = edgelora.open_bundle({str(bundle.root)!r})
        with b.engine("gguf") as e:
            for i, p in enumerate(sys.argv[1:]):
                try:
                    e.load_adapter(f"m{{i}}", p)
                    e.set_adapters([f"m{{i}}"])
                    e.generate([1, 2, 3], max_tokens=2)
                    print("ran", p)
                except edgelora.EdgeloraError as err:
                    assert "\\n" not in str(err)
                    print("refused", p, err)
    """)
    proc = subprocess.run([sys.executable, "-c", script, *map(str, loaded)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    outcomes = [line.split()[0] for line in proc.stdout.splitlines()]
    assert len(outcomes) == len(loaded) and outcomes.count("ran") >= len(loaded) // 2, proc.stdout


def test_fuzz_safetensors_peft_and_onnx_adapter_readers(bundle, tiny_llama, tmp_path):
    from edgelora.converters import safetensors_io

    peft = make_peft_adapter(tiny_llama, tmp_path / "peft", r=2, alpha=4)
    onnx_src = save_adapter(load_adapter(peft), tmp_path / "a.onnx_adapter", "onnx", bundle.config)
    st = peft / "adapter_model.safetensors"
    for p in _mutants(st, tmp_path / "st", 12, seed=3, header=512):
        _refused_or_loaded(lambda q: {k: r.load() for k, r in safetensors_io.read_index(q)[0].items()}, p)
        d = tmp_path / f"peft-{p.stem}"
        shutil.copytree(peft, d)
        shutil.copy(p, d / "adapter_model.safetensors")
        _refused_or_loaded(lambda q: load_adapter(q, bundle.config), d)
    for p in _mutants(onnx_src, tmp_path / "ox", 16, seed=4, header=512):
        _refused_or_loaded(lambda q: load_adapter(q, bundle.config), p)


def _type_confused(obj: dict) -> list[dict]:
    """`obj` with each top-level value replaced by values of other JSON types."""
    out = []
    for key in obj:
        for v in ([], None, "x", -1, 1e300, {"a": 1}, True):
            out.append({**obj, key: v})
    return out


def test_fuzz_json_and_toml_readers(bundle, tiny_llama, tmp_path):
    from edgelora.profiles import get_profile

    peft = make_peft_adapter(tiny_llama, tmp_path / "peft", r=2, alpha=4)
    cfg = json.loads((peft / "adapter_config.json").read_text())
    for i, variant in enumerate(_type_confused(cfg)):
        d = tmp_path / f"pc{i}"
        shutil.copytree(peft, d)
        (d / "adapter_config.json").write_text(json.dumps(variant))
        _refused_or_loaded(lambda q: load_adapter(q, bundle.config).check_fits(bundle.config), d)
    manifest = json.loads((bundle.root / "bundle.json").read_text())
    for i, variant in enumerate(_type_confused(manifest)):
        d = tmp_path / f"bj{i}"
        d.mkdir()
        (d / "bundle.json").write_text(json.dumps(variant))
        _refused_or_loaded(lambda q: edgelora.open_bundle(q, verify=False).artifact_table(), d)
    model_cfg = json.loads((tiny_llama / "config.json").read_text())
    for i, variant in enumerate(_type_confused(model_cfg)):
        d = tmp_path / f"mc{i}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps(variant))
        for f in ("tokenizer.json", "tokenizer_config.json", "model.safetensors"):
            if (tiny_llama / f).exists():
                os.symlink(tiny_llama / f, d / f)
        _refused_or_loaded(lambda q: edgelora.load_base(q).fingerprint, d)
    toml = Path(get_profile("x86-64").path).read_text()
    lines = toml.splitlines()
    for i, line in enumerate(lines):
        if "=" not in line:
            continue
        key = line.split("=")[0]
        for v in ('"x"', "-1", "[]", "1e400", "{}"):
            p = tmp_path / f"p{i}-{len(v)}.toml"
            p.write_text("\n".join(lines[:i] + [f"{key}= {v}"] + lines[i + 1:]))
            _refused_or_loaded(get_profile, p)


def test_fuzz_training_jsonl(bundle, tmp_path):
    from edgelora.train import data as train_data

    tok = bundle.tokenizer()
    src = _chats(tmp_path / "d.jsonl")
    for p in _mutants(src, tmp_path / "j", 20, seed=5):
        _refused_or_loaded(lambda q: train_data.load(q, tok, 64), p)
    for i, v in enumerate(_type_confused({"messages": [{"role": "user", "content": "a"}], "prompt": "p", "completion": "c"})):
        p = tmp_path / f"t{i}.jsonl"
        p.write_text(json.dumps(v) + "\n")
        _refused_or_loaded(lambda q: train_data.load(q, tok, 64), p)
    with pytest.raises(DataError):
        train_data.load(tmp_path, tok, 64)


# -- threads under contention --------------------------------------------------------------------


def test_training_threads_follow_the_cores_other_programs_leave(bundle, tmp_path):
    """With every core kept busy by other processes, the governor trains on one thread (a BLAS call
    split over threads that share their cores stalls: bench/train.py --load), and says so."""
    import time

    from threadpoolctl import threadpool_limits

    from edgelora.train import CoreGovernor

    if not Path("/proc/stat").exists():
        pytest.skip("no /proc/stat on this system: the governor keeps the requested threads")
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:
        time.sleep(1.0)
        with threadpool_limits(2):  # the governor sets the process's BLAS threads: give them back after
            assert CoreGovernor(2).threads == 1
        seen = []
        train_adapter(bundle, _chats(tmp_path / "d.jsonl"), "g", steps=2, seq_len=64, rank=2, threads=2, install=False,
                      progress=lambda p: seen.append(p["threads"]))
        assert seen == [1, 1]
    finally:
        for s in spinners:
            s.kill()
            s.wait()
