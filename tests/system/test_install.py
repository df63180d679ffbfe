# SPDX-License-Identifier: LGPL-2.1-or-later
"""README's install where systemd is PID 1, on trixie and forky: scripts/install, socket
activation, one VM through vmspawnctl, and systemd's own tools (machinectl, varlinkctl)
seeing it. The tests of a module run in order on one container per suite and build on each
other: the first failure explains the later ones.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from vmspawnctl.varlink import Connection, JsonObject

from tests.support import MANAGER, Console
from tests.system.container import Container
from tests.system.deploy import REPO_ROOT, Installation

pytestmark = [pytest.mark.system, pytest.mark.vm]

SOCKET = "/run/vmspawnd/io.vmspawnd.Manager"
VM = "t1"


def is_active(c: Container, unit: str) -> str:
    return c.run(["systemctl", "is-active", unit], check=False).stdout.strip()


def main_pid(c: Container, unit: str) -> int:
    return int(c.run(["systemctl", "show", "-P", "MainPID", unit]).stdout)


def describe(c: Container, name: str = VM) -> JsonObject:
    machine: JsonObject = json.loads(c.run(["vmspawnctl", "status", name, "--json"]).stdout)
    return machine


def wait_console(c: Container, name: str, pattern: str) -> dict[str, list[str]]:
    """Wait for `pattern` on the VM's console, read from the host through the daemon's socket
    and the console log inside; returns the guest's facts so far."""
    machine = describe(c, name)
    host_view = {
        **machine,
        "consoleLog": str(c.path(str(machine["consoleLog"]))),
        "runtimeDirectory": str(c.path(str(machine["runtimeDirectory"]))),
    }
    with Console(host_view) as console:
        console.wait_for(pattern)
        return console.facts()


def test_readme_install(system_container: Container, vmspawnd_installed: Installation) -> None:
    c, out = system_container, vmspawnd_installed.output
    # Everything it needs is in the tree: a new user's apt-get step would be the same list
    # (scripts/lib.sh), so no package may be missing here.
    assert "installing missing system packages" not in out, out
    assert "vmspawnd.socket is enabled" in out, out
    assert c.run(["readlink", "-f", "/usr/local/bin/vmspawnctl"]).stdout.strip() == "/opt/vmspawnd/bin/vmspawnctl"
    for unit in ("vmspawnd.socket", "vmspawnd-guests.service"):
        assert c.run(["systemctl", "is-enabled", unit]).stdout.strip() == "enabled"
    assert is_active(c, "vmspawnd.socket") == "active"
    assert is_active(c, "vmspawnd-guests.service") == "active"
    assert c.run(["stat", "-c", "%F %a", SOCKET]).stdout.strip() == "socket 666"


def test_man_pages_and_completion_are_found(system_container: Container, vmspawnd_installed: Installation) -> None:
    """After the install `man` finds both pages on its default MANPATH (and the units as
    aliases of vmspawnd(8)), and bash-completion loads vmspawnctl's completion on first use."""
    c = system_container
    assert "/usr/local/share/man" in c.run(["manpath"]).stdout.strip().split(":")
    for page, link in (
        ("vmspawnctl", "/usr/local/share/man/man1/vmspawnctl.1"),
        ("vmspawnd", "/usr/local/share/man/man8/vmspawnd.8"),
    ):
        # man -w names the file behind the link, in the installation's share/man.
        assert c.run(["man", "-w", page]).stdout.strip() == c.run(["readlink", "-e", link]).stdout.strip() != ""
    for page, title in (("vmspawnctl", "VMSPAWNCTL(1)"), ("vmspawnd", "VMSPAWND(8)"), ("vmspawnd.service", "VMSPAWND(8)")):
        shown = c.run(["man", page], env={"MANWIDTH": "80"}).stdout
        assert shown.split("\n", 1)[0].startswith(title), shown[:300]
    loaded = c.run(". /usr/share/bash-completion/bash_completion; _completion_loader vmspawnctl; complete -p vmspawnctl").stdout
    assert "-F _vmspawnctl_completion vmspawnctl" in loaded, loaded
    assert c.run(["test", "-s", "/usr/local/share/zsh/site-functions/_vmspawnctl"], check=False).returncode == 0


def test_install_again_changes_nothing(system_container: Container, vmspawnd_installed: Installation) -> None:
    """README: running it again is safe; an unchanged checkout restarts nothing."""
    c = system_container
    pid = main_pid(c, "vmspawnd.service")
    result = c.unit_run("scripts/install", cwd=vmspawnd_installed.checkout, timeout=300)
    assert "is up to date with this checkout" in result.stderr, result.stderr
    assert main_pid(c, "vmspawnd.service") == pid


def test_socket_activation(system_container: Container, vmspawnd_installed: Installation) -> None:
    """The daemon is started by the first connection to vmspawnd.socket, and serves the socket
    systemd made (it binds none of its own)."""
    c = system_container
    c.run(["systemctl", "stop", "vmspawnd.service"])
    assert is_active(c, "vmspawnd.service") == "inactive"
    assert is_active(c, "vmspawnd.socket") == "active"
    assert main_pid(c, "vmspawnd.service") == 0

    # The first connection: a host-side client, through the container's root.
    with Connection(str(c.path(SOCKET)), timeout=60) as conn:
        assert conn.call(f"{MANAGER}.List")["machines"] == []
    assert is_active(c, "vmspawnd.service") == "active"
    daemon = main_pid(c, "vmspawnd.service")
    assert daemon != 0
    # The listening socket PID 1 holds at that path is the daemon's too: the same socket. (The
    # network namespace is the host's, so ss may also list a host's vmspawnd socket at the same
    # path, with no holders visible from the container's pid namespace.)
    listening = [
        line for line in c.run(["ss", "-x", "-l", "-p", "-n"]).stdout.splitlines() if f" {SOCKET} " in line and "pid=1," in line
    ]
    assert len(listening) == 1, listening
    assert f"pid={daemon}," in listening[0], listening[0]


def test_start_vm(system_container: Container, vmspawnd_installed: Installation) -> None:
    c, inst = system_container, vmspawnd_installed
    result = c.run(
        [
            "vmspawnctl",
            "start",
            "-M",
            VM,
            "--kvm=no",
            "--ram=256M",
            f"--linux={inst.kernel}",
            f"--initrd={inst.initrd}",
            "--wait",
            "--timeout=240",
            "vmspawnd_test.mode=wait",
        ],
        timeout=300,
    )
    assert f"VM {VM} is ready." in result.stdout, result
    machine = describe(c)
    assert machine["state"] in ("running", "ready"), machine
    # The guest's init is up and handles ACPI (stop below relies on it).
    facts = wait_console(c, VM, r"VMSPAWND-TEST: acpid-running")
    # --ram=256M reached QEMU: the guest sees less than 256 MiB (the firmware keeps a share,
    # more with forky's OVMF: 140 MB usable against trixie's 190 MB).
    assert 64 * 1024 < int(facts["memtotal-kb"][0]) < 256 * 1024, facts


def test_machinectl_sees_the_vm(system_container: Container, vmspawnd_installed: Installation) -> None:
    c = system_container
    rows = [line.split() for line in c.run(["machinectl", "list", "--no-legend"]).stdout.splitlines()]
    assert [VM, "vm"] in [row[:2] for row in rows], rows
    status = c.run(["machinectl", "status", VM]).stdout
    assert status.startswith(VM), status
    shown = dict(line.partition("=")[::2] for line in c.run(["machinectl", "show", VM]).stdout.splitlines())
    assert shown["Class"] == "vm", shown
    # machined's leader is the VM's reaper (QEMU's parent, which turns machined's signals
    # into power-off and reset), and QEMU runs in the unit machined knows.
    machine = describe(c)
    qemu, reaper = machine["qemu"], machine["reaper"]
    assert isinstance(qemu, dict) and isinstance(reaper, dict)
    assert int(shown["Leader"]) == reaper["pid"], (shown, reaper)
    assert shown["Unit"] and shown["Unit"] != "vmspawnd.service", shown
    cgroup = c.run(["cat", f"/proc/{qemu['pid']}/cgroup"]).stdout
    assert cgroup.strip().endswith(f"/{shown['Unit']}"), cgroup


def test_varlink_clients_list_the_vm(system_container: Container, vmspawnd_installed: Installation) -> None:
    c = system_container
    reply = json.loads(c.run(["varlinkctl", "call", SOCKET, f"{MANAGER}.List", "{}"]).stdout)
    assert [m["name"] for m in reply["machines"]] == [VM], reply
    # An independent client from the host.
    host = subprocess.run(
        [sys.executable, "-m", "varlink.cli", "call", f"unix:{c.path(SOCKET)}/{MANAGER}.List", "{}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert [m["name"] for m in json.loads(host.stdout)["machines"]] == [VM], host.stdout
    # README's Varlink examples, as written, inside (python-varlink's CLI exits 0 on a Varlink
    # error: the output is what counts).
    examples = [
        line
        for line in (REPO_ROOT / "README.md").read_text().splitlines()
        if line.startswith(("varlinkctl call ", "/opt/vmspawnd/bin/python -m varlink.cli call "))
    ]
    assert len(examples) == 2, examples
    for example in examples:
        out = c.run(example).stdout
        assert [m["name"] for m in json.loads(out)["machines"]] == [VM], (example, out)
    # Tab after "vmspawnctl status " offers the running VM, through the installed completion.
    offered = c.run(
        ". /usr/share/bash-completion/bash_completion; _completion_loader vmspawnctl; "
        "COMP_WORDS=(vmspawnctl status ''); COMP_CWORD=2; _vmspawnctl_completion vmspawnctl '' status; "
        "printf '%s\\n' \"${COMPREPLY[@]}\""
    ).stdout.split()
    assert offered == [VM], offered


def test_stop_and_remove(system_container: Container, vmspawnd_installed: Installation) -> None:
    c = system_container
    assert c.run(["vmspawnctl", "stop", VM], timeout=180).stdout.startswith(f"{VM}: stopped"), "not stopped"
    assert describe(c)["state"] == "stopped"
    assert VM not in c.run(["machinectl", "list", "--no-legend"]).stdout
    c.run(["vmspawnctl", "remove", VM])
    assert json.loads(c.run(["vmspawnctl", "list", "--json"]).stdout) == []
    assert c.run(["pgrep", "-a", "qemu-system"], check=False).returncode == 1


def test_systemctl_stop(system_container: Container, vmspawnd_installed: Installation) -> None:
    c = system_container
    cursor = c.cursor()
    c.run(["systemctl", "stop", "vmspawnd"], timeout=60)
    assert is_active(c, "vmspawnd.service") == "inactive"
    assert is_active(c, "vmspawnd.socket") == "active"
    journal = c.journal("vmspawnd.service")
    assert "Traceback" not in journal, journal
    assert "vmspawnd.service: Failed" not in c.journal(since_cursor=cursor)


def test_readme_demo(system_container: Container, vmspawnd_installed: Installation) -> None:
    """README's set-up command, `scripts/install --demo`: it builds the test guest itself
    (apt-get download of the release's kernel, busybox) and boots it as the VM "demo"."""
    c = system_container
    assert json.loads(c.run(["vmspawnctl", "list", "--json"]).stdout) == [], "another VM runs: only one at a time"
    result = c.unit_run("scripts/install --demo", cwd=vmspawnd_installed.checkout, timeout=600)
    assert "The VM 'demo' runs under vmspawnd" in result.stdout, result.stdout + result.stderr
    try:
        machine = describe(c, "demo")
        assert machine["state"] in ("running", "ready"), machine
        # Up to its ACPI handler, so that stop below is a clean power-off, not an escalation.
        wait_console(c, "demo", r"VMSPAWND-TEST: acpid-running")
        assert "vmspawnd_test.mode=wait" in c.run(["cat", f"/proc/{machine['qemu']['pid']}/cmdline"]).stdout
        assert "demo" in c.run(["machinectl", "list", "--no-legend"]).stdout
    finally:
        stopped = c.run(["vmspawnctl", "stop", "demo"], timeout=180, check=False)
        c.run(["vmspawnctl", "remove", "demo"], check=False)
    assert stopped.stdout.startswith("demo: stopped"), stopped
    assert json.loads(c.run(["vmspawnctl", "list", "--json"]).stdout) == []


def test_upgrade_keeps_a_running_vm(system_container: Container, vmspawnd_installed: Installation) -> None:
    """docs/vmspawnd.md, "Upgrade": scripts/install from a newer checkout installs the new code
    and restarts the daemon on it; the VM keeps running (its QEMU is the same process) and the
    new daemon adopts it: it lists it and can stop it."""
    c, inst = system_container, vmspawnd_installed
    c.run(
        [
            "vmspawnctl",
            "start",
            "-M",
            "up",
            "--kvm=no",
            "--ram=256M",
            f"--linux={inst.kernel}",
            f"--initrd={inst.initrd}",
            "--wait",
            "--timeout=240",
            "vmspawnd_test.mode=wait",
        ],
        timeout=300,
    )
    try:
        wait_console(c, "up", r"VMSPAWND-TEST: acpid-running")  # so that stop below is an ACPI power-off
        qemu_pid = describe(c, "up")["qemu"]["pid"]
        daemon = main_pid(c, "vmspawnd.service")
        # A newer checkout: one line more in the package.
        marker = "# an upgrade, as tests/system/test_install.py makes it"
        c.run(f"printf '%s\\n' '{marker}' >>{inst.checkout}/vmspawnd/__init__.py")
        result = c.unit_run("scripts/install", cwd=inst.checkout, timeout=600)
        assert "installing vmspawnd into /opt/vmspawnd" in result.stderr, result.stderr
        assert marker in c.run("cat /opt/vmspawnd/lib/python3*/site-packages/vmspawnd/__init__.py").stdout
        assert main_pid(c, "vmspawnd.service") not in (0, daemon), "the daemon was not restarted on the new code"
        machine = describe(c, "up")
        assert machine["state"] in ("running", "ready") and machine["qemu"]["pid"] == qemu_pid, machine
        assert c.run(["cat", f"/proc/{qemu_pid}/comm"]).stdout.startswith("qemu-system"), "QEMU is gone"
        assert ["up"] == [m["name"] for m in json.loads(c.run(["vmspawnctl", "list", "--json"]).stdout)]
        stopped = c.run(["vmspawnctl", "stop", "up"], timeout=180)
        assert stopped.stdout.startswith("up: stopped (powered off on request)"), stopped
    finally:
        c.run(["vmspawnctl", "terminate", "up"], check=False)
        c.run(["vmspawnctl", "remove", "up"], check=False)


INSTALLED = [
    "/etc/systemd/system/vmspawnd.socket",
    "/etc/systemd/system/vmspawnd.service",
    "/etc/systemd/system/vmspawnd-guests.service",
    "/etc/systemd/user/vmspawnd.socket",
    "/etc/systemd/user/vmspawnd.service",
    "/opt/vmspawnd",
    "/usr/local/bin/vmspawnctl",
    SOCKET,
    "/run/vmspawnd",
]


def exists(c: Container, path: str) -> bool:
    return c.run(["test", "-e", path], check=False).returncode == 0 or c.run(["test", "-L", path], check=False).returncode == 0


def test_uninstall(system_container: Container, vmspawnd_installed: Installation) -> None:
    """`scripts/install --uninstall`: refused while a VM runs; then no unit, venv, socket or
    vmspawnctl is left, no process of it runs, and the TPM state the VM made stays."""
    c, inst = system_container, vmspawnd_installed
    assert all(exists(c, path) for path in INSTALLED if path != "/run/vmspawnd"), "not installed to begin with"
    c.run(
        [
            "vmspawnctl",
            "start",
            "-M",
            "keep",
            "--kvm=no",
            "--ram=256M",
            "--tpm=yes",
            "--tpm-state=/root/keep.tpmstate",
            f"--linux={inst.kernel}",
            f"--initrd={inst.initrd}",
            "vmspawnd_test.mode=wait",
        ],
        timeout=300,
    )
    try:
        refused = c.unit_run("scripts/install --uninstall", cwd=inst.checkout, check=False, timeout=120)
        assert refused.returncode != 0, refused
        assert "VMs still run under vmspawnd: keep. Stop them first" in refused.stderr, refused.stderr
        assert all(exists(c, path) for path in INSTALLED), "a refused uninstall removed something"
        assert describe(c, "keep")["state"] in ("running", "ready")
    finally:
        c.run(["vmspawnctl", "terminate", "keep"], check=False)
        c.run(["vmspawnctl", "remove", "keep"], check=False)

    result = c.unit_run("scripts/install --uninstall", cwd=inst.checkout, timeout=300)
    for path in INSTALLED:
        assert not exists(c, path), f"{path} is left after --uninstall:\n{result.stderr}"
    assert "removed /opt/vmspawnd (the venv)" in result.stderr, result.stderr
    assert "removed /etc/systemd/system/vmspawnd.service" in result.stderr, result.stderr
    assert "Kept: VM images and directories, their TPM state" in result.stderr, result.stderr
    units = c.run(["systemctl", "list-unit-files", "--no-legend", "vmspawnd*"], check=False).stdout
    assert units.strip() == "", units
    assert c.run(["systemctl", "--global", "is-enabled", "vmspawnd.socket"], check=False).returncode != 0
    assert c.run(["pgrep", "-f", "/opt/vmspawnd"], check=False).returncode == 1, "a process of the venv still runs"
    assert exists(c, "/root/keep.tpmstate"), "the VM's TPM state was removed"
    assert "vmspawnd.service: Failed" not in c.journal("vmspawnd.service")
