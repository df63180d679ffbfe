#!/bin/busybox sh
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# /init of the vmspawnd test guest (see README.md next to this file).
#
# It reports raw facts about the virtual hardware it sees, one
# "VMSPAWND-TEST: ..." line each, so that tests compare them against what
# they asked vmspawnd for.  It never prints expected values: deciding what
# is right is the test's job.  POSIX sh / busybox only.

PATH=/bin
export PATH

# Written by build.py: "NAME PATH" per line, dependencies first.
MODULE_LIST=/etc/vmspawnd-test/modules.load
TAG="VMSPAWND-TEST:"

# Print one tagged line; the only way this script talks to tests.
fact() {
    echo "$TAG $*"
}

# The kernel hands /init an empty rootfs: give it the API filesystems and
# the writable directories busybox daemons (acpid) expect.
mount_basics() {
    mount -t proc proc /proc
    mount -t sysfs sysfs /sys
    mount -t devtmpfs devtmpfs /dev
    mkdir -p /var/log /var/run /tmp /mnt
}

# Kernel messages share the console with our lines and could split them;
# keep only errors and worse there (dmesg still has everything).
quiet_kernel_console() {
    echo 4 >/proc/sys/kernel/printk
}

# insmod everything in build order.  Failures are collected, not printed:
# the console (virtio_console) may not exist yet, so they are reported later.
load_modules() {
    FAILED_MODULES=""
    while read -r name path; do
        [ -n "$name" ] || continue
        [ -e "/sys/module/$name" ] && continue
        insmod "$path" >/dev/null 2>&1 || FAILED_MODULES="$FAILED_MODULES $name"
    done <"$MODULE_LIST"
}

# True if the kernel command line has the exact word $1.
cmdline_has() {
    set -f
    for word in $CMDLINE; do
        if [ "$word" = "$1" ]; then
            set +f
            return 0
        fi
    done
    set +f
    return 1
}

# Value of the last KEY=VALUE word for key $1 (like the kernel: last wins).
cmdline_value() {
    value=""
    set -f
    for word in $CMDLINE; do
        case "$word" in
            "$1"=*) value=${word#*=} ;;
        esac
    done
    set +f
    echo "$value"
}

# Run the command "$@" until it succeeds, for up to ~5 s; polling is fine
# inside the guest.
wait_until() {
    tries=0
    until "$@"; do
        [ "$tries" -lt 50 ] || return 1
        usleep 100000
        tries=$((tries + 1))
    done
}

wait_for_path() {
    wait_until test -e "$1"
}

# Point stdio at a real console tty; job control needs one (/dev/console
# cannot be a controlling terminal).
use_console() {
    # shellcheck disable=SC2094 # a tty, not a file: reading and writing is the point
    exec <"$1" >"$1" 2>&1
    CONSOLE=$1
}

# virtio_console is a module, so the kernel could not give us hvc0 as the
# initial console: reopen stdio on it once the module created it.  Other
# consoles (console=ttyS0...) are resolved through sysfs; with several, the
# last one is the kernel's preferred one, as for /dev/console.
setup_console() {
    CONSOLE=/dev/console
    if cmdline_has console=hvc0; then
        if wait_for_path /dev/hvc0; then
            use_console /dev/hvc0
            return 0
        fi
        fact "console-missing hvc0"
    fi
    active=$(cat /sys/class/tty/console/active 2>/dev/null)
    active=${active##* }
    if [ -n "$active" ] && [ -c "/dev/$active" ]; then
        use_console "/dev/$active"
    fi
}

report_module_failures() {
    for name in $FAILED_MODULES; do
        fact "modprobe-failed $name"
    done
}

report_smbios11() {
    for raw in /sys/firmware/dmi/entries/11-*/raw; do
        [ -e "$raw" ] || continue
        entry=${raw%/raw}
        fact "smbios11 ${entry##*/} $(hexdump -v -e '/1 "%02x"' "$raw")"
    done
}

report_block() {
    for dev in /sys/block/vd*; do
        [ -e "$dev" ] || continue
        serial=$(cat "$dev/serial" 2>/dev/null)
        fact "block ${dev##*/} size=$(cat "$dev/size") serial=$serial ro=$(cat "$dev/ro")"
    done
}

report_net() {
    for net in /sys/class/net/*; do
        [ -e "$net" ] || continue
        [ "${net##*/}" = lo ] && continue
        fact "net ${net##*/} $(cat "$net/address")"
    done
}

report_tpm() {
    tpms=""
    for tpm in /dev/tpm*; do
        [ -e "$tpm" ] && tpms="$tpms $tpm"
    done
    if [ -n "$tpms" ]; then fact "tpm ${tpms# }"; else fact "tpm none"; fi
}

report_efi() {
    if [ -d /sys/firmware/efi ]; then fact "efi yes"; else fact "efi no"; fi
}

# PCR 0 of the SHA-256 bank, as the kernel exposes it (only with a TPM 2.0).
report_pcrs() {
    pcr=/sys/class/tpm/tpm0/pcr-sha256/0
    if [ -r "$pcr" ]; then fact "pcr-sha256-0 $(cat "$pcr")"; fi
}

# Mount options of the mount at $1, from /proc/mounts.
mount_options() {
    awk -v where="$1" '$2 == where { opts = $4 } END { print opts }' /proc/mounts
}

# Try to create (and remove) a file below $1; report whether it worked.
report_write() {
    if (echo vmspawnd >"$1/.vmspawnd-write-test") 2>/dev/null; then
        rm -f "$1/.vmspawnd-write-test"
        fact "write $1 ok"
    else
        fact "write $1 failed"
    fi
}

# root=TAG rootfstype=virtiofs: mount the share at /mnt/root (this guest keeps its
# initramfs as /) and report its listing and marker file, if any.
mount_virtiofs_root() {
    [ "$(cmdline_value rootfstype)" = virtiofs ] || return 0
    tag=$(cmdline_value root)
    mkdir -p /mnt/root
    if mount -t virtiofs "$tag" /mnt/root 2>/dev/null; then
        fact "root-mount $tag /mnt/root $(mount_options /mnt/root)"
        fact "root-listing $(ls -A /mnt/root | tr '\n' ' ')"
        [ -r /mnt/root/marker ] && fact "root-marker $(cat /mnt/root/marker)"
        report_write /mnt/root
    else
        fact "root-mount-failed $tag"
    fi
}

# Each systemd.mount-extra="TAG:WHERE:TYPE:OPTIONS" word (as systemd-vmspawn writes it,
# with " and : in WHERE escaped as \x22 and \x3a): mount it and report what we got.
mount_extras() {
    set -f
    for word in $CMDLINE; do
        case "$word" in
            systemd.mount-extra=*) ;;
            *) continue ;;
        esac
        spec=${word#systemd.mount-extra=}
        spec=${spec#\"}
        spec=${spec%\"}
        tag=${spec%%:*}
        rest=${spec#*:}
        where=${rest%%:*}
        rest=${rest#*:}
        fstype=${rest%%:*}
        options=${rest#*:}
        where=$(echo "$where" | sed 's/\\x3a/:/g; s/\\x22/"/g')
        mkdir -p "$where"
        if mount -t "$fstype" -o "$options" "$tag" "$where" 2>/dev/null; then
            fact "mount $tag $where $(mount_options "$where")"
            report_write "$where"
        else
            fact "mount-failed $tag $where"
        fi
    done
    set +f
}

print_facts() {
    fact "cmdline $CMDLINE"
    fact "memtotal-kb $(awk '/^MemTotal:/ { print $2 }' /proc/meminfo)"
    fact "nproc $(grep -c '^processor' /proc/cpuinfo)"
    report_smbios11
    report_block
    report_net
    report_tpm
    report_pcrs
    fact "uuid $(cat /sys/class/dmi/id/product_uuid 2>/dev/null)"
    report_efi
    mount_virtiofs_root
    mount_extras
    fact "facts-done"
}

# PID 1 must never exit (that panics the kernel), so park if poweroff fails.
power_off() {
    poweroff -f
    fact "poweroff-failed"
    while :; do sleep 3600; done
}

# busybox acpid maps the ACPI power button (KEY_POWER) to the action key
# "PWRF"; our action file points that at a script that reports the event
# on the console and powers off, like a real OS honouring the button.
configure_acpid() {
    mkdir -p /etc/acpi
    cat >/etc/acpi/power-button <<EOF
#!/bin/sh
echo "$TAG acpi-powerdown" >$CONSOLE 2>&1
poweroff -f
EOF
    chmod 0755 /etc/acpi/power-button
    echo "PWRF power-button" >/etc/acpid.conf
}

# acpid opens /dev/input/event0.. once at start and dies without any, so
# wait for the power button's input device before starting it.
start_acpid() {
    configure_acpid
    wait_for_path /dev/input/event0
    acpid -c /etc/acpi -a /etc/acpid.conf -l /var/log/acpid.log \
        -p /var/run/acpid.pid
    # The pid file is written once acpid has opened the input devices.
    if wait_until test -s /var/run/acpid.pid &&
        kill -0 "$(cat /var/run/acpid.pid)" 2>/dev/null; then
        fact "acpid-running"
    else
        fact "acpid-failed"
    fi
}

# An interactive shell on the console for tests to type into; restarted
# whenever it exits so the guest stays usable.  When a session leader
# exits the kernel hangs up its (non-pty) tty, killing our descriptors
# too, hence the reopen on every round.  With the tty's echo off, busybox
# sh skips line editing (no "ESC[6n" cursor queries, no redraws), so the
# console carries only the prompt and command output.
shell_loop() {
    PS1='guest# '
    HOME=/
    export PS1 HOME
    while :; do
        use_console "$CONSOLE"
        stty -echo 2>/dev/null
        if [ "$CONSOLE" = /dev/console ]; then
            cttyhack sh -i
        else
            setsid -c sh -i
        fi
        usleep 200000
    done
}

# One colour as a file of at least $2 bytes: the 32-bit pixel $1 (octal escapes,
# B G R X as the framebuffer stores it), doubled until it is big enough.
colour_file() {
    printf "$1" >/tmp/colour
    while [ "$(wc -c </tmp/colour)" -lt "$2" ]; do
        cat /tmp/colour /tmp/colour >/tmp/colour.2
        mv /tmp/colour.2 /tmp/colour
    done
    mv /tmp/colour "/tmp/colour.$3"
}

# The picture tests look for on the display: four full-width bands, top to
# bottom red, green, blue, white.  fbcon is unbound first so no text or
# cursor is drawn over it.
draw_fb_pattern() {
    if ! wait_for_path /dev/fb0; then
        fact "fb-missing"
        return 1
    fi
    for vtcon in /sys/class/vtconsole/vtcon*; do
        echo 0 >"$vtcon/bind" 2>/dev/null
    done
    IFS=, read -r width height </sys/class/graphics/fb0/virtual_size
    stride=$(cat /sys/class/graphics/fb0/stride)
    band=$((stride * (height / 4)))
    colour_file '\000\000\377\000' "$band" red
    colour_file '\000\377\000\000' "$band" green
    colour_file '\377\000\000\000' "$band" blue
    colour_file '\377\377\377\000' "$band" white
    # One write per band: the virtio-gpu fbdev of this kernel flushes small,
    # line-straddling writes only in part.
    for colour in red green blue white; do
        dd if="/tmp/colour.$colour" bs="$band" count=1 2>/dev/null
    done >/dev/fb0
    fact "fb-pattern ${width}x${height} stride $stride"
}

main() {
    mount_basics
    quiet_kernel_console
    load_modules
    CMDLINE=$(cat /proc/cmdline)
    setup_console
    report_module_failures
    print_facts
    mode=$(cmdline_value vmspawnd_test.mode)
    case "${mode:-poweroff}" in
        poweroff)
            fact "powering-off"
            power_off
            ;;
        wait)
            start_acpid
            shell_loop
            ;;
        fbpattern)
            draw_fb_pattern
            start_acpid
            shell_loop
            ;;
        ignore-acpi)
            fact "ignoring-acpi"
            shell_loop
            ;;
        *)
            fact "unknown-mode $mode"
            fact "powering-off"
            power_off
            ;;
    esac
}

main
