# SPDX-License-Identifier: LGPL-2.1-or-later
"""vmspawnd: systemd-vmspawn as a long-running supervisor daemon with a Varlink API."""

__version__ = "0.1.0"
