#!/usr/bin/env bash
# Build the test guest kernel (vmlinux, ELF) from Debian's linux-source-6.1.
#
#   bash resources/kernel/build.sh            # prints the vmlinux path as the last stdout line
#
# Config: `make tinyconfig`, merge resources/kernel/config.fragment, `make olddefconfig`.
# The result is cached outside the work tree in ${VMM_CACHE_DIR:-/var/cache/vmm-test},
# keyed by a hash of the fragment, this script and the source package version, so it is
# rebuilt only when one of those changes. Progress goes to stderr; the full build log
# is kept next to the object tree.
#
# Needs: linux-source-6.1 flex bison bc libelf-dev build-essential xz-utils (installed
# with apt-get when missing and running as root).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
FRAGMENT="$HERE/config.fragment"
CACHE="${VMM_CACHE_DIR:-/var/cache/vmm-test}"
JOBS="${VMM_BUILD_JOBS:-$(nproc)}"
SRC_PKG=linux-source-6.1
DEPS=(linux-source-6.1 flex bison bc libelf-dev build-essential xz-utils)

log() { echo "[kernel] $*" >&2; }
die() {
    echo "[kernel] error: $*" >&2
    exit 1
}

# shellcheck source=../lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
ensure_packages "${DEPS[@]}"

version="$(dpkg-query -W -f='${Version}' "$SRC_PKG")"
tarball="/usr/src/${SRC_PKG}.tar.xz"
[[ -f $tarball ]] || die "$tarball not found (package $SRC_PKG $version)"

key="$(cat "$FRAGMENT" "${BASH_SOURCE[0]}" <(echo "$version") | sha256sum | cut -c1-16)"
out_dir="$CACHE/kernel-$key"
vmlinux="$out_dir/vmlinux"

mkdir -p "$CACHE"
exec 9>"$CACHE/.kernel.lock"
flock 9

if [[ -s $vmlinux ]]; then
    log "cached: $vmlinux (key $key, $SRC_PKG $version)"
    echo "$vmlinux"
    exit 0
fi

src="$CACHE/src/$SRC_PKG-$version"
obj="$CACHE/obj/$SRC_PKG-$version"
# Drop the source and object trees of other source package versions (1.5 GiB each).
for d in "$CACHE"/src/* "$CACHE"/obj/*; do
    [[ ! -e $d || $d == "$src" || $d == "$obj" ]] || { log "removing stale $d"; rm -rf "$d"; }
done
if [[ ! -f $src/.extracted ]]; then
    log "extracting $tarball"
    rm -rf "$src"
    mkdir -p "$src"
    tar -xJf "$tarball" -C "$src" --strip-components=1
    touch "$src/.extracted"
fi

# One object tree per source version: a fragment change rebuilds incrementally.
mkdir -p "$obj"
build_log="$obj/build.log"
: >"$build_log"
run() {
    if ! "$@" >>"$build_log" 2>&1; then
        tail -n 40 "$build_log" >&2
        die "failed: $* (full log: $build_log)"
    fi
}

start=$SECONDS
log "configuring (tinyconfig + $FRAGMENT) in $obj"
run make -C "$src" O="$obj" tinyconfig
run env -C "$src" ./scripts/kconfig/merge_config.sh -m -O "$obj" "$obj/.config" "$FRAGMENT"
run make -C "$src" O="$obj" olddefconfig

# Every option of the fragment must have survived olddefconfig.
lost=()
while IFS= read -r line; do
    [[ $line =~ ^CONFIG_[A-Za-z0-9_]+= ]] || continue
    grep -qxF "$line" "$obj/.config" || lost+=("$line")
done <"$FRAGMENT"
((${#lost[@]} == 0)) || die "options not in the final .config (dependency missing?): ${lost[*]}"

log "building vmlinux with -j$JOBS (a few minutes; log: $build_log)"
run make -C "$src" O="$obj" -j"$JOBS" vmlinux

mkdir -p "$out_dir"
cp "$obj/.config" "$out_dir/config"
cp "$obj/vmlinux" "$vmlinux.tmp"
mv "$vmlinux.tmp" "$vmlinux"
log "built $vmlinux in $((SECONDS - start)) s"
echo "$vmlinux"
