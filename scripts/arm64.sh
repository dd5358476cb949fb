#!/usr/bin/env bash
# arm64 without hardware: bundles exported on this x86 machine, run under qemu-aarch64 with an arm64
# userland, against the same bundles on x86.
#
#   scripts/arm64.sh            set up (once, cached) and print the arm64-vs-x86 table for the tiny
#                               model and the default model's raspberry-pi-5 bundle
#   scripts/arm64.sh --tiny     the tiny model only (a minute or two)
#   scripts/arm64.sh setup      set up only; prints the path of the JSON that names the pieces
#
# What it sets up under $EDGELORA_CACHE/arm64 (~/.cache/edgelora/arm64), from Debian packages and
# PyPI only, with no change to the machine's apt configuration:
#   qemu/      qemu-aarch64 10 from bookworm-backports (Debian 12's qemu 7.2 segfaults on
#              `import onnxruntime`), fetched with a private apt state and unpacked with dpkg -x
#   sysroot/   Debian 12's arm64 python3.11 and the libraries it needs (apt-get download + dpkg -x;
#              multiarch python3:arm64 would replace the host's python3)
#   site/      aarch64 wheels of the device dependencies, the versions this venv has, plus
#              llama-cpp-python's Python part (ctypes only)
#   llama/<version>/<march>/  libllama.so and ggml cross-compiled from the same llama-cpp-python
#              source with Debian's aarch64 cross compiler, one per -march of the arm64 device profiles
#              (their [build] section: armv8.2-a+dotprod for the Pi 5, armv8-a for the Pi 4,
#              +i8mm for phones)
#   ort-ops/<key>/libedgelora_ort.so  edgelora's ONNX Runtime operators (native/), cross-compiled
# Each piece is stamped when complete; a rerun rebuilds only what is missing.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"

CACHE="${EDGELORA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edgelora}/arm64"
SUITE=bookworm
MIRROR="${EDGELORA_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9  # one set-up at a time (pytest and this script may race)

say() { echo "arm64: $*" >&2; }
die() { echo "arm64: cannot set up the emulator: $*" >&2; exit 3; }

source "$ROOT/scripts/apt_private.sh"
arm64_apt() {  # apt-get / apt-cache for $SUITE and its backports, amd64 and arm64, with a private state
    [ -f /usr/share/keyrings/debian-archive-keyring.gpg ] || die "no Debian archive keyring (install debian-archive-keyring)"
    apt_private "$CACHE/apt" "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR $SUITE main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR $SUITE-backports main" "amd64 arm64" "$@" && return 0
    local rc=$?
    [ -f "$CACHE/apt/.updated" ] \
        || die "apt-get update failed with the private state (is $MIRROR reachable?): $(tail -1 "$CACHE/apt/update.log" 2>/dev/null)"
    return $rc
}

fetch_debs() {  # fetch_debs DIR PKG...: download .debs into DIR (no install)
    local dir="$1"; shift
    mkdir -p "$dir"
    (cd "$dir" && arm64_apt apt-get -q download "$@" >"$dir/download.log" 2>&1) \
        || die "apt-get download failed: $(tail -1 "$dir/download.log")"
}

# -- qemu-aarch64 10 ----------------------------------------------------------------------------
QEMU="$CACHE/qemu/usr/bin/qemu-aarch64"
if [ ! -f "$CACHE/qemu/.done" ]; then
    say "fetching qemu-user from $SUITE-backports"
    rm -rf "$CACHE/qemu" "$CACHE/debs-qemu"
    ver="$(arm64_apt apt-cache madison qemu-user | awk -v s="$SUITE-backports" '$0 ~ s {print $3; exit}')"
    [ -n "$ver" ] || die "qemu-user is not in $SUITE-backports"
    fetch_debs "$CACHE/debs-qemu" "qemu-user=$ver"
    mkdir -p "$CACHE/qemu"
    dpkg --fsys-tarfile "$CACHE"/debs-qemu/qemu-user_*.deb | tar -x -C "$CACHE/qemu" ./usr/bin/qemu-aarch64
    rm -rf "$CACHE/debs-qemu"
    "$QEMU" --version | head -1 >&2
    touch "$CACHE/qemu/.done"
fi

# -- arm64 python3.11 sysroot -------------------------------------------------------------------
SYSROOT="$CACHE/sysroot"
if [ ! -f "$SYSROOT/.done" ]; then
    say "fetching Debian's arm64 python3.11 into a sysroot"
    rm -rf "$SYSROOT" "$CACHE/debs-arm64"
    pkgs="$(arm64_apt apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
        --no-replaces --no-enhances python3.11:arm64 libstdc++6:arm64 libgomp1:arm64 \
        | grep -E '^[a-z0-9].*:arm64$' | grep -vE '^(dpkg|install-info|tar):' | sort -u)"
    fetch_debs "$CACHE/debs-arm64" $pkgs
    mkdir -p "$SYSROOT"
    for deb in "$CACHE"/debs-arm64/*.deb; do dpkg -x "$deb" "$SYSROOT"; done
    rm -rf "$CACHE/debs-arm64"
    touch "$SYSROOT/.done"
fi
export QEMU_CPU="${QEMU_CPU:-cortex-a76}"
"$QEMU" -L "$SYSROOT" "$SYSROOT/usr/bin/python3.11" -c "import platform, sys; assert platform.machine() == 'aarch64'" \
    || die "the arm64 python does not start under $QEMU"

# -- aarch64 wheels: the device's dependencies at this venv's versions ---------------------------
SITE="$CACHE/site"
DEVICE_PKGS="numpy onnx onnxruntime tokenizers safetensors gguf typer jinja2 threadpoolctl cryptography diskcache llama_cpp_python"
PINS="$(python - $DEVICE_PKGS <<'EOF'
import sys
from importlib.metadata import version
print(" ".join(f"{p}=={version(p)}" for p in sys.argv[1:]))
EOF
)"
if [ ! -f "$SITE/.done" ] || [ "$(cat "$SITE/.done")" != "$PINS" ]; then
    say "installing aarch64 wheels: ${PINS% llama_cpp_python*}"
    rm -rf "$SITE" && mkdir -p "$SITE"
    # shellcheck disable=SC2086
    python -m pip install -q --no-warn-conflicts --target "$SITE" --only-binary=:all: --python-version 3.11 \
        --implementation cp --abi cp311 --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 \
        --platform manylinux_2_28_aarch64 ${PINS% llama_cpp_python*} >"$CACHE/pip.log" 2>&1 \
        || die "pip could not fetch the aarch64 wheels: $(grep ERROR "$CACHE/pip.log" | tail -1)"
    touch "$SITE/.wheels"
fi

# -- llama.cpp: the Python part from the pinned sdist, the libraries cross-compiled ---------------
LLAMA_VER="${PINS##*llama_cpp_python==}"
SDIST="$CACHE/src/llama_cpp_python-$LLAMA_VER"
if [ ! -d "$SDIST/vendor/llama.cpp/ggml" ]; then
    say "fetching llama-cpp-python $LLAMA_VER's source"
    mkdir -p "$CACHE/src"
    python -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_VER" -d "$CACHE/src" \
        >"$CACHE/pip.log" 2>&1 || die "pip could not fetch llama-cpp-python's source"
    tar -xzf "$CACHE/src/llama_cpp_python-$LLAMA_VER.tar.gz" -C "$CACHE/src"
fi
rm -rf "$SITE/llama_cpp" && cp -r "$SDIST/llama_cpp" "$SITE/llama_cpp"  # ctypes only: no x86 library inside
echo "$PINS" > "$SITE/.done"

if ! command -v aarch64-linux-gnu-g++ >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        say "installing Debian's aarch64 cross compiler (g++-aarch64-linux-gnu)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends g++-aarch64-linux-gnu \
            >"$CACHE/cross.log" 2>&1 || die "apt-get install g++-aarch64-linux-gnu failed: $(tail -1 "$CACHE/cross.log")"
    else
        die "no aarch64 cross compiler: run 'apt-get install g++-aarch64-linux-gnu' as root"
    fi
fi
# One library per -march among the arm64 device profiles ([build] in devices/*.toml), named by it.
PROFILES="$(python -c '
from edgelora.profiles import list_profiles
for p in list_profiles():
    if p.arch == "arm64" and p.build.march:
        print(p.name, p.build.cpu, p.build.march)
')"
# Only ggml's CPU backend depends on -march: the first library is built whole, the others reuse its
# libllama / libggml / libggml-base and build libggml-cpu alone.
shared=""
for arch in $(echo "$PROFILES" | awk '{print $3}' | sort -u); do
    out="$CACHE/llama/$LLAMA_VER/$arch"
    if [ -f "$out/.done" ]; then shared="${shared:-$out}"; continue; fi
    target="$([ -n "$shared" ] && echo ggml-cpu || echo llama)"
    say "cross-compiling llama.cpp ($target) for $arch (a few minutes, once)"
    build="$CACHE/build/$arch"
    rm -rf "$build" "$out"
    cmake -S "$SDIST/vendor/llama.cpp" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=aarch64 \
        -DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc -DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++ \
        -DBUILD_SHARED_LIBS=ON -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON -DCMAKE_INSTALL_RPATH='$ORIGIN' \
        -DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH="$arch" -DGGML_OPENMP=ON \
        -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
        -DLLAMA_BUILD_TOOLS=OFF >"$CACHE/build-$arch.log" 2>&1 || die "cmake failed: see $CACHE/build-$arch.log"
    cmake --build "$build" -j "$(nproc)" --target "$target" >>"$CACHE/build-$arch.log" 2>&1 \
        || die "the llama.cpp cross build failed: see $CACHE/build-$arch.log"
    mkdir -p "$out"
    if [ -n "$shared" ]; then
        find "$shared" -maxdepth 1 -name 'lib*.so*' ! -name 'libggml-cpu.so*' -exec cp -P {} "$out/" \;
        cp -P "$build"/bin/libggml-cpu.so* "$out/"
    else
        cp -P "$build"/bin/lib*.so* "$out/"
        shared="$out"
    fi
    rm -rf "$build"
    touch "$out/.done"
done

# -- edgelora's ONNX Runtime operators (native/edgelora_ort.cc), cross-compiled for baseline arm64 --
# (it picks its NEON dot-product kernel at run time), with the headers scripts/native.sh fetched
ORT_OPS=""
include="$(dirname "$(find "$WHEEL_CACHE/onnxruntime-headers" -name onnxruntime_lite_custom_op.h 2>/dev/null | head -1)")"
if [ -f "$include/onnxruntime_lite_custom_op.h" ]; then
    key="$(cat "$ROOT/native/edgelora_ort.cc" | sha256sum | cut -c1-16)"
    ORT_OPS="$CACHE/ort-ops/$key/libedgelora_ort.so"
    if [ ! -f "$ORT_OPS" ]; then
        say "cross-compiling edgelora's ONNX Runtime operators"
        mkdir -p "$(dirname "$ORT_OPS")"
        aarch64-linux-gnu-g++ -O2 -std=c++17 -fPIC -shared -Wall -I "$include" "$ROOT/native/edgelora_ort.cc" \
            -o "$ORT_OPS.tmp" 2>"$CACHE/ort-ops.log" || die "the operator library's cross build failed: see $CACHE/ort-ops.log"
        mv -f "$ORT_OPS.tmp" "$ORT_OPS"
    fi
fi

echo "$PROFILES" | python -c '
import json, sys
cache, qemu, sysroot, site, llama, ort_ops = sys.argv[1:]
profiles = {name: {"cpu": cpu, "march": march, "llama": f"{llama}/{march}"}
            for name, cpu, march in (line.split() for line in sys.stdin if line.strip())}
json.dump({"qemu": qemu, "sysroot": sysroot, "python": f"{sysroot}/usr/bin/python3.11", "site": site,
           "profiles": profiles, "ort_ops": ort_ops}, open(f"{cache}/arm64.json", "w"), indent=1)
' "$CACHE" "$QEMU" "$SYSROOT" "$SITE" "$CACHE/llama/$LLAMA_VER" "$ORT_OPS"
exec 9>&-  # set-up done: release the lock
case "${1:-}" in
    setup) echo "$CACHE/arm64.json" ;;
    --tiny) exec python -m tests.arm64_util --tiny ;;
    *) exec python -m tests.arm64_util ;;
esac
