# SPDX-License-Identifier: LGPL-2.1-or-later
"""The host's process table and service manager: child processes and the per-VM reaper, cgroups,
systemd-machined registration and the VM's scope, sd_notify."""
