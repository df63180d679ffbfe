# SPDX-License-Identifier: LGPL-2.1-or-later
"""vmspawnd: systemd-vmspawn as a long-running supervisor daemon with a Varlink API."""

import sys
import typing

__version__ = "0.1.0"

# `@override` on every method that overrides one of a base class (PEP 698). typing.override
# is new in 3.12 and we support 3.11, where typing_extensions has it but is no dependency of
# ours: there type checkers read typing_extensions' (their stubs carry it) and at run time
# the decorator does nothing. Here, not in a module of its own, because the CLI may import
# the package's top level and little else (tests/unit/test_layers.py).
if sys.version_info >= (3, 12):
    from typing import override
elif typing.TYPE_CHECKING:
    from typing_extensions import override
else:
    _F = typing.TypeVar("_F")

    def override(method: _F, /) -> _F:
        return method


__all__ = ["__version__", "override"]
