# SPDX-License-Identifier: LGPL-2.1-or-later
"""vmspawnd.host.unit_properties: `--property=` assignments encoded as systemd encodes them
for StartTransientUnit."""

from __future__ import annotations

import pytest

from vmspawnd.host import unit_properties


@pytest.mark.parametrize(
    ("assignment", "expected"),
    [
        ("Description=My VM", ("Description", "s", "My VM")),
        ("CPUQuota=20%", ("CPUQuotaPerSecUSec", "t", 200_000)),
        ("CPUQuota=150%", ("CPUQuotaPerSecUSec", "t", 1_500_000)),
        ("CPUQuota=", ("CPUQuotaPerSecUSec", "t", 2**64 - 1)),
        ("MemoryMax=512M", ("MemoryMax", "t", 512 * 1024**2)),
        ("MemoryMax=infinity", ("MemoryMax", "t", 2**64 - 1)),
        ("MemoryHigh=50%", ("MemoryHighScale", "u", 2**31)),
        ("TasksMax=100", ("TasksMax", "t", 100)),
        ("TasksMax=100%", ("TasksMaxScale", "u", 2**32 - 1)),
        ("CPUWeight=200", ("CPUWeight", "t", 200)),
        ("CPUWeight=idle", ("CPUWeight", "t", 0)),
        ("IOWeight=10000", ("IOWeight", "t", 10000)),
        ("DeviceAllow=/dev/kvm rw", ("DeviceAllow", "a(ss)", [["/dev/kvm", "rw"]])),
        ("DeviceAllow=/dev/net/tun", ("DeviceAllow", "a(ss)", [["/dev/net/tun", ""]])),
        ("DeviceAllow=", ("DeviceAllow", "a(ss)", [])),
        ("DevicePolicy=closed", ("DevicePolicy", "s", "closed")),
        ("ManagedOOMMemoryPressure=kill", ("ManagedOOMMemoryPressure", "s", "kill")),
        ("AllowedCPUs=0-2 9", ("AllowedCPUs", "ay", bytes([0b111, 0b10]))),
        ("AllowedMemoryNodes=0", ("AllowedMemoryNodes", "ay", b"\x01")),
        ("AllowedCPUs=", ("AllowedCPUs", "ay", b"")),
        ("MemoryLow=1K", ("MemoryLow", "t", 1024)),
        ("MemoryMin=10%", ("MemoryMinScale", "u", 429496730)),
        ("MemorySwapMax=infinity", ("MemorySwapMax", "t", 2**64 - 1)),
        ("StartupCPUWeight=5", ("StartupCPUWeight", "t", 5)),
        ("StartupIOWeight=7", ("StartupIOWeight", "t", 7)),
    ],
)
def test_convert_unit_property(assignment: str, expected: tuple[str, str, object]) -> None:
    name, value = unit_properties.convert_unit_property(assignment)
    assert (name, value.signature, value.value) == expected


@pytest.mark.parametrize(
    "assignment",
    [
        "CPUQuota=20",
        "CPUQuota=0%",
        "CPUWeight=0",
        "IOWeight=10001",
        "TasksMax=0",
        "MemoryMax=1x",
        "DeviceAllow=/dev/kvm rx",
        "KillMode=mixed",
        "NoEquals",
        "MemoryMax=101%",
        "DevicePolicy=open",
        "AllowedCPUs=3-1",
        "AllowedCPUs=a",
    ],
)
def test_convert_unit_property_refuses(assignment: str) -> None:
    with pytest.raises(ValueError):
        unit_properties.convert_unit_property(assignment)


def test_every_property_the_spec_accepts_is_converted() -> None:
    """--property names vmspawnctl lets through must not fail later at the scope step."""
    from vmspawnd.spec import SCOPE_PROPERTIES

    assert set(SCOPE_PROPERTIES) <= set(unit_properties.SUPPORTED_PROPERTIES)
