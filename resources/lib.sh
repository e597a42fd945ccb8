# Helpers shared by the resources/*/build.sh scripts. Sourced, not run:
#   source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
# The sourcing script defines `log` and `die` (with its own tag) before calling these.

# ensure_packages PKG...: install the Debian packages of the list that are not
# installed (apt-get, as root; refreshes the package index once if the first
# try fails), or die with the command to run when not root.
ensure_packages() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    ((${#missing[@]})) || return 0
    [[ $(id -u) == 0 ]] || die "missing packages: ${missing[*]} (run: sudo apt-get install -y ${missing[*]})"
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 ||
        { apt-get update -qq >&2 && apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2; } ||
        die "apt-get install ${missing[*]} failed"
}
