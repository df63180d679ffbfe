# SPDX-License-Identifier: LGPL-2.1-or-later
"""The wire: the only package that imports asyncvarlink. The hardened server, the
io.vmspawnd.Manager interface and each VM's io.systemd.MachineInstance socket."""
