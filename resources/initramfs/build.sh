#!/usr/bin/env bash
# Build a busybox-static initramfs (cpio newc, not compressed) for the test guest kernel.
# Not compressed: on a paravirtual shadow-paging host the guest kernel's CPL0 code is
# emulated and unpacking the gzip'd 1 MiB `hello` image took ~3 minutes of its boot (to
# unpack the 1.9 MiB cpio as it is, 17 s; 256 MiB guest).
#
#   bash resources/initramfs/build.sh [hello|spin|memwork|workload]   # prints the image path as the last stdout line
#
# Variants (the /init each one runs):
#   hello  prints VMM-TEST-INIT-OK on the console, then `poweroff -f`.
#   memwork  runs resources/initramfs/memwork.c (built static here): round after round it
#          maps, writes, checks and unmaps 48 MiB while it watches MemTotal, until a
#          balloon inflate and deflate have come and gone (MEMWORK-OK), then `poweroff -f`.
#   workload  /init is resources/initramfs/workload-init.sh, the guest init protocol of
#          `vmm bench workload` (docs/ARCHITECTURE.md): it runs the command passed as
#          vmm.run=<base64> on the kernel command line between VMM-RESULT-BEGIN/END,
#          timed inside the guest, then `poweroff -f`. Ships /bin/chase and /bin/gups
#          (chase.c, gups.c: the `tlb` test guest's loops, `RESULT ns_per_access=...`)
#          and /bin/nsclock, built static here.
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
DEPS=(busybox-static cpio binutils)

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
workload) body='' ;;
*) die "unknown variant '$VARIANT' (expected hello, spin, memwork or workload)" ;;
esac

# shellcheck source=../lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
[[ $VARIANT != memwork && $VARIANT != workload ]] || DEPS+=(gcc libc6-dev)
ensure_packages "${DEPS[@]}"
[[ $(id -u) == 0 ]] || die "needs root (to create /dev/console in the image)"

busybox=/bin/busybox
[[ -x $busybox ]] || die "$busybox not found (package busybox-static)"
bb_version="$(dpkg-query -W -f='${Version}' busybox-static)"
SRC="$(dirname "${BASH_SOURCE[0]}")"
MEMWORK_C="$SRC/memwork.c"
WORKLOAD_SRC=("$SRC/bench_common.h" "$SRC/chase.c" "$SRC/gups.c" "$SRC/nsclock.c" "$SRC/workload-init.sh")
extra=""
[[ $VARIANT != memwork ]] || extra="$(cat "$MEMWORK_C"; gcc --version | head -n1)"
[[ $VARIANT != workload ]] || extra="$(cat "${WORKLOAD_SRC[@]}"; gcc --version | head -n1)"
key="$(cat "${BASH_SOURCE[0]}" <(echo "$bb_version") <(echo "$extra") | sha256sum | cut -c1-16)"
image="$CACHE/initramfs-$VARIANT-$key.cpio"

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
    applets=(sh echo mount sleep poweroff cat)
    [[ $VARIANT != workload ]] || applets+=(base64 tr sed head cut grep ls free uname dd env true false)
    for applet in "${applets[@]}"; do
        ln -s busybox "$root/bin/$applet"
    done
fi
if [[ $VARIANT == memwork ]]; then
    gcc -O2 -static -o "$root/bin/memwork" "$MEMWORK_C" || die "gcc -static memwork.c failed (packages gcc libc6-dev)"
fi
if [[ $VARIANT == workload ]]; then
    for prog in chase gups nsclock; do
        gcc -O2 -Wall -static -o "$root/bin/$prog" "$SRC/$prog.c" ||
            die "gcc -static $prog.c failed (packages gcc libc6-dev)"
    done
fi
mknod -m 600 "$root/dev/console" c 5 1
mknod -m 666 "$root/dev/null" c 1 3
if [[ $VARIANT == spin ]]; then
    # No system call at all: on a paravirtual shadow-paging host the first one kills init.
    printf '.globl _start\n_start:\n\tpause\n\tjmp _start\n' >"$root/init.S"
    as --64 -o "$root/init.o" "$root/init.S" || die "as failed (package binutils)"
    ld -static -nostdlib -e _start -o "$root/init" "$root/init.o" || die "ld failed (package binutils)"
    rm -f "$root/init.S" "$root/init.o"
elif [[ $VARIANT == workload ]]; then
    cp "$SRC/workload-init.sh" "$root/init"
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
    cpio --null --create --format=newc --owner=0:0 --reproducible --quiet) >"$image.tmp"
mv "$image.tmp" "$image"
log "built $image ($(stat -c %s "$image") bytes)"
echo "$image"
