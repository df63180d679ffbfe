#!/bin/sh
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# The real guest's report (vmspawnd-report.service): once the guest's systemd has finished
# booting, print what the guest received, one `VMSPAWND-REAL: KEY VALUE` line per fact, on the
# console. Binary or multi-line values are base64 on one line. tests/realguest parses them.
#
# Run as a Type=exec unit: a oneshot would hold up the boot it waits for.

REPORT=/run/vmspawnd-report

# Each fact goes to the console (to follow the boot) and to $REPORT, which ends up on the
# read-write shares: the console is shared with the getty and the kernel, whose output can
# land in the middle of a line, so the test reads the copy on the share.
tag() {
    printf 'VMSPAWND-REAL: %s\n' "$*" >>"$REPORT"
    printf 'VMSPAWND-REAL: %s\n' "$*"
}

b64() {
    base64 -w0 "$@"
}

tag report-start
state=$(systemctl is-system-running --wait)
tag state "$state"
for unit in $(systemctl list-units --failed --plain --no-legend --full | awk '{print $1}'); do
    tag failed "$unit"
done
tag startup "$(systemd-analyze time 2>/dev/null | head -n1 | b64)"

tag cmdline "$(b64 /proc/cmdline)"
tag kernel "$(uname -r)"
tag virt "$(systemd-detect-virt)"
tag product-uuid "$(cat /sys/class/dmi/id/product_uuid)"
tag root "$(findmnt -rn -o FSTYPE,SOURCE,OPTIONS /)"

# Credentials PID 1 imported (SMBIOS type 11, fw_cfg, kernel command line).
for cred in /run/credentials/@system/*; do
    [ -e "$cred" ] && tag credential "${cred##*/}" "$(b64 "$cred")"
done
for entry in /sys/firmware/dmi/entries/11-*; do
    [ -e "$entry/raw" ] && tag smbios11 "$(b64 "$entry/raw")"
done

# The shares vmspawn added besides the root (systemd.mount-extra=): where, how, and whether
# the guest can read the host's file and write its own.
findmnt -rn -t virtiofs -o TARGET,SOURCE,OPTIONS | while read -r target source options; do
    tag mount "$target" "$source" "$options"
    [ "$target" = / ] && continue
    for file in "$target"/*; do
        [ -f "$file" ] && tag read "$file" "$(b64 "$file")"
    done
    if err=$(echo "written by the guest" 2>&1 >"$target/from-guest"); then
        tag write "$target" ok
    else
        tag write "$target" "$(printf '%s' "$err" | b64)"
    fi
done

if [ -c /dev/tpm0 ]; then
    tag tpm0 yes
    for pcr in 4 7 11 12; do
        f=/sys/class/tpm/tpm0/pcr-sha256/$pcr
        [ -r "$f" ] && tag pcr "$pcr" "$(cat "$f")"
    done
else
    tag tpm0 no
fi

if [ -d /sys/firmware/efi ]; then
    tag efi yes
    # What systemd-boot and systemd-stub report of themselves (UTF-16 strings, 4 attribute
    # bytes first), and the Secure Boot state and mode (one byte after them).
    for var in LoaderInfo-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f StubInfo-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f \
               SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c SetupMode-8be4df61-93ca-11d2-aa0d-00e098032b8c; do
        f=/sys/firmware/efi/efivars/$var
        [ -r "$f" ] && tag efivar "${var%%-*}" "$(b64 "$f")"
    done
else
    tag efi no
fi

# --bind-user: the name comes on the kernel command line.
for word in $(cat /proc/cmdline); do
    case $word in
        vmspawnd_real.user=*)
            user=${word#*=}
            if out=$(userdbctl user "$user" 2>&1); then
                tag userdb "$user" ok "$(printf '%s' "$out" | b64)"
            else
                tag userdb "$user" failed "$(printf '%s' "$out" | b64)"
            fi
            ;;
    esac
done

# Last, what `vmspawnctl stop` needs: logind watching the ACPI power button. The button's
# driver is a module udev loads during coldplug, which may end after the boot has: a press
# before that is lost (the firmware has nobody to tell).
udevadm settle --timeout=300
if button=$(timeout 300 journalctl -b -f -o cat -u systemd-logind.service | grep -m1 'Watching system buttons.*Power Button'); then
    tag power-button "$button"
else
    tag power-button none
fi

# Published whole (rename) on every read-write share but the root.
findmnt -rn -t virtiofs -o TARGET,OPTIONS | while read -r target options; do
    case $target,$options in
        /,*) ;;
        *,rw,*|*,rw) cp "$REPORT" "$target/.vmspawnd-report" && mv "$target/.vmspawnd-report" "$target/vmspawnd-report" ;;
    esac
done
tag report-done
