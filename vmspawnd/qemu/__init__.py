# SPDX-License-Identifier: LGPL-2.1-or-later
"""One QEMU and the channels to it: its argv (pure), what it runs on (resolve, firmware paths,
vsock), and the live connections the daemon keeps to it (QMP, console, guest notify)."""
