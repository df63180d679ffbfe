# SPDX-License-Identifier: LGPL-2.1-or-later
"""README.md's commands, as written and in the README's order, against a real daemon.

The "Use" blocks run here: vmspawnctl from this venv on PATH, the daemon named by
$VMSPAWN_ADDRESS (which the README documents), a VM "demo" booted first exactly as
`scripts/install --demo` boots it. Where the README leaves a word to the user, the test
fills it in: KERNEL and INITRD are the test guest's, [KERNEL ARGS] keeps it running
(`vmspawnd_test.mode=wait`). The other blocks run elsewhere, and this module checks that
they are exactly those: `scripts/install --demo` and the Varlink example in
tests/system/test_install.py (a container with systemd, installed as the README says),
`scripts/test` as CI itself (.ci/run). A command added to the README fails here until a
test runs it."""

from __future__ import annotations

import os
import pty
import re
import select
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import Console, Daemon

pytestmark = pytest.mark.vm

ROOT = Path(__file__).resolve().parents[2]
BIN = str(Path(sys.executable).parent)
VARLINK_CLIENTS_TEST = "tests/system/test_install.py::test_varlink_clients_list_the_vm"
RUN_ELSEWHERE = {
    "scripts/install --demo": "tests/system/test_install.py::test_readme_demo",
    "scripts/test": ".ci/run",
    "varlinkctl call /run/vmspawnd/io.vmspawnd.Manager io.vmspawnd.Manager.List '{}'": VARLINK_CLIENTS_TEST,
    (
        "/opt/vmspawnd/bin/python -m varlink.cli call unix:/run/vmspawnd/io.vmspawnd.Manager/io.vmspawnd.Manager.List '{}'"
    ): VARLINK_CLIENTS_TEST,
}


# Sections that are a recipe the user follows by hand, not commands this suite can run as
# written (building a Debian tree needs the network, root and minutes): each names the tests
# that do the same with the same tools.
RECIPES = {
    "Boot a real OS image": "tests/realguest (image.py builds such a tree with debootstrap; test_boot_paths boots it)",
}


def readme_blocks() -> list[tuple[str, list[str]]]:
    """(section, commands) of every ```sh block: comments and blank lines dropped."""
    text = (ROOT / "README.md").read_text()
    blocks = []
    for match in re.finditer(r"^```sh\n(.*?)^```", text, re.M | re.S):
        section = re.findall(r"^## (.+)$", text[: match.start()], re.M)[-1]
        commands = [re.sub(r"\s+#.*$", "", line).strip() for line in match.group(1).splitlines()]
        blocks.append((section, [c for c in commands if c]))
    return blocks


def use_commands() -> list[str]:
    return [c for section, commands in readme_blocks() if section == "Use" for c in commands if c not in RUN_ELSEWHERE]


def test_every_readme_command_has_a_runner() -> None:
    everything = [c for section, commands in readme_blocks() if section not in RECIPES for c in commands]
    assert everything, "README.md has no sh blocks"
    assert set(RECIPES) <= {section for section, _ in readme_blocks()}, "RECIPES names a section the README no longer has"
    assert [c for c in everything if not c.startswith("vmspawnctl ") and c not in RUN_ELSEWHERE] == []
    assert "exec scripts/test" in (ROOT / ".ci/run").read_text()
    assert set(RUN_ELSEWHERE) <= set(everything), "RUN_ELSEWHERE names a command the README no longer has"


def words(command: str, guest) -> list[str]:  # type: ignore[no-untyped-def]
    """The command's words with the README's placeholders filled in."""
    command = command.replace("[KERNEL ARGS]", "vmspawnd_test.mode=wait")
    command = re.sub(r"=KERNEL\b", f"={guest.kernel}", command)
    command = re.sub(r"=INITRD\b", f"={guest.initrd}", command)
    return shlex.split(command)


def on_terminal(
    argv: list[str], env: dict[str, str], *, then_type: bytes = b"", after: bytes = b"", timeout: float = 300.0
) -> tuple[int, bytes]:
    """Run argv on a pty as a user would; once `after` has shown, type `then_type`."""
    master, slave = pty.openpty()
    process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
    os.close(slave)
    output, typed = b"", not then_type
    deadline = time.monotonic() + timeout
    try:
        while True:
            ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"{shlex.join(argv)} did not finish; output {output[-2000:]!r}")
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            output += data
            if not typed and after in output:
                os.write(master, then_type)
                typed = True
    finally:
        os.close(master)
        if process.poll() is None:
            process.kill()
        process.wait()
    return process.returncode, output


@pytest.fixture(scope="module")
def demo(daemon: Daemon, guest) -> Iterator[dict[str, str]]:  # type: ignore[no-untyped-def]
    """The daemon with the VM "demo" as `scripts/install --demo` boots it (its own words)."""
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "SYSTEMD_COLORS")}
    env |= {"VMSPAWN_ADDRESS": daemon.address, "PATH": f"{BIN}:{os.environ['PATH']}", "TERM": "xterm", "SYSTEMD_PAGER": "cat"}
    install = (ROOT / "scripts/install").read_text()
    assert "start -M demo --kvm=no --ram=256M" in install and "vmspawnd_test.mode=wait" in install
    subprocess.run(
        [
            "vmspawnctl",
            "start",
            "-M",
            "demo",
            "--kvm=no",
            "--ram=256M",
            f"--linux={guest.kernel}",
            f"--initrd={guest.initrd}",
            "vmspawnd_test.mode=wait",
        ],
        env=env,
        check=True,
        timeout=300,
    )
    with Console(daemon.call("Describe", {"name": "demo"})["machine"]) as console:
        console.wait_for(r"VMSPAWND-TEST: acpid-running")
    yield env
    for name in ("demo", "vm1", "vm2"):
        subprocess.run(["vmspawnctl", "terminate", name], env=env, capture_output=True, timeout=120)
        subprocess.run(["vmspawnctl", "remove", name], env=env, capture_output=True, timeout=120)


def test_readme_use_commands_as_written(demo: dict[str, str], guest) -> None:  # type: ignore[no-untyped-def]
    commands = use_commands()
    assert commands[0] == "vmspawnctl list" and any(c.startswith("vmspawnctl run ") for c in commands), commands
    for command in commands:
        argv = words(command, guest)
        verb = argv[1]
        if verb in ("console", "run"):
            # Interactive: on a terminal. console is left with Ctrl-] three times once the
            # history has shown; run returns when the guest (powering off by default) ends.
            code, output = on_terminal(
                argv, demo, then_type=b"\x1d\x1d\x1d" if verb == "console" else b"", after=b"VMSPAWND-TEST"
            )
            text = output.decode(errors="replace")
            assert code == 0, f"{command}: exit {code}\n{text[-3000:]}"
            assert "VMSPAWND-TEST:" in text, f"{command}: no console output\n{text[-3000:]}"
            continue
        result = subprocess.run(argv, env=demo, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{command}: exit {result.returncode}\n{result.stdout}{result.stderr}"
        expected = {
            "list": r"^demo\s",
            "status": r"State: (running|ready)",
            "log": r"VMSPAWND-TEST: acpid-running",
            "pause": r"^demo: paused$",
            "resume": r"^demo: (running|ready)$",
            "stop": r"^demo: stopped",
            "start": r"^Spawned VM vm1 ",
            "terminate": r"^vm1: stopped",
        }.get(verb)
        if expected:
            assert re.search(expected, result.stdout, re.M), f"{command}: {result.stdout}"
