#!/usr/bin/env bash
# Debian's Chromium for the UI test (tests/ui/): the browser Playwright drives headless
# through its executable path, so Playwright never downloads a browser of its own.
#
#   scripts/chromium.sh    install Debian's chromium (and a font, for readable
#                          screenshots) when no browser binary is present, then print
#                          the binary's path on stdout
#
# Idempotent: with chromium installed it only prints the path. Settings:
# RECAPFLOW_CHROMIUM (a browser binary to use instead; nothing is installed).
# Exit status 77 (the conventional "skip"): no chromium and apt is unavailable.
set -euo pipefail

EXIT_APT_UNAVAILABLE=77
# Debian's /usr/bin/chromium is a shell wrapper (flags from /etc/chromium.d) that execs
# the real binary; Playwright launches the binary itself.
CANDIDATES=(/usr/lib/chromium/chromium /usr/bin/chromium)

log() { echo "chromium.sh: $*" >&2; }
die() {
    log "error: $*"
    exit 1
}

find_browser() {
    local b
    for b in "${CANDIDATES[@]}"; do
        if [[ -x "$b" ]]; then
            echo "$b"
            return 0
        fi
    done
    return 1
}

install_chromium() {
    local sudo=()
    if ! command -v apt-get >/dev/null 2>&1; then
        log "apt unavailable: no chromium at ${CANDIDATES[*]} and no apt-get to install Debian's"
        exit "$EXIT_APT_UNAVAILABLE"
    fi
    if [[ "$(id -u)" -ne 0 ]]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            sudo=(sudo -n)
        else
            log "apt unavailable: installing chromium needs root or passwordless sudo"
            exit "$EXIT_APT_UNAVAILABLE"
        fi
    fi
    log "installing Debian's chromium with apt-get"
    # Another apt run (another checkout's test) may hold dpkg's lock: wait for it.
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get -o DPkg::Lock::Timeout=600 update -q >&2 || die "apt-get update failed"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 \
        install -y -q --no-install-recommends chromium fonts-dejavu-core >&2 ||
        die "apt-get install chromium failed"
}

if [[ -n "${RECAPFLOW_CHROMIUM:-}" ]]; then
    [[ -x "$RECAPFLOW_CHROMIUM" ]] || die "RECAPFLOW_CHROMIUM=$RECAPFLOW_CHROMIUM is not executable"
    echo "$RECAPFLOW_CHROMIUM"
    exit 0
fi
if ! find_browser >/dev/null; then
    install_chromium
fi
BROWSER="$(find_browser)" || die "chromium installed, but no binary at ${CANDIDATES[*]}"
log "$("$BROWSER" --version 2>/dev/null || echo "$BROWSER")"
echo "$BROWSER"
