#!/usr/bin/env bash
# Build the emulated hardware-virtualization host ("L1"): a Debian cloud kernel with KVM
# modules that QEMU runs in software (TCG) mode with `-cpu max` (AMD-V + NPT), so that
# `vmm` runs on KVM's TDP MMU, the MMU every real user has (README.md, "Emulated AMD-V + NPT host").
#
#   bash resources/l1host/build.sh     # prints the image directory as the last stdout line
#
# The directory holds:
#   vmlinuz         the L1 kernel (package linux-image-<version>-cloud-amd64-unsigned,
#                   the version that Debian's linux-image-cloud-amd64 points at)
#   base.cpio.gz    busybox-static, the modules irqbypass.ko kvm.ko kvm-amd.ko and /init
#                   (resources/l1host/init); a test driver appends a second, uncompressed
#                   cpio archive with the `vmm` binary, its shared libraries, the guest
#                   images and the batch of commands to run (tests/src/l1host/)
#   version         the kernel package and busybox versions it was built from
# Cached in ${VMM_CACHE_DIR:-/var/cache/vmm-test}, keyed by a hash of this script, the init,
# the kernel package version and the busybox version. Needs root (apt-get, mknod) and
# the packages below (installed when missing).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${VMM_CACHE_DIR:-/var/cache/vmm-test}"
DEPS=(qemu-system-x86 busybox-static cpio gzip)
META=linux-image-cloud-amd64

log() { echo "[l1host] $*" >&2; }
die() {
    echo "[l1host] error: $*" >&2
    exit 1
}

# shellcheck source=../lib.sh
source "$HERE/../lib.sh"
ensure_packages "${DEPS[@]}"
[[ $(id -u) == 0 ]] || die "needs root (apt-get download into the cache, mknod in the image)"

# The kernel package the meta-package points at now (apt-get update when the index is empty).
kpkg_of_meta() { apt-cache depends "$META" 2>/dev/null | sed -n 's/.*Depends: \(linux-image-[^ ]*-cloud-amd64\)$/\1/p' | head -n1; }
kpkg="$(kpkg_of_meta)"
if [[ -z $kpkg ]]; then
    log "refreshing the package index (apt-get update)"
    apt-get update -qq >&2 || die "apt-get update failed"
    kpkg="$(kpkg_of_meta)"
fi
[[ -n $kpkg ]] || die "apt-cache cannot resolve $META to a kernel package"
kpkg="$kpkg-unsigned"
kver="$(apt-cache policy "$kpkg" | sed -n 's/^ *Candidate: //p')"
[[ -n $kver && $kver != "(none)" ]] || die "no candidate version of $kpkg"
bb_version="$(dpkg-query -W -f='${Version}' busybox-static)"
key="$(cat "${BASH_SOURCE[0]}" "$HERE/init" <(echo "$kpkg $kver $bb_version") | sha256sum | cut -c1-16)"
out="$CACHE/l1host-$key"

mkdir -p "$CACHE"
exec 9>"$CACHE/.l1host.lock"
flock 9
if [[ -s $out/base.cpio.gz && -s $out/vmlinuz ]]; then
    log "cached: $out ($kpkg $kver)"
    echo "$out"
    exit 0
fi

work="$(mktemp -d "$CACHE/.l1host-XXXXXX")"
trap 'rm -rf "$work"' EXIT
log "downloading $kpkg $kver"
(cd "$work" && apt-get download -q "$kpkg=$kver" >&2 2>/dev/null) || die "apt-get download $kpkg=$kver failed"
deb="$(ls "$work"/*.deb)"
mkdir "$work/x"
dpkg-deb -x "$deb" "$work/x"

root="$work/root"
mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,etc,lib/modules,batch}
chmod 755 "$root"
cp /bin/busybox "$root/bin/busybox"
ln -s busybox "$root/bin/sh"
mknod -m 600 "$root/dev/console" c 5 1
mknod -m 666 "$root/dev/null" c 1 3
for m in virt/lib/irqbypass arch/x86/kvm/kvm arch/x86/kvm/kvm-amd; do
    src="$(find "$work/x/lib/modules" -path "*/kernel/$m.ko*" | head -n1)"
    [[ -n $src ]] || die "$m.ko not in $kpkg"
    case "$src" in
    *.ko) cp "$src" "$root/lib/modules/" ;;
    *.ko.xz) xz -dc "$src" >"$root/lib/modules/$(basename "$m").ko" ;;
    *.ko.zst) zstd -dqc "$src" >"$root/lib/modules/$(basename "$m").ko" ;;
    *) die "unknown module compression: $src" ;;
    esac
done
install -m 755 "$HERE/init" "$root/init"

staged="$work/stage"
mkdir "$staged"
(cd "$root" && find . -print0 | LC_ALL=C sort -z |
    cpio --null --create --format=newc --owner=0:0 --reproducible --quiet) |
    gzip -6 -n >"$staged/base.cpio.gz"
cp "$(ls "$work"/x/boot/vmlinuz-*)" "$staged/vmlinuz"
echo "$kpkg $kver busybox-static $bb_version" >"$staged/version"
rm -rf "$out"
mv "$staged" "$out"
log "built $out ($kpkg $kver)"
echo "$out"
