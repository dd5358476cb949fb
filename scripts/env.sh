# Sourced by the other scripts: makes sure .venv at the repository root exists and holds
# edgelora with its test extras, then puts it first on PATH. Reuses what is already there.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${EDGELORA_PYTHON:-python3}"

# llama.cpp is built from source for this CPU family without AMX (which this VM forbids:
# an AMX build segfaults on every quantized model) and without the multimodal library.
# pip keeps the built wheel in its cache, so the 10-20 minute build happens once per machine.
export CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "edgelora: creating $VENV" >&2
    "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip wheel setuptools
fi

STAMP="$VENV/.edgelora-installed"
WANT="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    echo "edgelora: installing into $VENV (the first time builds llama.cpp: 10-20 minutes)" >&2
    "$VENV/bin/pip" install --progress-bar off -e "$ROOT[dev]"
    echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
