# Sourced by the other scripts: makes sure .venv at the repository root exists and holds
# edgelora with its test extras, then puts it first on PATH. Reuses what is already there.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${EDGELORA_PYTHON:-python3}"
# built wheels are the machine's, not a model cache: $EDGELORA_CACHE (which tests point elsewhere) does not move them
WHEEL_CACHE="${EDGELORA_WHEELS:-${XDG_CACHE_HOME:-$HOME/.cache}/edgelora/wheels}"

# llama.cpp is built from source for the CPU at hand: every SIMD extension it has, none it lacks,
# no AMX unless EDGELORA_LLAMA_AMX=1 (edgelora/cpu.py says why; set CMAKE_ARGS to choose yourself). The
# wheel is kept under a name made of the version and the flags, so the 10-20 minute build happens
# once per machine and flags, and a change of either builds anew. The sdist is patched first with
# scripts/patches/llama-cpp-*.patch (an active LoRA adapter as one graph node; the patches are part of
# the key too).
LLAMA_VERSION="$(sed -n 's/.*"llama-cpp-python==\([^"]*\)".*/\1/p' "$ROOT/pyproject.toml")"
export CMAKE_ARGS="${CMAKE_ARGS:-$("$PY" "$ROOT/edgelora/cpu.py")}"
LLAMA_PATCHES=("$ROOT"/scripts/patches/llama-cpp-*.patch)
WHEEL_KEY="llama-cpp-python-$LLAMA_VERSION-$( (printf %s "$CMAKE_ARGS"; cat "${LLAMA_PATCHES[@]}") | sha256sum | cut -c1-16)"
WHEELS="$WHEEL_CACHE/$WHEEL_KEY"

if [ ! -x "$VENV/bin/python" ]; then
    echo "edgelora: creating $VENV" >&2
    "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip wheel setuptools
fi

STAMP="$VENV/.edgelora-installed"
WANT="$( (cat "$ROOT/pyproject.toml"; echo "$WHEEL_KEY") | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    if ! compgen -G "$WHEELS/llama_cpp_python-*.whl" >/dev/null; then
        echo "edgelora: building llama.cpp $LLAMA_VERSION for this CPU, once (10-20 minutes): $CMAKE_ARGS" >&2
        mkdir -p "$WHEEL_CACHE"
        BUILD="$(mktemp -d "$WHEELS.partial.XXXXXX")"
        "$VENV/bin/pip" download --progress-bar off --no-deps --no-binary :all: -d "$BUILD/src" \
            "llama-cpp-python==$LLAMA_VERSION"
        tar xzf "$BUILD/src/llama_cpp_python-$LLAMA_VERSION.tar.gz" -C "$BUILD/src"
        SDIST="$BUILD/src/llama_cpp_python-$LLAMA_VERSION"
        for patch in "${LLAMA_PATCHES[@]}"; do
            (cd "$SDIST" && git apply "$patch") || { echo "edgelora: $patch does not apply to llama-cpp-python $LLAMA_VERSION" >&2; exit 1; }
        done
        "$VENV/bin/pip" wheel --progress-bar off --no-deps --no-cache-dir -w "$BUILD" "$SDIST"
        rm -rf "$BUILD/src"
        mv -T "$BUILD" "$WHEELS"
    fi
    echo "edgelora: installing into $VENV" >&2
    "$VENV/bin/pip" install --progress-bar off --force-reinstall --no-deps "$WHEELS"/llama_cpp_python-*.whl
    "$VENV/bin/pip" install --progress-bar off -e "$ROOT[dev]"
    echo "$WANT" > "$STAMP"
fi
source "$ROOT/scripts/native.sh"
native_build
export PATH="$VENV/bin:$PATH"
