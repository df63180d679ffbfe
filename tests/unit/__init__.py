# SPDX-License-Identifier: LGPL-2.1-or-later
"""Unit tests for vmspawnd's pure building blocks (no VMs, no daemon, no network)."""
