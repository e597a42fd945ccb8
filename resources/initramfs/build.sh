#!/usr/bin/env bash
# Build a busybox-static initramfs (cpio newc, gzip) for the test guest kernel.
#
#   bash resources/initramfs/build.sh [hello|spin|memwork]   # prints the image path as the last stdout line
#
# Variants (the /init each one runs):
#   hello  prints VMM-TEST-INIT-OK on the console, then `poweroff -f`.
#   memwork  runs resources/initramfs/memwork.c (built static here): round after round it
#          maps, writes, checks and unmaps 48 MiB while it watches MemTotal, until a
#          balloon inflate and deflate have come and gone (MEMWORK-OK), then `poweroff -f`.
#   spin   /init is a 2-instruction static ELF (`pause; jmp`) that spins at CPL3 and makes
#          no system call, so the kernel keeps running (timer ticks, its kworkers, the
#          virtio-balloon driver) until the VMM is stopped (`vmm ctl stop`). It prints
#          nothing: the kernel's "Run /init as init process" is the last console line.
# A Linux guest runs user space only on a VT-x/AMD-V host: on a paravirtual shadow-paging
# KVM host the first system call of /init is not delivered (see docs), so `hello` prints
# its marker only there; `spin` behaves the same on both kinds of host.
#
# Cached in ${VMM_CACHE_DIR:-/var/cache/vmm-test}, keyed by a hash of this script and the
# busybox-static version. Needs root (mknod /dev/console) and busybox-static + cpio.
set -euo pipefail

VARIANT="${1:-hello}"
CACHE="${VMM_CACHE_DIR:-/var/cache/vmm-test}"
DEPS=(busybox-static cpio gzip binutils)

log() { echo "[initramfs] $*" >&2; }
die() {
    echo "[initramfs] error: $*" >&2
    exit 1
}

case "$VARIANT" in
hello)
    body='echo VMM-TEST-INIT-OK
poweroff -f'
    ;;
spin) body='' ;;
memwork)
    body='/bin/memwork 48 600
echo "MEMWORK-EXIT rc=$?"
poweroff -f'
    ;;
*) die "unknown variant '$VARIANT' (expected hello, spin or memwork)" ;;
esac

# shellcheck source=../lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
[[ $VARIANT != memwork ]] || DEPS+=(gcc libc6-dev)
ensure_packages "${DEPS[@]}"
[[ $(id -u) == 0 ]] || die "needs root (to create /dev/console in the image)"

busybox=/bin/busybox
[[ -x $busybox ]] || die "$busybox not found (package busybox-static)"
bb_version="$(dpkg-query -W -f='${Version}' busybox-static)"
MEMWORK_C="$(dirname "${BASH_SOURCE[0]}")/memwork.c"
extra=""
[[ $VARIANT != memwork ]] || extra="$(cat "$MEMWORK_C"; gcc --version | head -n1)"
key="$(cat "${BASH_SOURCE[0]}" <(echo "$bb_version") <(echo "$extra") | sha256sum | cut -c1-16)"
image="$CACHE/initramfs-$VARIANT-$key.cpio.gz"

mkdir -p "$CACHE"
if [[ -s $image ]]; then
    log "cached: $image"
    echo "$image"
    exit 0
fi

root="$(mktemp -d "$CACHE/.initramfs-XXXXXX")"
chmod 755 "$root"
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,etc}
if [[ $VARIANT != spin ]]; then # spin needs no busybox: a small image unpacks fast
    cp "$busybox" "$root/bin/busybox"
    for applet in sh echo mount sleep poweroff cat; do
        ln -s busybox "$root/bin/$applet"
    done
fi
if [[ $VARIANT == memwork ]]; then
    gcc -O2 -static -o "$root/bin/memwork" "$MEMWORK_C" || die "gcc -static memwork.c failed (packages gcc libc6-dev)"
fi
mknod -m 600 "$root/dev/console" c 5 1
mknod -m 666 "$root/dev/null" c 1 3
if [[ $VARIANT == spin ]]; then
    # No system call at all: on a paravirtual shadow-paging host the first one kills init.
    printf '.globl _start\n_start:\n\tpause\n\tjmp _start\n' >"$root/init.S"
    as --64 -o "$root/init.o" "$root/init.S" || die "as failed (package binutils)"
    ld -static -nostdlib -e _start -o "$root/init" "$root/init.o" || die "ld failed (package binutils)"
    rm -f "$root/init.S" "$root/init.o"
else
    cat >"$root/init" <<EOF
#!/bin/sh
# $VARIANT init of the vmm test guest (resources/initramfs/build.sh)
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null || true
$body
EOF
fi
chmod 755 "$root/init"

(cd "$root" && find . -print0 | LC_ALL=C sort -z |
    cpio --null --create --format=newc --owner=0:0 --reproducible --quiet) |
    gzip -9 -n >"$image.tmp"
mv "$image.tmp" "$image"
log "built $image ($(stat -c %s "$image") bytes)"
echo "$image"
