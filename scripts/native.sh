# Sourced by scripts/env.sh (needs ROOT, VENV, WHEEL_CACHE): builds edgelora's ONNX Runtime operator
# library (native/edgelora_ort.cc, and on x86-64 native/q41_avx512.cc) into $VENV/lib/edgelora/,
# where edgelora.native finds it. Two header-only inputs are not in any wheel and come from Debian
# trixie, fetched once with a private apt state (no change to the machine's apt setup) and unpacked
# with dpkg -x: ONNX Runtime's C API headers (libonnxruntime-dev) and SIMDe (libsimde-dev), whose
# names the AVX-512 VNNI kernel is written in. The library is built for baseline x86-64/arm64 and
# picks its SIMD kernels at run time, so one build serves the machine. Without a compiler or the ONNX
# Runtime headers, edgelora falls back to MatMulNBits; without SIMDe, to the AVX2 kernel: each says so
# in one line and the install goes on.
#
# Run as a script, `bash scripts/native.sh --emulated-avx512 OUT` builds the tests' variant into OUT:
# the AVX-512 kernel's lanes computed by SIMDe's portable code, so it runs on any AVX2 machine.
source "$(dirname "${BASH_SOURCE[0]}")/apt_private.sh"

native_skip() { echo "edgelora: $*" >&2; }

# native_fetch PACKAGE DIR: trixie's PACKAGE unpacked into DIR, once; 1 (the reason on stdout) if not.
native_fetch() {
    local package="$1" dir="$2"
    [ -f "$dir/.done" ] && return 0
    local state="$dir.apt" mirror="${EDGELORA_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
    rm -rf "$dir" "$state"
    mkdir -p "$state" "$dir"
    echo "edgelora: fetching Debian trixie's $package, once" >&2
    if ! apt_private "$state" "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror trixie main" "" true; then
        echo "could not fetch trixie's package index: $(tail -1 "$state/update.log")"
        return 1
    fi
    if ! (cd "$state" && apt_private "$state" "" "" apt-get -q download "$package" >"$state/log" 2>&1 \
            && dpkg -x "$state/$package"_*.deb "$dir"); then
        echo "could not fetch $package: $(tail -1 "$state/log")"
        return 1
    fi
    rm -rf "$state"
    touch "$dir/.done"
}

# native_compile OUT [emulated]: the library into OUT (through OUT.tmp), with the AVX-512 kernel when
# the compiler targets x86-64 and SIMDe is there; 1 with the compiler's first error on stderr.
native_compile() {
    local out="$1" mode="${2:-}" cxx="${CXX:-g++}"
    local include simde="$WHEEL_CACHE/simde/usr/include" tmp
    include="$(dirname "$(find "$WHEEL_CACHE/onnxruntime-headers" -name onnxruntime_lite_custom_op.h | head -1)")"
    tmp="$(mktemp -d)"
    local flags=(-O2 -std=c++17 -fPIC -Wall) defs=() objs=()
    if [[ "$("$cxx" -dumpmachine)" == x86_64* ]] && [ -f "$WHEEL_CACHE/simde/.done" ]; then
        # the whole file is compiled for AVX-512 (it holds only the kernel), or with SIMDe's portable lanes
        local isa=(-mavx512f -mavx512bw -mavx512vl -mavx512vnni -mfma -mf16c)
        defs=(-DEDGELORA_AVX512)
        [ "$mode" = emulated ] && isa=() && defs+=(-DEDGELORA_AVX512_EMULATED)
        if ! "$cxx" "${flags[@]}" -Wno-psabi -Wno-maybe-uninitialized "${isa[@]}" -I "$simde" \
                -c "$ROOT/native/q41_avx512.cc" -o "$tmp/q41_avx512.o" 2>"$tmp/log"; then
            grep -m1 error "$tmp/log" >&2
            rm -rf "$tmp"
            return 1
        fi
        objs=("$tmp/q41_avx512.o")
    elif [ "$mode" = emulated ]; then
        echo "no AVX-512 kernel to emulate (an x86-64 compiler and SIMDe's headers are needed)" >&2
        rm -rf "$tmp"
        return 1
    fi
    if ! "$cxx" "${flags[@]}" "${defs[@]}" -shared -I "$include" "$ROOT/native/edgelora_ort.cc" "${objs[@]}" \
            -o "$out.tmp" 2>"$tmp/log"; then
        grep -m1 error "$tmp/log" >&2
        rm -rf "$tmp" "$out.tmp"
        return 1
    fi
    rm -rf "$tmp"
    mv -f "$out.tmp" "$out"
}

native_build() {
    local out="$VENV/lib/edgelora/libedgelora_ort.so" cxx="${CXX:-g++}" why
    command -v "$cxx" >/dev/null || { native_skip "not building the Q4_1 operator library (no C++ compiler: install g++); ONNX bundles use MatMulNBits"; return 0; }
    if ! why="$(native_fetch libonnxruntime-dev "$WHEEL_CACHE/onnxruntime-headers")"; then
        native_skip "not building the Q4_1 operator library ($why); ONNX bundles use MatMulNBits"
        return 0
    fi
    if [[ "$("$cxx" -dumpmachine)" == x86_64* ]] && ! why="$(native_fetch libsimde-dev "$WHEEL_CACHE/simde")"; then
        native_skip "building the Q4_1 operator library without its AVX-512 kernel ($why); AVX2 serves"
    fi
    local key
    key="$( (cat "$ROOT"/native/*.cc; "$cxx" --version 2>/dev/null | head -1; ls "$WHEEL_CACHE/simde/.done" 2>/dev/null) \
            | sha256sum | cut -c1-16)"
    [ -f "$out" ] && [ "$(cat "$out.key" 2>/dev/null)" = "$key" ] && return 0
    mkdir -p "$(dirname "$out")"
    echo "edgelora: building the Q4_1 operator library for ONNX Runtime (a few seconds)" >&2
    if ! why="$(native_compile "$out" 2>&1)"; then
        native_skip "not building the Q4_1 operator library (the build failed: $why); ONNX bundles use MatMulNBits"
        return 0
    fi
    echo "$key" > "$out.key"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then  # run as a script: the tests' build
    set -euo pipefail
    [ "${1:-}" = --emulated-avx512 ] && [ -n "${2:-}" ] || { echo "usage: bash scripts/native.sh --emulated-avx512 OUT" >&2; exit 2; }
    ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    WHEEL_CACHE="${EDGELORA_WHEELS:-${XDG_CACHE_HOME:-$HOME/.cache}/edgelora/wheels}"
    native_fetch libonnxruntime-dev "$WHEEL_CACHE/onnxruntime-headers" >&2
    native_fetch libsimde-dev "$WHEEL_CACHE/simde" >&2
    native_compile "$2" emulated
fi
