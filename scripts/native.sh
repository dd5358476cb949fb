# Sourced by scripts/env.sh (needs ROOT, VENV, WHEEL_CACHE): builds edgelora's ONNX Runtime operator
# library (native/edgelora_ort.cc) into $VENV/lib/edgelora/, where edgelora.native finds it. The C
# API headers are not in the onnxruntime wheel: Debian's libonnxruntime-dev (trixie) has them, fetched
# once with a private apt state (no change to the machine's apt setup) and unpacked with dpkg -x. The
# library is built for baseline x86-64/arm64 and picks its SIMD kernels at run time, so one build
# serves the machine. Without a compiler or the headers, edgelora falls back to MatMulNBits: this
# says so in one line and the install goes on.
source "$(dirname "${BASH_SOURCE[0]}")/apt_private.sh"

native_build() {
    local src="$ROOT/native/edgelora_ort.cc" out="$VENV/lib/edgelora/libedgelora_ort.so"
    local headers="$WHEEL_CACHE/onnxruntime-headers" cxx="${CXX:-g++}"
    local key
    key="$( (cat "$src"; "$cxx" --version 2>/dev/null | head -1) | sha256sum | cut -c1-16)"
    [ -f "$out" ] && [ "$(cat "$out.key" 2>/dev/null)" = "$key" ] && return 0
    native_skip() { echo "edgelora: not building the Q4_1 operator library ($*); ONNX bundles use MatMulNBits" >&2; }
    command -v "$cxx" >/dev/null || { native_skip "no C++ compiler: install g++"; return 0; }
    if [ ! -f "$headers/.done" ]; then
        local state="$headers.apt" mirror="${EDGELORA_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
        rm -rf "$headers" "$state"
        mkdir -p "$state" "$headers"
        echo "edgelora: fetching ONNX Runtime's C API headers (Debian trixie's libonnxruntime-dev), once" >&2
        if ! apt_private "$state" "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror trixie main" "" true; then
            native_skip "could not fetch trixie's package index: $(tail -1 "$state/update.log")"
            return 0
        fi
        if ! (cd "$state" && apt_private "$state" "" "" apt-get -q download libonnxruntime-dev >"$state/log" 2>&1 \
                && dpkg -x "$state"/libonnxruntime-dev_*.deb "$headers"); then
            native_skip "could not fetch libonnxruntime-dev: $(tail -1 "$state/log")"
            return 0
        fi
        rm -rf "$state"
        touch "$headers/.done"
    fi
    local include
    include="$(dirname "$(find "$headers" -name onnxruntime_lite_custom_op.h | head -1)")"
    mkdir -p "$(dirname "$out")"
    echo "edgelora: building the Q4_1 operator library for ONNX Runtime (a few seconds)" >&2
    if ! "$cxx" -O2 -std=c++17 -fPIC -shared -Wall -I "$include" "$src" -o "$out.tmp" 2>"$out.log"; then
        native_skip "the build failed: $(grep -m1 error "$out.log")"
        rm -f "$out.tmp"
        return 0
    fi
    mv -f "$out.tmp" "$out"
    rm -f "$out.log"
    echo "$key" > "$out.key"
}
