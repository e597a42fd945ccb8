#!/usr/bin/env bash
# Prepare a host to run vmm and its tests. Run as root; idempotent, non-interactive.
#
#   bash resources/setup-host.sh [--no-kernel] [--hugepages N] [--gigpages N]   (as root; else it re-runs itself with sudo)
#
# What it does:
#   1. installs the Debian packages needed (only the missing ones);
#   2. host memory settings vmm needs (vmm itself never changes them):
#        .../hugepages-1048576kB/nr_hugepages                1G pages (--backing hugetlb-1g) raised to
#                                                          at least N (default 1, or $VMM_TEST_GIGPAGES),
#                                                          first, before memory fragments; never lowered
#        /proc/sys/vm/nr_hugepages                         raised to at least N (default 2048,
#                                                          or $VMM_TEST_HUGEPAGES), never lowered
#        /sys/kernel/mm/transparent_hugepage/shmem_enabled `advise` when it is `never`/`deny`
#      These stay set (the CI script saves and restores them around its run);
#   3. unless --no-kernel: builds the test guest kernel and initramfs images (cached in
#      ${VMM_CACHE_DIR:-/var/cache/vmm-test}, rebuilt only when their inputs change) and
#      writes their paths to $VMM_CACHE_DIR/test-env, where the integration tests find them
#      (VMM_TEST_KERNEL / VMM_TEST_INITRD / VMM_TEST_INITRD_SPIN / ... in the environment win).
#      The export lines are printed at the end as well.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${VMM_CACHE_DIR:-/var/cache/vmm-test}"
HUGEPAGES="${VMM_TEST_HUGEPAGES:-2048}"
GIGPAGES="${VMM_TEST_GIGPAGES:-1}"
KERNEL=1

log() { echo "[setup-host] $*" >&2; }
die() {
    echo "[setup-host] error: $*" >&2
    exit 1
}

while (($#)); do
    case "$1" in
    --no-kernel) KERNEL=0 ;;
    --hugepages)
        HUGEPAGES="${2:?--hugepages needs a number}"
        shift
        ;;
    --gigpages)
        GIGPAGES="${2:?--gigpages needs a number}"
        shift
        ;;
    -h | --help)
        sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *) die "unknown option '$1' (see --help)" ;;
    esac
    shift
done
[[ $HUGEPAGES =~ ^[0-9]+$ ]] || die "--hugepages wants a number, got '$HUGEPAGES'"
[[ $GIGPAGES =~ ^[0-9]+$ ]] || die "--gigpages wants a number, got '$GIGPAGES'"
if [[ $(id -u) != 0 ]]; then
    # It installs packages and writes /proc/sys/vm/nr_hugepages: root only.
    command -v sudo >/dev/null 2>&1 ||
        die "run as root: it installs packages and sets /proc/sys/vm/nr_hugepages (no sudo here)"
    log "not root: re-running with sudo"
    again=(--hugepages "$HUGEPAGES" --gigpages "$GIGPAGES")
    ((KERNEL)) || again+=(--no-kernel)
    exec sudo env VMM_CACHE_DIR="$CACHE" bash "${BASH_SOURCE[0]}" "${again[@]}"
fi

# 1. Packages. A C toolchain is needed to link Rust programs; the rest builds the test guest.
pkgs=(build-essential)
if ((KERNEL)); then
    pkgs+=(linux-source-6.1 flex bison bc libelf-dev xz-utils busybox-static cpio gzip binutils)
fi
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2 || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
        die "apt-get install ${missing[*]} failed"
else
    log "packages present: ${pkgs[*]}"
fi

# 2. Host memory settings.
[[ -e /dev/kvm ]] || log "warning: /dev/kvm is missing: load kvm_intel/kvm_amd (or run on a host with KVM); vmm cannot run guests"
# 1G pages first: they need 1 GiB of contiguous memory, which the 2M pool (and
# time) fragment.
gig=/sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages
if [[ -w $gig ]]; then
    cur="$(cat "$gig")"
    if ((cur < GIGPAGES)); then
        log "reserving $GIGPAGES hugetlb 1G pages (was $cur)"
        echo 1 >/proc/sys/vm/compact_memory 2>/dev/null || true
        echo "$GIGPAGES" >"$gig" || true
        got="$(cat "$gig")"
        ((got >= GIGPAGES)) || log "warning: only $got of $GIGPAGES 1G pages could be reserved (memory fragmented: reserve them at boot with hugepagesz=1G hugepages=N); --backing hugetlb-1g falls back to 2M frames, its tests skip"
    else
        log "1G nr_hugepages=$cur (>= $GIGPAGES)"
    fi
elif ((GIGPAGES > 0)); then
    log "warning: $gig missing (no 1G pages on this CPU or kernel); --backing hugetlb-1g uses 2M frames"
fi
nr=/proc/sys/vm/nr_hugepages
cur="$(cat "$nr")"
if ((cur < HUGEPAGES)); then
    log "reserving $HUGEPAGES hugetlb 2M pages (was $cur)"
    echo 1 >/proc/sys/vm/compact_memory 2>/dev/null || true
    echo "$HUGEPAGES" >"$nr"
    got="$(cat "$nr")"
    ((got >= HUGEPAGES)) || log "warning: only $got of $HUGEPAGES hugetlb pages could be reserved (memory fragmented?); tests needing more will skip"
else
    log "nr_hugepages=$cur (>= $HUGEPAGES)"
fi
shmem=/sys/kernel/mm/transparent_hugepage/shmem_enabled
if [[ -w $shmem ]]; then
    mode="$(sed -n 's/.*\[\(.*\)\].*/\1/p' "$shmem")"
    case "$mode" in
    never | deny)
        log "shmem_enabled: $mode -> advise (for --backing thp)"
        echo advise >"$shmem"
        ;;
    *) log "shmem_enabled=$mode" ;;
    esac
else
    log "warning: $shmem not writable; --backing thp needs it at advise/within_size/always"
fi

# 3. Test guest kernel and initramfs.
if ((KERNEL)); then
    export VMM_CACHE_DIR="$CACHE"
    kernel="$(bash "$HERE/kernel/build.sh" | tail -n1)"
    initrd="$(bash "$HERE/initramfs/build.sh" hello | tail -n1)"
    initrd_spin="$(bash "$HERE/initramfs/build.sh" spin | tail -n1)"
    initrd_work="$(bash "$HERE/initramfs/build.sh" memwork | tail -n1)"
    initrd_workload="$(bash "$HERE/initramfs/build.sh" workload | tail -n1)"
    l1host="$(bash "$HERE/l1host/build.sh" | tail -n1)"
    qemu="$(bash "$HERE/l1host/qemu.sh" | tail -n1)"
    env_file="$CACHE/test-env"
    {
        echo "VMM_TEST_KERNEL=$kernel"
        echo "VMM_TEST_INITRD=$initrd"
        echo "VMM_TEST_INITRD_SPIN=$initrd_spin"
        echo "VMM_TEST_INITRD_MEMWORK=$initrd_work"
        echo "VMM_TEST_INITRD_WORKLOAD=$initrd_workload"
        echo "VMM_TEST_L1HOST=$l1host"
        echo "VMM_TEST_QEMU=$qemu"
    } >"$env_file.tmp"
    mv "$env_file.tmp" "$env_file"
    log "test guest images listed in $env_file"
    sed 's/^/export /' "$env_file"
fi
log "done"
