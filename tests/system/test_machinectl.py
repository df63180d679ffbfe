# SPDX-License-Identifier: LGPL-2.1-or-later
"""machinectl and systemctl on vmspawnd's VMs where systemd is PID 1 (trixie: systemd 257,
machinectl signals the leader; forky: systemd 262, machinectl calls the VM's
io.systemd.MachineInstance). Each verb's effect is checked from the guest's side (its
console) and in the daemon's record; every VM process lives in the VM's own unit.

The tests of a module share one container per suite and run in order.
"""

from __future__ import annotations

import signal

import pytest

from tests.system.container import Container
from tests.system.deploy import Installation
from tests.system.vms import (
    SOCKET,
    Remote,
    ends,
    log_size,
    processes,
    start_vm,
    vm_processes,
    wait_booted,
    wait_in_log,
)

pytestmark = [pytest.mark.system, pytest.mark.vm]

RTMIN4 = int(signal.SIGRTMIN) + 4
LEFT_OVER = "left-over process"


def machinectl(c: Container, *args: str) -> str:
    return c.run(["machinectl", *args], timeout=120).stdout


def machine_property(c: Container, name: str, prop: str) -> str:
    return c.run(["machinectl", "show", name, "-P", prop], timeout=60).stdout.strip()


def main_pid(c: Container, unit: str) -> int:
    return int(c.run(["systemctl", "show", "-P", "MainPID", unit]).stdout)


def unit_of(cgroup: str) -> str:
    return cgroup.rstrip("/").rsplit("/", 1)[-1]


@pytest.fixture(scope="module")
def remote(system_container: Container, vmspawnd_installed: Installation) -> Remote:
    return Remote(system_container)


def test_list_and_status_show_a_registered_vm(
    system_container: Container, vmspawnd_installed: Installation, remote: Remote
) -> None:
    c = system_container
    machine = start_vm(c, vmspawnd_installed, "listed")
    rows = [line.split() for line in machinectl(c, "list", "--no-legend").splitlines()]
    assert ["listed", "vm"] in [row[:2] for row in rows], rows
    status = machinectl(c, "status", "listed")
    assert "listed.scope" in status, status
    assert machine_property(c, "listed", "Class") == "vm"
    assert machine_property(c, "listed", "Service") == "vmspawnd"
    # The leader machined signals is the reaper, QEMU's parent, in the VM's scope.
    assert int(machine_property(c, "listed", "Leader")) == machine["reaper"]["pid"]
    assert machine_property(c, "listed", "Unit") == "listed.scope" == machine["unit"]
    assert machine["registered"] is True
    remote.call("Terminate", {"name": "listed"})
    remote.call("Remove", {"name": "listed"})


def test_every_process_of_a_vm_is_in_its_scope(
    system_container: Container, vmspawnd_installed: Installation, remote: Remote
) -> None:
    """Registered or not, with swtpm and virtiofsd (root and a bind): all in NAME.scope, none
    in vmspawnd.service; killing or restarting the service leaves the VMs running, and PID 1
    finds no left-over process."""
    c, inst = system_container, vmspawnd_installed
    c.run("mkdir -p /srv/vmroot /srv/share")
    cursor = c.cursor()
    census = {
        "census": start_vm(c, inst, "census", "--tpm=yes", "--directory=/srv/vmroot", "--bind=/srv/share:/mnt/share"),
        "census-unreg": start_vm(c, inst, "census-unreg", "--tpm=yes", "--register=no", "--bind=/srv/share:/mnt/share"),
    }
    for name, machine in census.items():
        found = vm_processes(c, machine)
        comms = sorted(str(p["comm"]) for p in found.values())
        assert "vmspawnd-reaper" in comms and "swtpm" in comms and any(x.startswith("qemu-system") for x in comms), comms
        assert sum(1 for x in comms if x.startswith("virtiofsd")) >= (3 if name == "census" else 2), (
            comms
        )  # with sandbox children
        wrong = {pid: p for pid, p in found.items() if unit_of(str(p["cgroup"])) != f"{name}.scope"}
        assert not wrong, f"{name}: processes outside {name}.scope: {wrong}"
        assert c.run(["systemctl", "is-active", f"{name}.scope"]).stdout.strip() == "active"
    daemon = main_pid(c, "vmspawnd.service")
    in_service = [pid for pid, p in processes(c).items() if unit_of(str(p["cgroup"])) == "vmspawnd.service"]
    assert in_service == [daemon], in_service

    qemus = {name: m["qemu"]["pid"] for name, m in census.items()}
    c.run(["systemctl", "kill", "vmspawnd.service"])  # SIGTERM to all of the service: the daemon
    c.run(["systemctl", "restart", "vmspawnd.service"])
    for name, pid in qemus.items():
        # The next call activates the socket; the new daemon adopted the same QEMUs.
        adopted = remote.describe(name)
        assert adopted["state"] in ("running", "ready") and adopted["qemu"]["pid"] == pid, adopted
    journal = c.journal(since_cursor=cursor)
    assert LEFT_OVER not in journal, [line for line in journal.splitlines() if LEFT_OVER in line]
    for name in census:
        remote.call("Terminate", {"name": name})
        assert c.run(["systemctl", "is-active", f"{name}.scope"], check=False).stdout.strip() != "active"
        remote.call("Remove", {"name": name})


def test_poweroff_presses_the_acpi_button(system_container: Container, vmspawnd_installed: Installation, remote: Remote) -> None:
    c = system_container
    machine = start_vm(c, vmspawnd_installed, "poff")
    wait_booted(remote, machine)
    offset = log_size(remote, machine)
    with ends(remote, "poff") as result:
        machinectl(c, "poweroff", "poff")
    wait_in_log(remote, machine, offset, b"VMSPAWND-TEST: acpi-powerdown")  # the guest saw the button
    final = result["machine"]
    assert (final["state"], final["reason"]) == ("stopped", "powered off on request"), final
    assert final["exitCode"] == 0
    assert "poff" not in machinectl(c, "list", "--no-legend")
    remote.call("Remove", {"name": "poff"})


def test_reboot_resets_and_the_vm_runs_on(system_container: Container, vmspawnd_installed: Installation, remote: Remote) -> None:
    c = system_container
    machine = start_vm(c, vmspawnd_installed, "rbt")
    wait_booted(remote, machine)
    offset = log_size(remote, machine)
    with remote.events("rbt") as events:
        machinectl(c, "reboot", "rbt")
        events.wait_event("rbt", "RESET")
    wait_in_log(remote, machine, offset, b"VMSPAWND-TEST: acpid-running")  # booted again
    after = remote.describe("rbt")
    assert after["state"] in ("running", "ready") and after["qemu"] == machine["qemu"], after
    remote.call("Terminate", {"name": "rbt"})
    remote.call("Remove", {"name": "rbt"})


def test_terminate_stops_it_and_every_process_is_gone(
    system_container: Container, vmspawnd_installed: Installation, remote: Remote
) -> None:
    c = system_container
    machine = start_vm(c, vmspawnd_installed, "term", "--tpm=yes")
    pids = set(vm_processes(c, machine))
    with ends(remote, "term") as result:
        machinectl(c, "terminate", "term")
    final = result["machine"]
    assert final["state"] == "stopped" and final["reason"] == "terminated on request", final
    assert not pids & set(processes(c)), "processes of the terminated VM are left"
    assert c.run(["systemctl", "is-active", "term.scope"], check=False).stdout.strip() != "active"
    remote.call("Remove", {"name": "term"})


@pytest.mark.parametrize(
    ("whom", "sig", "reason"),
    [
        ("all", "SIGTERM", "QEMU terminated on SIGTERM from pid 1 ("),  # PID 1's KillUnit
        ("all", "SIGKILL", "QEMU was killed by SIGKILL"),
        # The leader passes what is not power-off/reboot on to QEMU, naming who sent it.
        ("leader", "SIGTERM", "QEMU terminated on SIGTERM from pid "),
    ],
)
def test_kill_sends_that_signal_and_the_end_names_it(
    system_container: Container, vmspawnd_installed: Installation, remote: Remote, whom: str, sig: str, reason: str
) -> None:
    c = system_container
    name = f"kill-{whom}-{sig.lower()}"
    start_vm(c, vmspawnd_installed, name)
    with ends(remote, name) as result:
        machinectl(c, "kill", f"--kill-whom={whom}", f"--signal={sig}", name)
    final = result["machine"]
    assert str(final["reason"]).startswith(reason), final
    if whom == "leader":  # machined sent it to the leader, which passed it on
        assert f"from pid {final['reaper']['pid']} " not in str(final["reason"]), final
    remote.call("Remove", {"name": name})


@pytest.mark.parametrize(
    ("signo", "state", "reason"),
    [
        (RTMIN4, "failed", "QEMU was killed by SIGRTMIN+4"),
        (signal.SIGTERM, "stopped", "QEMU terminated on SIGTERM from pid"),
        (signal.SIGKILL, "failed", "QEMU was killed by SIGKILL"),
    ],
)
def test_qemu_killed_ends_with_the_right_reason_within_5s(
    system_container: Container, vmspawnd_installed: Installation, remote: Remote, signo: int, state: str, reason: str
) -> None:
    c = system_container
    name = f"sig{signo}"
    machine = start_vm(c, vmspawnd_installed, name)
    with ends(remote, name) as result:
        c.run(["kill", f"-{signo}", str(machine["qemu"]["pid"])])
    final = result["machine"]
    assert final["state"] == state and str(final["reason"]).startswith(reason), final
    assert float(result["seconds"]) < 5.0, result["seconds"]
    refused = c.run(["vmspawnctl", "terminate", name], check=False, timeout=30)  # answers, does not hang
    assert refused.returncode != 0 and "while it is" in refused.stderr, refused
    c.run(["vmspawnctl", "remove", name], timeout=30)


def test_pause_and_resume(system_container: Container, vmspawnd_installed: Installation, remote: Remote) -> None:
    """machinectl pause/resume call the VM's io.systemd.MachineInstance (systemd 261+)."""
    c = system_container
    if c.suite == "trixie":
        pytest.skip("machinectl 257 has no pause/resume for VMs (it needs controlAddress, systemd 261)")
    start_vm(c, vmspawnd_installed, "frz")
    with remote.events("frz") as events:
        machinectl(c, "pause", "frz")
        events.wait_event("frz", "STOP")
    assert "paused" in c.run(["vmspawnctl", "list"]).stdout.split("frz", 1)[1].split("\n", 1)[0]
    with remote.events("frz") as events:
        machinectl(c, "resume", "frz")
        events.wait_event("frz", "RESUME")
    assert remote.describe("frz")["paused"] is False
    remote.call("Terminate", {"name": "frz"})
    remote.call("Remove", {"name": "frz"})


def test_machine_instance_terminate_is_answered_and_the_manager_keeps_serving(
    system_container: Container, vmspawnd_installed: Installation, remote: Remote
) -> None:
    """varlinkctl (systemd's own client) calls Terminate on 10 VMs; each call is answered,
    and 100 manager calls after them all answer."""
    c = system_container
    for index in range(10):
        machine = start_vm(c, vmspawnd_installed, f"vi{index}", "--tpm=no")
        reply = c.run(
            ["varlinkctl", "call", str(machine["controlAddress"]), "io.systemd.MachineInstance.Terminate", "{}"], timeout=60
        )
        # Answered: exit 0 is varlinkctl's "got a reply"; it prints an empty reply as nothing
        # (257) or {} — a reset or a hang would fail or time out the call.
        assert reply.returncode == 0 and reply.stdout.strip() in ("", "{}"), reply
        assert remote.describe(f"vi{index}")["state"] == "stopped"
        c.run(["vmspawnctl", "remove", f"vi{index}"], timeout=30)
    calls = c.run(
        f"for i in $(seq 100); do timeout 10 varlinkctl call {SOCKET} io.vmspawnd.Manager.List '{{}}' >/dev/null"
        ' || { echo "call $i did not answer"; exit 1; }; done; echo all-answered',
        timeout=600,
    )
    assert calls.stdout.strip().endswith("all-answered"), calls


def test_keep_unit_joins_the_callers_unit(system_container: Container, vmspawnd_installed: Installation, remote: Remote) -> None:
    """`vmspawnctl run --keep-unit` in a service behaves as vmspawn in its unit: the VM's
    processes are in the service, machined registers that unit, stopping it stops the VM."""
    c, inst = system_container, vmspawnd_installed
    with remote.events() as events:  # all machines: "kept" does not exist yet
        c.run(
            [
                "systemd-run",
                "--unit=keeper.service",
                "--service-type=exec",
                "--property=Delegate=yes",
                "--",
                "vmspawnctl",
                "run",
                "-M",
                "kept",
                "--keep-unit",
                "--kvm=no",
                "--ram=256M",
                "--tpm=yes",
                f"--linux={inst.kernel}",
                f"--initrd={inst.initrd}",
                "vmspawnd_test.mode=wait",
            ]
        )
        try:
            events.wait_state("kept", "running", "ready")
        except Exception as exc:
            raise AssertionError(f"no VM from keeper.service:\n{c.journal('keeper.service', lines=30)}") from exc
    machine = remote.describe("kept")
    assert machine["unit"] == "keeper.service", machine
    assert machine_property(c, "kept", "Unit") == "keeper.service"
    found = vm_processes(c, machine)
    wrong = {pid: p for pid, p in found.items() if unit_of(str(p["cgroup"])) != "keeper.service"}
    assert not wrong, wrong
    with remote.events("kept") as events:
        c.run(["systemctl", "stop", "keeper.service"], timeout=120)
        events.wait_event("kept", "Removed")  # run's VM ends with its caller and is forgotten
    assert not set(found) & set(processes(c)), "processes of the VM outlived its unit"
    # A caller in no unit (nsenter puts it outside the container's units), or in a unit that
    # takes no processes it did not fork, is refused before anything starts.
    start = ["vmspawnctl", "start", "-M", "nounit", "--keep-unit", "--kvm=no", f"--linux={inst.kernel}"]
    refused = c.run(start, check=False)
    assert refused.returncode != 0 and "invalid keepUnit" in refused.stderr and "no systemd unit" in refused.stderr, refused
    refused = c.unit_run(start, check=False)
    assert refused.returncode != 0 and "invalid keepUnit" in refused.stderr and "Delegate=yes" in refused.stderr, refused
    assert "nounit" not in c.run(["vmspawnctl", "list"]).stdout


def test_registered_again_after_a_daemon_restart(
    system_container: Container, vmspawnd_installed: Installation, remote: Remote
) -> None:
    """machined forgot the VM (its registration removed behind the daemon's back, as when
    machined restarts empty); the restarted daemon adopts the VM and registers it again."""
    c = system_container
    machine = start_vm(c, vmspawnd_installed, "rereg")
    c.run(["varlinkctl", "call", "/run/systemd/machine/io.systemd.Machine", "io.systemd.Machine.Unregister", '{"name": "rereg"}'])
    assert "rereg" not in machinectl(c, "list", "--no-legend")
    c.run(["systemctl", "restart", "vmspawnd.service"])
    assert remote.describe("rereg")["qemu"] == machine["qemu"]  # adopted (and the daemon is up)
    assert int(machine_property(c, "rereg", "Leader")) == machine["reaper"]["pid"]
    assert machine_property(c, "rereg", "Unit") == "rereg.scope"
    remote.call("Terminate", {"name": "rereg"})
    remote.call("Remove", {"name": "rereg"})


def test_a_clone_is_a_machine_like_any_other(
    system_container: Container, vmspawnd_installed: Installation, remote: Remote
) -> None:
    """A snapshot in the unit's state directory, and a clone of it started through
    vmspawnctl: registered with machined in a scope of its own (every process of it there),
    its guest answering machinectl poweroff from where the source was saved."""
    c = system_container
    source = start_vm(c, vmspawnd_installed, "snapsrc")
    wait_booted(remote, source)
    c.run(["vmspawnctl", "snapshot", "snapsrc", "--name=sysbundle", "--stop"], timeout=120)
    assert c.run(["stat", "-c", "%a %U", "/var/lib/vmspawnd/snapshots/sysbundle"]).stdout.split() == ["700", "root"]
    c.run(["vmspawnctl", "remove", "snapsrc"])
    try:
        c.run(["vmspawnctl", "start", "--from-snapshot=sysbundle", "-M", "sysclone"], timeout=120)
        clone = remote.describe("sysclone")
        assert clone["state"] in ("running", "ready") and clone["registered"] is True, clone
        assert machine_property(c, "sysclone", "Class") == "vm"
        assert machine_property(c, "sysclone", "Unit") == "sysclone.scope" == clone["unit"]
        wrong = {pid: p for pid, p in vm_processes(c, clone).items() if unit_of(str(p["cgroup"])) != "sysclone.scope"}
        assert not wrong, f"processes of the clone outside sysclone.scope: {wrong}"
        offset = log_size(remote, clone)
        with ends(remote, "sysclone") as result:
            machinectl(c, "poweroff", "sysclone")
        wait_in_log(remote, clone, offset, b"VMSPAWND-TEST: acpi-powerdown")  # the restored guest's acpid
        assert (result["machine"]["state"], result["machine"]["reason"]) == ("stopped", "powered off on request")
        remote.call("Remove", {"name": "sysclone"})
    finally:
        c.run(["vmspawnctl", "snapshot", "remove", "sysbundle"])
    assert "sysbundle" not in c.run(["vmspawnctl", "snapshot", "list"]).stdout
