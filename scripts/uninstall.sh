# shellcheck shell=bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# `scripts/install --uninstall`: undo what scripts/install did, and say what went. Sourced by
# scripts/install, which has set PREFIX, PREFIX_GIVEN, DEFAULT_PREFIX, VMSPAWND, VMSPAWNCTL,
# LOGFILE, PIDFILE and DAEMON_ADDRESS; not meant to run alone.
#
# Removed: the units (system and user), the venv at PREFIX (its docs included),
# /usr/local/bin/vmspawnctl, vmspawnctl's man pages and shell completions, the system
# instance's socket and runtime directory (/run/vmspawnd: records and console logs of ended
# VMs), the background daemon's pid file and log.
# Kept: what was made with it — disk images and directories, TPM state (IMAGE.tpmstate,
# DIR.tpmstate, --tpm-state=PATH), forwarded journals — and the system packages (QEMU,
# swtpm, OVMF, ...), which other software may use.
# Refused while a VM runs (it would lose its supervisor: nothing would stop it cleanly, or
# answer machinectl) and while a user instance runs (its user stops it).

SYSTEM_UNITS=(vmspawnd-guests.service vmspawnd.socket vmspawnd.service)
USER_UNITS=(vmspawnd.socket vmspawnd.service)
# vmspawnctl's man pages and completions, wherever scripts/install puts them (the usual
# /usr/local places for each shell); removed only if present.
EXTRA_FILES=(
    /usr/local/share/man/man1/vmspawnctl.1
    /usr/local/share/man/man8/vmspawnd.8
    /usr/local/share/bash-completion/completions/vmspawnctl
    /usr/local/share/zsh/site-functions/_vmspawnctl
    /usr/local/share/fish/vendor_completions.d/vmspawnctl.fish
)

# The venv that /usr/local/bin/vmspawnctl points into: where an earlier --prefix put it.
installed_prefix() {
    local target
    target=$(readlink /usr/local/bin/vmspawnctl 2>/dev/null) || return 1
    case $target in
        /*/bin/vmspawnctl) printf '%s\n' "${target%/bin/vmspawnctl}" ;;
        *) return 1 ;;
    esac
}

# "PID UID" of every vmspawnd running from PREFIX (system or user instance). Matched by the
# daemon's path as a whole word of its command line, never by a name alone.
prefix_daemons() {
    local dir cmdline
    for dir in /proc/[0-9]*; do
        cmdline=$(tr '\0' ' ' <"$dir/cmdline" 2>/dev/null) || continue
        case " $cmdline" in
            *" $VMSPAWND "*)
                if pid_running "${dir#/proc/}"; then
                    printf '%s %s\n' "${dir#/proc/}" "$(stat -c %u "$dir")"
                fi
                ;;
        esac
    done
}

# The names of the system instance's VMs that have not ended and whose QEMU still exists,
# from their records (there whether or not a daemon runs: VMs outlive it).
active_vms() {
    local python=$PREFIX/bin/python
    [ -x "$python" ] || python=python3
    "$python" - "${DAEMON_ADDRESS%/*}/machines" <<'EOF'
import json, os, sys

base = sys.argv[1]
for entry in sorted(os.listdir(base)) if os.path.isdir(base) else []:
    try:
        with open(os.path.join(base, entry, "state.json")) as f:
            machine = json.load(f)["machine"]
        pid = (machine.get("qemu") or {}).get("pid")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        continue
    if machine.get("state") not in ("stopped", "failed") and isinstance(pid, int) and os.path.exists(f"/proc/{pid}"):
        print(machine.get("name"))
EOF
}

# Users whose service manager has vmspawnd's user socket or service active.
users_with_user_instance() {
    local unit uid user
    while read -r unit _; do
        uid=${unit#user@}
        uid=${uid%.service}
        user=$(id -nu "$uid" 2>/dev/null) || continue
        if systemctl --user -M "$user@" is-active --quiet "${USER_UNITS[@]}" 2>/dev/null; then
            printf '%s\n' "$user"
        fi
    done < <(systemctl list-units --plain --no-legend --state=active 'user@*.service' 2>/dev/null)
}

# stop_pid PID: SIGTERM, then wait (30 s at most) until it is gone.
stop_pid() {
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 150; i++)); do
        pid_running "$pid" || return 0
        sleep 0.2
    done
    die "vmspawnd (pid $pid) did not exit within 30 s of SIGTERM"
}

remove_path() {
    if [ -e "$1" ] || [ -L "$1" ]; then
        rm -rf -- "$1"
        log "removed $1${2:+ ($2)}"
    fi
}

uninstall() {
    local prefix vms pid uid units=() user_units=() others=() unit file
    if [ "$PREFIX_GIVEN" -eq 0 ] && prefix=$(installed_prefix) && [ "$prefix" != "$PREFIX" ]; then
        log "vmspawnctl points into $prefix: uninstalling from there"
        PREFIX=$prefix VMSPAWND=$prefix/bin/vmspawnd VMSPAWNCTL=$prefix/bin/vmspawnctl
    fi

    # --- what must stop first: VMs, user instances -----------------------------------------
    vms=$(active_vms | paste -sd' ' -)
    if [ -n "$vms" ]; then
        die "VMs still run under vmspawnd: $vms. Stop them first (vmspawnctl stop NAME, or all at once: vmspawnctl shutdown-all), then run ${0##*/} --uninstall again"
    fi
    while read -r pid uid; do
        [ "$uid" = 0 ] || others+=("$(id -nu "$uid" 2>/dev/null || echo "uid $uid") (pid $pid)")
    done < <(prefix_daemons)
    if [ -d /run/systemd/system ]; then
        while read -r user; do
            others+=("$user")
        done < <(users_with_user_instance)
    fi
    if [ "${#others[@]}" -gt 0 ]; then
        die "user instances of vmspawnd run for: ${others[*]}. Each user stops theirs first (systemctl --user disable --now vmspawnd.socket vmspawnd.service), then run ${0##*/} --uninstall again"
    fi

    # --- the system instance ---------------------------------------------------------------
    for unit in "${SYSTEM_UNITS[@]}"; do
        [ -f "/etc/systemd/system/$unit" ] && units+=("$unit")
    done
    for unit in "${USER_UNITS[@]}"; do
        [ -f "/etc/systemd/user/$unit" ] && user_units+=("$unit")
    done
    if [ -d /run/systemd/system ] && [ "${#units[@]}" -gt 0 ]; then
        # One transaction, stopped in order: vmspawnd-guests (its shutdown-all finds no VM),
        # then the daemon and its socket.
        log "stopping and disabling ${units[*]}"
        systemctl disable --now --quiet "${units[@]}"
    fi
    if [ -d /run/systemd/system ] && [ "${#user_units[@]}" -gt 0 ]; then
        systemctl --global disable --quiet "${user_units[@]}" || true
    fi
    # A daemon not under a unit: the one this script started without systemd, or one run by hand.
    while read -r pid uid; do
        log "stopping vmspawnd (pid $pid)"
        stop_pid "$pid"
    done < <(prefix_daemons)

    # --- files -------------------------------------------------------------------------------
    for unit in "${units[@]}"; do
        remove_path "/etc/systemd/system/$unit"
    done
    for unit in "${user_units[@]}"; do
        remove_path "/etc/systemd/user/$unit"
    done
    if [ -d /run/systemd/system ] && [ "$((${#units[@]} + ${#user_units[@]}))" -gt 0 ]; then
        systemctl daemon-reload
        systemctl reset-failed "${SYSTEM_UNITS[@]}" 2>/dev/null || true
    fi
    if [ "$(readlink /usr/local/bin/vmspawnctl 2>/dev/null)" = "$VMSPAWNCTL" ]; then
        remove_path /usr/local/bin/vmspawnctl
    fi
    for file in "${EXTRA_FILES[@]}"; do
        remove_path "$file"
    done
    if [ -f "$PREFIX/.vmspawnd-source" ] || [ -x "$VMSPAWND" ]; then
        remove_path "$PREFIX" "the venv"
    elif [ -e "$PREFIX" ]; then
        log "left $PREFIX alone: it holds no vmspawnd venv"
    fi
    remove_path "${DAEMON_ADDRESS%/*}" "the socket, and the records and console logs of ended VMs"
    remove_path "$PIDFILE"
    remove_path "$LOGFILE" "the log of the daemon started without systemd"

    log "done: vmspawnd is uninstalled. Kept: VM images and directories, their TPM state" \
        "(IMAGE.tpmstate, DIR.tpmstate, --tpm-state=PATH), forwarded journals, and the system packages" \
        "(QEMU, swtpm, OVMF, ...: apt-get remove them if nothing else needs them)"
}
