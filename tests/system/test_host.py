# SPDX-License-Identifier: LGPL-2.1-or-later
"""The user instance under `systemd --user`, and host shutdown with VMs running.

A real user with lingering runs `systemctl --user enable --now vmspawnd.socket`; their VM
runs in a scope of their own manager. Then the container is powered off with two VMs
running: vmspawnd-guests.service must power both off through ACPI before the daemon stops
(each guest's console shows the power button). Host shutdown ends the container, so it is
this module's last test.
"""

from __future__ import annotations

import contextlib
import os

import pytest

from tests.system.container import Container
from tests.system.deploy import Installation
from tests.system.vms import Remote, start_vm, vm_processes, wait_booted

pytestmark = [pytest.mark.system, pytest.mark.vm]

USER = "vmuser"


@pytest.fixture(scope="module")
def remote(system_container: Container, vmspawnd_installed: Installation) -> Remote:
    return Remote(system_container)


def test_user_instance(system_container: Container, vmspawnd_installed: Installation) -> None:
    c, inst = system_container, vmspawnd_installed
    c.run(["useradd", "--create-home", "--shell", "/bin/bash", USER])
    uid = int(c.run(["id", "-u", USER]).stdout)
    # As an administrator's command (a unit): logind answers a caller outside every unit of
    # the container (nsenter's) with EUNATCH.
    c.unit_run(["loginctl", "enable-linger", USER])
    c.run(["systemctl", "start", f"user@{uid}.service"], timeout=120)  # lingering starts it; wait for it
    env = {"XDG_RUNTIME_DIR": f"/run/user/{uid}", "DBUS_SESSION_BUS_ADDRESS": f"unix:path=/run/user/{uid}/bus"}
    c.run(["systemctl", "--user", "enable", "--now", "vmspawnd.socket"], user=USER, env=env)
    assert c.run(["systemctl", "--user", "is-active", "vmspawnd.socket"], user=USER, env=env).stdout.strip() == "active"

    cursor = c.cursor()
    machine = start_vm(c, inst, "uvm", "--tpm=yes", user=USER, env=env)
    assert machine["uid"] == uid and machine["state"] in ("running", "ready"), machine
    assert str(machine["runtimeDirectory"]).startswith(f"/run/user/{uid}/vmspawnd/"), machine
    # Every process in the VM's scope, in the user's manager (their slice), running as the user.
    for pid, info in vm_processes(c, machine).items():
        cgroup = str(info["cgroup"])
        assert f"/user-{uid}.slice/user@{uid}.service/" in cgroup and cgroup.endswith("/uvm.scope"), (pid, info)
        assert int(c.run(["stat", "-c", "%u", f"/proc/{pid}"]).stdout) == uid
    assert machine["unit"] == "uvm.scope"
    # Registration as vmspawn does for an unprivileged user: with the user's own machined
    # where there is one (systemd 258+), else none (systemd 257's machined takes only root).
    user_machined = c.run(["test", "-S", f"/run/user/{uid}/systemd/machine/io.systemd.Machine"], check=False).returncode == 0
    assert machine["registered"] is user_machined, machine
    cursor = c.cursor()
    ended = c.run(["vmspawnctl", "terminate", "uvm"], user=USER, env=env, timeout=120, check=False)
    assert ended.returncode == 0, f"{ended}\n{c.journal(since_cursor=cursor)}"
    c.run(["vmspawnctl", "remove", "uvm"], user=USER, env=env)


def test_host_shutdown_powers_the_guests_off_through_acpi(
    system_container: Container, vmspawnd_installed: Installation, remote: Remote
) -> None:
    c, inst = system_container, vmspawnd_installed
    machines = [start_vm(c, inst, name) for name in ("guest1", "guest2")]
    for machine in machines:
        wait_booted(remote, machine)
    with contextlib.ExitStack() as stack:
        # Open now: the logs are on the container's /run, which goes with it; an open file
        # stays readable.
        logs = [stack.enter_context(open(c.path(str(m["consoleLog"])), "rb")) for m in machines]
        c.poweroff()  # systemctl poweroff inside, and waits for the container to end
        for machine, log in zip(machines, logs, strict=True):
            log.seek(0, os.SEEK_SET)
            text = log.read()
            assert b"VMSPAWND-TEST: acpi-powerdown" in text, f"{machine['name']} saw no power button:\n{text[-2000:]!r}"
