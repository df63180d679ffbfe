# SPDX-License-Identifier: LGPL-2.1-or-later
"""`--property=NAME=VALUE` → one `(sv)` of StartTransientUnit, for the supported subset.

Pure: each assignment is encoded as systemd's bus_append_unit_property_assignment()
encodes it (the D-Bus name, e.g. `CPUQuota=` → `CPUQuotaPerSecUSec`, and the exact
signature), so a value PID 1 would refuse fails here with a message naming the property.
"""

from __future__ import annotations

from dbus_fast import Variant

from vmspawnd.spec.parsers import parse_size

USEC_PER_SEC = 1_000_000
UINT64_MAX = 2**64 - 1
UINT32_MAX = 2**32 - 1


def _parse_percent(value: str) -> float | None:
    if value.endswith("%"):
        number = float(value[:-1])
        if not 0 <= number <= 100:
            raise ValueError(f"percentage out of range: {value!r}")
        return number
    return None


def _scale(percent: float) -> int:
    """systemd's UINT32_SCALE_FROM_PERMYRIAD for the *Scale properties."""
    permyriad = round(percent * 100)
    return (permyriad * UINT32_MAX + 5000) // 10000


def _limit(name: str, value: str, with_scale: bool = True) -> tuple[str, Variant]:
    """MemoryMax=/MemoryHigh=/TasksMax=: bytes or count, `infinity`, or a percentage."""
    if value in ("", "infinity"):
        return name, Variant("t", UINT64_MAX)
    percent = _parse_percent(value)
    if percent is not None:
        if not with_scale:
            raise ValueError(f"{name}= does not take a percentage")
        return f"{name}Scale", Variant("u", _scale(percent))
    if name == "TasksMax":
        if not value.isdigit() or int(value) == 0:
            raise ValueError(f"invalid TasksMax= value {value!r}")
        return name, Variant("t", int(value))
    return name, Variant("t", parse_size(value))


def _weight(name: str, value: str) -> tuple[str, Variant]:
    if value == "":
        return name, Variant("t", UINT64_MAX)
    if name in ("CPUWeight", "StartupCPUWeight") and value == "idle":
        return name, Variant("t", 0)
    if not value.isdigit() or not 1 <= int(value) <= 10000:
        raise ValueError(f"{name}= must be an integer 1…10000, got {value!r}")
    return name, Variant("t", int(value))


def _cpu_set_bytes(name: str, value: str) -> bytes:
    """AllowedCPUs=/AllowedMemoryNodes= "0-3 5,7" → systemd's cpu_set_to_dbus() bitmap."""
    bits: set[int] = set()
    for item in value.replace(",", " ").split():
        low, sep, high = item.partition("-")
        if not low.isdigit() or (sep and not high.isdigit()):
            raise ValueError(f"invalid {name}= range {item!r}")
        first, last = int(low), int(high) if sep else int(low)
        if last < first or last >= 8192:
            raise ValueError(f"invalid {name}= range {item!r}")
        bits.update(range(first, last + 1))
    out = bytearray((max(bits) // 8 + 1) if bits else 0)
    for bit in bits:
        out[bit // 8] |= 1 << (bit % 8)
    return bytes(out)


_LIMITS = ("MemoryMax", "MemoryHigh", "MemoryLow", "MemoryMin", "MemorySwapMax", "TasksMax")
_WEIGHTS = ("CPUWeight", "StartupCPUWeight", "IOWeight", "StartupIOWeight")
_CHOICES = {"DevicePolicy": ("auto", "closed", "strict"), "ManagedOOMMemoryPressure": ("auto", "kill")}
SUPPORTED_PROPERTIES = (
    "AllowedCPUs",
    "AllowedMemoryNodes",
    "CPUQuota",
    *_WEIGHTS,
    "DeviceAllow",
    *_CHOICES,
    *_LIMITS,
    "Description",
)


def convert_unit_property(assignment: str) -> tuple[str, Variant]:
    """`--property=NAME=VALUE` → one `(sv)` of StartTransientUnit, as systemd's
    bus_append_unit_property_assignment() encodes it, for the supported subset."""
    name, sep, value = assignment.partition("=")
    if not sep:
        raise ValueError(f"not an assignment: {assignment!r}")
    if name == "Description":
        return name, Variant("s", value)
    if name == "CPUQuota":
        if value in ("", "infinity"):
            return "CPUQuotaPerSecUSec", Variant("t", UINT64_MAX)
        if not value.endswith("%"):
            raise ValueError(f"CPUQuota= must be a percentage, got {value!r}")
        percent = float(value[:-1])
        if percent <= 0:
            raise ValueError(f"CPUQuota= must be positive, got {value!r}")
        return "CPUQuotaPerSecUSec", Variant("t", round(percent * USEC_PER_SEC / 100))
    if name in _LIMITS:
        return _limit(name, value)
    if name in _WEIGHTS:
        return _weight(name, value)
    if name in _CHOICES:
        if value not in _CHOICES[name]:
            raise ValueError(f"{name}= must be one of {', '.join(_CHOICES[name])}, got {value!r}")
        return name, Variant("s", value)
    if name in ("AllowedCPUs", "AllowedMemoryNodes"):
        return name, Variant("ay", _cpu_set_bytes(name, value))
    if name == "DeviceAllow":
        if value == "":
            return name, Variant("a(ss)", [])
        path, _, rwm = value.partition(" ")
        rwm = rwm.strip()
        if rwm and not set(rwm) <= set("rwm"):
            raise ValueError(f"DeviceAllow= access must be of r, w, m, got {rwm!r}")
        return name, Variant("a(ss)", [[path, rwm]])
    raise ValueError(f"unsupported unit property {name!r} (supported: {', '.join(SUPPORTED_PROPERTIES)})")
