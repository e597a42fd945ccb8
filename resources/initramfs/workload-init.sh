#!/bin/sh
# /init of the `workload` initramfs (resources/initramfs/build.sh): the reference
# implementation of the vmm guest init protocol (docs/ARCHITECTURE.md, "Guest init
# protocol"). Any initramfs that follows it works with `vmm bench workload`:
#   1. CMD is on the kernel command line as vmm.run=<base64 of CMD> (RFC 4648, no
#      line breaks); vmm.thp=always|madvise|never, when present, is written to
#      /sys/kernel/mm/transparent_hugepage/enabled first.
#   2. init prints VMM-RESULT-BEGIN, runs CMD with `sh -c` (its stdout and stderr on
#      the console), then VMM-RESULT-END rc=<exit status> wall_ns=<CMD's wall time,
#      CLOCK_MONOTONIC inside the guest>; CMD reports its figures on lines
#      `RESULT key=value ...` between the two markers.
#   3. one line VMM-GUEST key=value ... with the guest's THP counters, then
#      `poweroff -f` (the VMM sees the halted guest and exits 0).
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null || true

arg() { tr ' ' '\n' </proc/cmdline | sed -n "s/^$1=//p" | head -n 1; }
# Monotonic nanoseconds: nsclock when the image has it, else /proc/uptime (10 ms).
ns() {
    if [ -x /bin/nsclock ]; then
        nsclock
    else
        set -- $(tr -d . </proc/uptime)
        echo $(($1 * 10000000))
    fi
}
thp_file=/sys/kernel/mm/transparent_hugepage/enabled
thp=$(arg vmm.thp)
if [ -n "$thp" ]; then
    echo "$thp" >"$thp_file" || echo "VMM-RESULT-ERROR cannot set $thp_file to $thp"
fi
b64=$(arg vmm.run)
if [ -z "$b64" ]; then
    echo "VMM-RESULT-ERROR no vmm.run=<base64 of CMD> on the kernel command line"
    poweroff -f
fi
if ! cmd=$(echo "$b64" | base64 -d); then
    echo "VMM-RESULT-ERROR vmm.run is not valid base64"
    poweroff -f
fi
echo VMM-RESULT-BEGIN
t0=$(ns)
sh -c "$cmd"
rc=$?
t1=$(ns)
echo "VMM-RESULT-END rc=$rc wall_ns=$((t1 - t0))"
guest="thp_enabled=$(sed -n 's/.*\[\(.*\)\].*/\1/p' $thp_file 2>/dev/null)"
guest="$guest AnonHugePages_kb=$(sed -n 's/^AnonHugePages: *\([0-9]*\).*/\1/p' /proc/meminfo)"
for k in thp_fault_alloc thp_fault_fallback thp_collapse_alloc; do
    v=$(sed -n "s/^$k //p" /proc/vmstat 2>/dev/null)
    [ -z "$v" ] || guest="$guest $k=$v"
done
echo "VMM-GUEST $guest"
poweroff -f
