# shellcheck shell=bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# Shell functions shared by scripts/install and scripts/test. Source it, do not run it.
# Callers set -euo pipefail themselves.

# The Debian packages vmspawnd and its tests need on every supported release (bookworm, trixie,
# forky); docs/dependencies.md says why each. vmspawnd_system_packages adds what differs by release.
VMSPAWND_SYSTEM_PACKAGES=(
    qemu-system-x86
    qemu-system-common
    qemu-utils
    ovmf
    swtpm
    swtpm-tools
    dbus
    systemd
    systemd-journal-remote
    openssh-client
    busybox-static
    systemd-boot-efi
    mtools
    dosfstools
    cpio
    zstd
    python3-venv
)

# Only for the tests: the system tier (tests/system) builds Debian trees and boots them with
# systemd as PID 1 in containers; man-db renders the man pages, bash-completion and zsh run
# the completion scripts (tests/unit/test_manpages.py, tests/integration/test_cli_conventions.py).
VMSPAWND_TEST_PACKAGES=(
    debootstrap
    systemd-container
    man-db
    bash-completion
    zsh
)

# The oldest Python pyproject.toml accepts (requires-python).
VMSPAWND_MIN_PYTHON=3.11

_VMSPAWND_APT_UPDATED=0

log() {
    printf '%s: %s\n' "${0##*/}" "$*" >&2
}

die() {
    printf '%s: error: %s\n' "${0##*/}" "$*" >&2
    exit 1
}

# True when PID exists and is no zombie (PID 1 here may reap orphans late).
pid_running() {
    local state
    # The state follows the ")" that ends the command name (which may contain spaces).
    state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1 || true)
    [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
}

repo_root() {
    # The directory above scripts/, whatever the caller's cwd.
    (cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
}

# Run a command as root: directly when we are root, through sudo otherwise.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root for: $* (run as root, or install sudo)"
    fi
}

# Print the packages among "$@" that dpkg does not list as installed, one per line.
missing_packages() {
    local pkg status
    for pkg in "$@"; do
        status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
        if [ "$status" != installed ]; then
            printf '%s\n' "$pkg"
        fi
    done
}

# True when apt has package lists at all (a fresh image may have none until apt-get update).
apt_lists_present() {
    compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null
}

# True when apt knows an installable version of every package in "$@".
apt_has_candidates() {
    local pkg candidate
    for pkg in "$@"; do
        candidate=$(apt-cache policy "$pkg" 2>/dev/null | awk '/Candidate:/ { print $2 }')
        if [ -z "$candidate" ] || [ "$candidate" = "(none)" ]; then
            return 1
        fi
    done
}

apt_update_once() {
    if [ "$_VMSPAWND_APT_UPDATED" -eq 0 ]; then
        log "running apt-get update"
        as_root apt-get -o DPkg::Lock::Timeout=300 update -q
        _VMSPAWND_APT_UPDATED=1
    fi
}

# Make sure apt has package lists that can be used for downloads: update when there are none.
# Later failures (stale lists on a mirror that moved on) are handled by the callers' retry.
ensure_apt_lists() {
    if ! apt_lists_present; then
        apt_update_once
    fi
}

# Install whichever of "$@" is missing. apt-get update runs only when it is needed: when apt
# has no candidate for a missing package, or when an install from the existing lists fails
# (stale lists: the mirror no longer has that version).
ensure_packages() {
    local missing
    mapfile -t missing < <(missing_packages "$@")
    if [ "${#missing[@]}" -eq 0 ]; then
        return 0
    fi
    log "installing missing system packages: ${missing[*]}"
    if ! apt_has_candidates "${missing[@]}"; then
        apt_update_once
    fi
    # Recommends are left out: qemu-system-x86 would pull in a whole GTK/SDL stack
    # (qemu-system-gui) that a headless VM supervisor never uses; what we need is listed.
    local install=(env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300
                   install -y -q --no-install-recommends "${missing[@]}")
    if ! as_root "${install[@]}" </dev/null; then
        if [ "$_VMSPAWND_APT_UPDATED" -eq 1 ]; then
            die "apt-get install failed for: ${missing[*]}"
        fi
        log "apt-get install failed; retrying after apt-get update"
        apt_update_once
        as_root "${install[@]}" </dev/null || die "apt-get install failed for: ${missing[*]}"
    fi
    mapfile -t missing < <(missing_packages "$@")
    if [ "${#missing[@]}" -ne 0 ]; then
        die "still not installed after apt-get: ${missing[*]}"
    fi
}

# The Debian release this machine runs (VERSION_CODENAME: bookworm, trixie, forky, ...), empty
# if /etc/os-release does not say. Testing and unstable report the next release's name.
debian_codename() {
    (
        # shellcheck disable=SC1091
        . /etc/os-release 2>/dev/null || true
        printf '%s\n' "${VERSION_CODENAME:-}"
    )
}

# Print, one per line, the packages vmspawnd needs on Debian release $1 (default: this machine's).
# The tests' system tier builds its trees from this list too, so a name that does not exist on
# some release fails there first.
vmspawnd_system_packages() {
    local codename=${1-$(debian_codename)}
    printf '%s\n' "${VMSPAWND_SYSTEM_PACKAGES[@]}"
    case $codename in
        # bookworm has no virtiofsd package: QEMU's C virtiofsd is /usr/lib/qemu/virtiofsd from
        # qemu-system-common. From trixie on, QEMU dropped it and the Rust virtiofsd
        # (/usr/libexec/virtiofsd) is a package of its own.
        bookworm) ;;
        *) printf '%s\n' virtiofsd ;;
    esac
}

ensure_system_packages() {
    local packages
    mapfile -t packages < <(vmspawnd_system_packages)
    ensure_packages "${packages[@]}"
}

# The host packages of the tests' system tier (debootstrap, systemd-nspawn).
ensure_test_packages() {
    ensure_packages "${VMSPAWND_TEST_PACKAGES[@]}"
}

# Print the python3 to build venvs with: the one on PATH, checked against requires-python.
find_python() {
    local py
    py=$(command -v python3 || true)
    [ -n "$py" ] || die "python3 not found on PATH (install python3 >= $VMSPAWND_MIN_PYTHON)"
    if ! "$py" -c "import sys; sys.exit(sys.version_info < tuple(map(int, '$VMSPAWND_MIN_PYTHON'.split('.'))))"; then
        die "$py is $("$py" -V 2>&1); vmspawnd needs Python >= $VMSPAWND_MIN_PYTHON"
    fi
    if ! "$py" -c 'import venv, ensurepip' 2>/dev/null; then
        die "$py cannot create venvs (on Debian: apt-get install python3-venv)"
    fi
    printf '%s\n' "$py"
}

# Create the venv at $1 unless a working one is there. A broken venv (its interpreter moved
# or was upgraded away) is recreated, but only if the directory really is a venv: never
# clear a directory that lacks pyvenv.cfg.
ensure_venv() {
    local dir=$1 py
    if [ -x "$dir/bin/python" ] && "$dir/bin/python" -c 'import pip' 2>/dev/null; then
        return 0
    fi
    py=$(find_python)
    if [ -e "$dir/pyvenv.cfg" ]; then
        log "recreating broken venv $dir with $py"
        "$py" -m venv --clear "$dir"
    elif [ -d "$dir" ] && [ -n "$(ls -A "$dir")" ]; then
        die "$dir exists, is not empty and is not a venv; refusing to touch it"
    else
        log "creating venv $dir with $py"
        "$py" -m venv "$dir"
    fi
}

# Run the test-guest builder and set GUEST_KERNEL and GUEST_INITRD from its KERNEL=/INITRD=
# lines. $1 is the python to run it with; the cwd must be the repo root. It downloads
# Debian's linux-image with apt-get download, so it needs apt lists: with none it would fail,
# with stale ones the download 404s, hence one retry after apt-get update.
build_test_guest() {
    local py=$1 out line
    GUEST_KERNEL='' GUEST_INITRD=''
    ensure_apt_lists
    if ! out=$("$py" -m tests.guest.build </dev/null); then
        if [ "$_VMSPAWND_APT_UPDATED" -eq 1 ] || [ "$(id -u)" -ne 0 ]; then
            die "building the test guest failed (python -m tests.guest.build)"
        fi
        log "building the test guest failed; retrying after apt-get update"
        apt_update_once
        out=$("$py" -m tests.guest.build </dev/null) \
            || die "building the test guest failed (python -m tests.guest.build)"
    fi
    while IFS= read -r line; do
        case $line in
            KERNEL=*) GUEST_KERNEL=${line#KERNEL=} ;;
            INITRD=*) GUEST_INITRD=${line#INITRD=} ;;
        esac
    done <<<"$out"
    if [ -z "$GUEST_KERNEL" ] || [ ! -f "$GUEST_KERNEL" ]; then
        die "tests.guest.build printed no usable KERNEL= line; it printed: $out"
    fi
    if [ -z "$GUEST_INITRD" ] || [ ! -f "$GUEST_INITRD" ]; then
        die "tests.guest.build printed no usable INITRD= line; it printed: $out"
    fi
}
