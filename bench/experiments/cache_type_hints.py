# SPDX-License-Identifier: LGPL-2.1-or-later
"""Bench-only experiment: vmspawnd with api.to_wire's typing.get_type_hints() cached per class.

Not a fix in place (bench/ does not edit vmspawnd/); it measures the suggested change:
`bench/bench.py --daemon-patch=bench/experiments/cache_type_hints.py --only=scale ...`.
"""

import dataclasses
import functools
import typing

from vmspawnd import api

_hints = functools.cache(typing.get_type_hints)


def to_wire(wire_cls: type, data: typing.Mapping[str, object] | None) -> object:
    if data is None:
        return None
    hints = _hints(wire_cls)
    return wire_cls(**{f.name: api._convert(hints[f.name], data.get(f.name)) for f in dataclasses.fields(wire_cls)})


api.to_wire = to_wire
