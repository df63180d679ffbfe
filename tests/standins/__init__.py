# SPDX-License-Identifier: LGPL-2.1-or-later
"""Stand-ins for systemd services, used only by tests: a private dbus-daemon with
machine1/systemd1 services and an io.systemd.Machine Varlink server."""
