# SPDX-License-Identifier: LGPL-2.1-or-later
"""vmspawnctl: the thin command-line client of vmspawnd."""
