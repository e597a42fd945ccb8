#!/usr/bin/env bash
# The QEMU that runs the emulated hardware-virtualization host (L1).
#
#   bash resources/l1host/qemu.sh     # prints the path of a qemu-system-x86_64 as the last line
#
# Why not the system's: Debian 12's QEMU 7.2 loses L1's timer interrupt in software
# (TCG) mode with nested SVM. Measured (docs/ARCHITECTURE.md, "Two hosts in every test run"): L1 halts for good in its idle
# loop with the local APIC timer expired, its vector 236 pending in IRR, IF=1, and QEMU
# at 0% CPU, after 6 to 11 back-to-back `vmm bench tlb --guest linux` runs (2-4 minutes
# of nested guests); QEMU 10.0 (bookworm-backports) ran the same loop 30 times.
# So on Debian 12 this fetches qemu-system-x86 and its firmware from bookworm-backports
# into the cache and unpacks them there (the system's packages and apt sources stay as
# they are); elsewhere it uses the system QEMU when it is 8.0 or newer.
# Cached in ${VMM_CACHE_DIR:-/var/cache/vmm-test}/qemu-<version>, keyed by the package version.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${VMM_CACHE_DIR:-/var/cache/vmm-test}"
SUITE=bookworm-backports
PKGS=(qemu-system-x86 qemu-system-common qemu-system-data seabios)

log() { echo "[l1host-qemu] $*" >&2; }
die() {
    echo "[l1host-qemu] error: $*" >&2
    exit 1
}
# shellcheck source=../lib.sh
source "$HERE/../lib.sh"

codename="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
if [[ $codename != bookworm ]]; then
    ensure_packages qemu-system-x86
    v="$(qemu-system-x86_64 --version | sed -n 's/^QEMU emulator version \([0-9]*\)\..*/\1/p' | head -n1)"
    ((${v:-0} >= 8)) || die "qemu-system-x86_64 is version ${v:-unknown}; the emulated host needs 8.0 or newer"
    command -v qemu-system-x86_64
    exit 0
fi
[[ $(id -u) == 0 ]] || die "needs root (apt-get download into the cache)"

# A private apt state that knows $SUITE: the system's sources and lists are not touched.
apt_dir="$CACHE/apt-$SUITE"
mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $SUITE main" \
    >"$apt_dir/sources.list"
APT=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
    -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache::Archives=$apt_dir/archives"
    -o "APT::Sandbox::User=root")
version() { apt-cache "${APT[@]}" show "qemu-system-x86/$SUITE" 2>/dev/null | sed -n 's/^Version: //p' | head -n1; }
ver="$(version)"
if [[ -z $ver ]]; then
    log "fetching the $SUITE package index"
    apt-get "${APT[@]}" update -qq >&2 || die "apt-get update for $SUITE failed (is deb.debian.org reachable?)"
    ver="$(version)"
fi
[[ -n $ver ]] || die "no qemu-system-x86 in $SUITE"
key="$(echo "$ver" | tr -c 'A-Za-z0-9.\n' '_')"
out="$CACHE/qemu-$key"
if [[ ! -x $out/qemu-system-x86_64 ]]; then
    log "unpacking QEMU $ver from $SUITE into $out"
    rm -rf "$out.tmp"
    mkdir -p "$out.tmp/debs"
    (cd "$out.tmp/debs" && apt-get "${APT[@]}" download "${PKGS[@]/%//$SUITE}" >&2) ||
        die "apt-get download ${PKGS[*]} from $SUITE failed"
    for d in "$out.tmp"/debs/*.deb; do dpkg-deb -x "$d" "$out.tmp/root"; done
    rm -rf "$out.tmp/debs"
    missing="$(ldd "$out.tmp/root/usr/bin/qemu-system-x86_64" | grep 'not found' || true)"
    [[ -z $missing ]] || die "QEMU $ver from $SUITE needs libraries this system lacks: $missing"
    # A wrapper that finds the firmware (bios, linuxboot_dma.bin) of the same version.
    cat >"$out.tmp/qemu-system-x86_64" <<WRAP
#!/bin/sh
# QEMU $ver from $SUITE, unpacked by resources/l1host/qemu.sh
exec "$out/root/usr/bin/qemu-system-x86_64" -L "$out/root/usr/share/qemu" -L "$out/root/usr/share/seabios" "\$@"
WRAP
    chmod 755 "$out.tmp/qemu-system-x86_64"
    rm -rf "$out"
    mv "$out.tmp" "$out"
fi
"$out/qemu-system-x86_64" --version | head -n1 >&2
echo "$out/qemu-system-x86_64"
