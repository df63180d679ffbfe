# SPDX-License-Identifier: LGPL-2.1-or-later
"""The spine end to end: real vmspawnd, real QEMU (TCG), the real test guest.

Every assertion about the guest is derived from what the guest printed about itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.guest.build import Guest
from tests.support import Console, Daemon, EventStream, parent_of, qemu_processes

pytestmark = pytest.mark.vm

MIB = 1024 * 1024


def test_start_boots_guest_with_requested_hardware(daemon: Daemon, guest: Guest, tmp_path: Path) -> None:
    drive = tmp_path / "extra-disk.img"
    drive.write_bytes(b"\0" * (3 * MIB))
    result = daemon.ctl(
        "start",
        "-M",
        "facts",
        "--kvm=no",
        "--cpus=2",
        "--ram=300M",
        f"--linux={guest.kernel}",
        f"--initrd={guest.initrd}",
        f"--extra-drive={drive}",
        "vmspawnd_test.mode=wait",
        "marker.word=hello-from-args",
    )
    assert result.returncode == 0, result.stderr
    machine = daemon.call("Describe", {"name": "facts"})["machine"]
    assert machine["state"] in ("running", "ready")
    with Console(machine) as console:
        console.wait_for(r"VMSPAWND-TEST: facts-done")
        facts = console.facts()
    cmdline = facts["cmdline"][0].split()
    assert "marker.word=hello-from-args" in cmdline
    assert "console=hvc0" in cmdline
    assert int(facts["nproc"][0]) == 2
    memtotal = int(facts["memtotal-kb"][0]) * 1024
    assert 0.75 * 300 * MIB < memtotal <= 300 * MIB
    blocks = {line.split()[0]: dict(kv.split("=", 1) for kv in line.split()[1:]) for line in facts["block"]}
    serials = {b["serial"]: b for b in blocks.values()}
    assert drive.name in serials, blocks
    assert int(serials[drive.name]["size"]) * 512 == drive.stat().st_size

    stopped = daemon.call("Terminate", {"name": "facts"})["machine"]
    assert stopped["state"] == "stopped"
    daemon.call("Remove", {"name": "facts"})


def test_third_party_varlink_client_spawns_vm_that_outlives_it(daemon: Daemon, guest: Guest) -> None:
    spec = {
        "name": "byvarlink",
        "kvm": False,
        "ram": 256 * MIB,
        "linux": str(guest.kernel),
        "initrds": [str(guest.initrd)],
        "kernelCmdline": ["vmspawnd_test.mode=wait"],
    }
    client = subprocess.run(
        [
            sys.executable,
            "-m",
            "varlink.cli",
            "call",
            f"unix:{daemon.address}/io.vmspawnd.Manager.Spawn",
            json.dumps({"spec": spec}),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert client.returncode == 0 and "error" not in client.stdout.lower(), client.stdout + client.stderr
    reply = json.loads(client.stdout)
    pid = reply["machine"]["qemu"]["pid"]
    # The client has exited; QEMU still runs, a child of its reaper, itself the daemon's child.
    assert pid in qemu_processes()
    reaper = reply["machine"]["reaper"]["pid"]
    assert parent_of(pid) == reaper
    assert parent_of(reaper) == daemon.process.pid
    machine = daemon.call("Describe", {"name": "byvarlink"})["machine"]
    with Console(machine) as console:
        console.wait_for(r"VMSPAWND-TEST: acpid-running")
    assert daemon.call("Describe", {"name": "byvarlink"})["machine"]["state"] == "ready"

    # ACPI power-off reaches the guest's acpid, which powers off.
    result = daemon.ctl("stop", "byvarlink")
    assert result.returncode == 0, result.stderr
    machine = daemon.call("Describe", {"name": "byvarlink"})["machine"]
    assert machine["state"] == "stopped"
    assert machine["reason"] == "powered off on request"
    assert "VMSPAWND-TEST: acpi-powerdown" in Path(machine["consoleLog"]).read_text(errors="replace")
    assert pid not in qemu_processes()
    assert daemon.ctl("remove", "byvarlink").returncode == 0


def test_guest_ignoring_acpi_is_terminated_after_deadline(daemon: Daemon, guest: Guest) -> None:
    result = daemon.ctl(
        "start",
        "-M",
        "stubborn",
        "--kvm=no",
        "--ram=256M",
        f"--linux={guest.kernel}",
        f"--initrd={guest.initrd}",
        "vmspawnd_test.mode=ignore-acpi",
    )
    assert result.returncode == 0, result.stderr
    machine = daemon.call("Describe", {"name": "stubborn"})["machine"]
    with Console(machine) as console:
        console.wait_for(r"VMSPAWND-TEST: ignoring-acpi")
    result = daemon.ctl("stop", "--deadline=3", "stubborn")
    assert result.returncode == 0, result.stderr
    machine = daemon.call("Describe", {"name": "stubborn"})["machine"]
    assert machine["state"] == "stopped"
    assert "did not power off within 3s" in machine["reason"]
    assert machine["qemu"]["pid"] not in qemu_processes()
    daemon.call("Remove", {"name": "stubborn"})


def test_guest_poweroff_is_recorded_until_removed(daemon: Daemon, guest: Guest) -> None:
    with EventStream(daemon) as events:
        daemon.call(
            "Spawn",
            {
                "spec": {
                    "name": "shortlived",
                    "kvm": False,
                    "ram": 256 * MIB,
                    "linux": str(guest.kernel),
                    "initrds": [str(guest.initrd)],
                    "kernelCmdline": ["vmspawnd_test.mode=poweroff"],
                }
            },
        )
        # The guest powers itself off; the record stays, with its reason and exit code.
        events.wait_state("shortlived", "stopped", "failed")
    machine = daemon.call("Describe", {"name": "shortlived"})["machine"]
    assert machine["state"] == "stopped", machine
    assert machine["exitCode"] == 0
    assert "guest powered off" in machine["reason"]
    assert "VMSPAWND-TEST: powering-off" in Path(machine["consoleLog"]).read_text(errors="replace")
    assert "shortlived" in {m["name"] for m in daemon.call("List")["machines"]}
    runtime = Path(machine["runtimeDirectory"])
    assert not (runtime / "qmp").exists() and not (runtime / "console").exists()
    daemon.call("Remove", {"name": "shortlived"})
    assert not runtime.exists()
    assert "shortlived" not in {m["name"] for m in daemon.call("List")["machines"]}
