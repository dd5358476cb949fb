"""llama.cpp's own converter (convert_hf_to_gguf.py), as the reference GGUF writer in tests.

It ships inside llama-cpp-python's source distribution (vendor/llama.cpp), the same version whose
library the project loads; pip fetches it (or takes it from its cache) and only the converter, its
`conversion` package and its own gguf-py are unpacked.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

VERSION = "0.3.36"
_ROOT = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
_WANTED = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/",
           # SentencePiece vocabularies with llama.cpp's own tokenization test vectors
           "models/ggml-vocab-llama-spm.gguf", "models/ggml-vocab-phi-3.gguf")


def converter(cache: Path) -> Path:
    """The unpacked vendor/llama.cpp directory holding convert_hf_to_gguf.py."""
    root = cache / _ROOT
    if (root / "models" / "ggml-vocab-phi-3.gguf.out").exists():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                    f"llama-cpp-python=={VERSION}", "-d", str(cache)], check=True)
    with tarfile.open(cache / f"llama_cpp_python-{VERSION}.tar.gz") as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(tuple(_ROOT + w for w in _WANTED))]
        tar.extractall(cache, members=members, filter="data")
    return root


def convert(cache: Path, hf_dir: Path, out: Path, pre: str = "gpt-2") -> Path:
    """Runs llama.cpp's converter on `hf_dir` (F32). Its tokenizer check recognises ~100 published
    tokenizers by hashing their output; the test tokenizers are made in the test, so the name of
    their pre-tokenizer (`pre`) is given instead. Everything else is the converter's own code."""
    root = converter(cache)
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(root)!r})
        sys.argv = ["convert_hf_to_gguf.py", {str(hf_dir)!r}, "--outfile", {str(out)!r}, "--outtype", "f32"]
        import convert_hf_to_gguf
        from conversion import base
        base.TextModel.get_vocab_base_pre = lambda self, tokenizer: {pre!r}
        convert_hf_to_gguf.main()
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root)
    if r.returncode:
        raise RuntimeError(f"convert_hf_to_gguf.py failed:\n{r.stderr[-3000:]}")
    return out
