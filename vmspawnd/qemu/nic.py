# SPDX-License-Identifier: LGPL-2.1-or-later
"""The VM's network card, on a PCIe root port of its own so that it can be unplugged and
plugged again while the guest runs.

systemd-vmspawn 259 passes `-nic …,model=virtio-net-pci`: QEMU puts that card on the root
bus, where it can never be removed. A snapshot must not carry the card (its MAC comes back
from the migration stream: a clone could never have a MAC of its own), so vmspawnd builds
the card as vmspawn 261+ does, from a netdev and a device on a `pcie-root-port`
(docs/deviations.md): a snapshot unplugs it from the source before saving and plugs it back
after, and every clone plugs its own, with its own MAC, after `cont`. Unplugging needs the
guest's cooperation (ACPI hotplug on q35: the guest ejects the card, QEMU then reports
DEVICE_DELETED, ~0.1 s for the test guest); plugging does not.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from vmspawnd.control import next_event
from vmspawnd.qemu.qmp import QmpError

if TYPE_CHECKING:
    from vmspawnd.control import SubscribeQmp
    from vmspawnd.qemu.monitor import QemuMonitor

NETDEV_ID = "vmspawn-net"
DEVICE_ID = "vmspawn-nic"
PORT_ID = "vmspawn-nic-port"
DRIVER = "virtio-net-pci"
UNPLUG_TIMEOUT = 10.0  # s: the guest handles an ACPI eject in well under one


class UnplugRefused(Exception):
    """The guest did not release its network card (no hotplug support, or it is busy)."""


def port_options() -> str:
    """The `-device` value of the card's root port (one port: chassis 1 is unique)."""
    return f"pcie-root-port,id={PORT_ID},chassis=1"


def device_properties(mac: str | None) -> dict[str, str]:
    """The card as `device_add` arguments; `mac` None leaves QEMU's default (user-mode
    networking, as vmspawn)."""
    props = {"driver": DRIVER, "netdev": NETDEV_ID, "id": DEVICE_ID, "bus": PORT_ID}
    if mac is not None:
        props["mac"] = mac
    return props


def device_options(mac: str | None) -> str:
    """The card as a `-device` value (the same properties as device_properties)."""
    props = device_properties(mac)
    return ",".join([props.pop("driver"), *(f"{key}={value}" for key, value in props.items())])


def is_device_options(value: str) -> bool:
    """Whether a `-device` value is the card device_options built."""
    return value.startswith(DRIVER + ",") and f"id={DEVICE_ID}" in value.split(",")


def mac_of(options: str) -> str | None:
    """The `mac=` of a card's `-device` value; None for QEMU's default."""
    return next((part[len("mac=") :] for part in options.split(",") if part.startswith("mac=")), None)


async def unplug(monitor: QemuMonitor, subscribe: SubscribeQmp, timeout: float = UNPLUG_TIMEOUT) -> str:
    """Remove the card from the running guest; its MAC, to plug it back with (plug).

    UnplugRefused when the VM has no such card (started by a vmspawnd before 2026-12, with
    `-nic`) or the guest does not eject it within `timeout` s. A request the guest has not
    answered stays pending in QEMU: the card may still go later.
    """
    try:
        mac = await monitor.execute("qom-get", {"path": f"/machine/peripheral/{DEVICE_ID}", "property": "mac"})
    except QmpError as exc:
        raise UnplugRefused(f"the network card cannot be unplugged (QEMU: {exc}); restart the VM to get one that can") from exc
    with subscribe() as queue:
        await monitor.execute("device_del", {"id": DEVICE_ID})
        try:
            async with asyncio.timeout(timeout):
                deleted = await next_event(queue, "DEVICE_DELETED", lambda data: data.get("device") == DEVICE_ID)
        except TimeoutError:
            raise UnplugRefused(
                f"the guest did not release its network card within {timeout:g}s (it must handle PCIe/ACPI hot-unplug)"
            ) from None
    if deleted is None:
        raise UnplugRefused("QEMU went away while the guest released its network card")
    return str(mac)


async def plug(monitor: QemuMonitor, mac: str | None) -> None:
    """Add the card (back) on its root port; the guest sees it as a hot-plugged device."""
    await monitor.execute("device_add", device_properties(mac))
