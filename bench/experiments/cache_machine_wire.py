# SPDX-License-Identifier: LGPL-2.1-or-later
"""Bench-only experiment: cache_type_hints.py plus machine_to_wire() memoised on the record's
JSON (a record changes only on state changes, so List rebuilds nothing for idle VMs).

`bench/bench.py --daemon-patch=bench/experiments/cache_machine_wire.py --only=scale ...`.
"""

import json
import pathlib
import runpy

from vmspawnd import api

runpy.run_path(str(pathlib.Path(__file__).with_name("cache_type_hints.py")))

_memo: dict[str, object] = {}


def machine_to_wire(record: object) -> object:
    data = record.to_json()  # type: ignore[attr-defined]
    key = json.dumps(data, sort_keys=True, default=str)
    wire = _memo.get(key)
    if wire is None:
        if len(_memo) > 4096:
            _memo.clear()
        wire = _memo[key] = api.to_wire(api.MachineWire, data)
    return wire


api.machine_to_wire = machine_to_wire
