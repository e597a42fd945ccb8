#!/usr/bin/env bash
# Build a busybox-static initramfs (cpio newc, gzip) for the test guest kernel.
#
#   bash resources/initramfs/build.sh [hello|spin]   # prints the image path as the last stdout line
#
# Variants (the /init each one runs):
#   hello  prints VMM-TEST-INIT-OK on the console, then `poweroff -f`.
#   spin   prints VMM-TEST-INIT-SPIN, then stays alive (sleeping) until the VMM stops it;
#          for tests that act on a running guest (virtio-balloon).
# A Linux guest runs user space only on a VT-x/AMD-V host: on a paravirtual shadow-paging
# KVM host the first system call of /init is not delivered (see docs), so neither marker
# prints there and the kernel's "Run /init as init process" is the last line to expect.
#
# Cached in ${VMM_CACHE_DIR:-/var/cache/vmm-test}, keyed by a hash of this script and the
# busybox-static version. Needs root (mknod /dev/console) and busybox-static + cpio.
set -euo pipefail

VARIANT="${1:-hello}"
CACHE="${VMM_CACHE_DIR:-/var/cache/vmm-test}"
DEPS=(busybox-static cpio gzip)

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
spin)
    body='echo VMM-TEST-INIT-SPIN
while :; do sleep 3600; done'
    ;;
*) die "unknown variant '$VARIANT' (expected hello or spin)" ;;
esac

missing=()
for p in "${DEPS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    [[ $(id -u) == 0 ]] || die "missing packages: ${missing[*]} (run: sudo apt-get install -y ${missing[*]})"
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 ||
        { apt-get update -qq >&2 && apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2; } ||
        die "apt-get install ${missing[*]} failed"
fi
[[ $(id -u) == 0 ]] || die "needs root (to create /dev/console in the image)"

busybox=/bin/busybox
[[ -x $busybox ]] || die "$busybox not found (package busybox-static)"
bb_version="$(dpkg-query -W -f='${Version}' busybox-static)"
key="$(cat "${BASH_SOURCE[0]}" <(echo "$bb_version") | sha256sum | cut -c1-16)"
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
cp "$busybox" "$root/bin/busybox"
for applet in sh echo mount sleep poweroff cat; do
    ln -s busybox "$root/bin/$applet"
done
mknod -m 600 "$root/dev/console" c 5 1
mknod -m 666 "$root/dev/null" c 1 3
cat >"$root/init" <<EOF
#!/bin/sh
# $VARIANT init of the vmm test guest (resources/initramfs/build.sh)
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null || true
$body
EOF
chmod 755 "$root/init"

(cd "$root" && find . -print0 | LC_ALL=C sort -z |
    cpio --null --create --format=newc --owner=0:0 --reproducible --quiet) |
    gzip -9 -n >"$image.tmp"
mv "$image.tmp" "$image"
log "built $image ($(stat -c %s "$image") bytes)"
echo "$image"
