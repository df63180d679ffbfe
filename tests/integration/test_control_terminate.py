# SPDX-License-Identifier: LGPL-2.1-or-later
"""Terminate on a VM's own control socket (io.systemd.MachineInstance), end to end.

Found on a real host: the call got a connection reset instead of its reply, and the next
connection to the manager socket was accepted and never read (`vmspawnctl list` hung).
systemd-vmspawn answers Terminate with `{}` before it exits; so must the daemon, and the
manager socket must serve every connection after it. The caller is python-varlink's CLI,
a client independent of ours; the VMs (real QEMU under TCG) are booted one at a time.
"""

import contextlib
import subprocess
import sys
import time

import pytest
from vmspawnctl.varlink import Connection, VarlinkError

from tests.guest.build import Guest
from tests.support import MANAGER, Daemon, spawn_waiting

pytestmark = pytest.mark.vm

ROUNDS = 3  # VMs in sequence on one daemon: each frees other fd numbers for reuse
CALLS = 100
CALL_BOUND = 10.0  # seconds for one List round trip (they take milliseconds when nothing hangs)


def test_terminate_on_the_control_socket_is_answered_and_the_manager_serves_on(daemon: Daemon, guest: Guest) -> None:
    for round_ in range(ROUNDS):
        name = f"term{round_}"
        machine = spawn_waiting(daemon, guest, name)
        control = str(machine["controlAddress"])
        try:
            # A SubscribeEvents stream on the same socket ends with NotConnected (as systemd's).
            events = Connection(control, timeout=120)
            events.send("io.systemd.MachineInstance.SubscribeEvents", {}, more=True)
            assert events.receive()["parameters"] == {"event": "READY", "data": None}

            result = subprocess.run(
                [sys.executable, "-m", "varlink.cli", "call", f"unix:{control}/io.systemd.MachineInstance.Terminate", "{}"],
                capture_output=True,
                text=True,
                timeout=120,
            )
            # varlink.cli prints a reply's parameters unless they are empty (`if message:`),
            # an error reply on stderr (exiting 0), "Connection closed" and exit 1 on EOF
            # without a reply, a traceback on a reset. So `{}` is: exit 0 and no output at all.
            assert (result.returncode, result.stdout, result.stderr) == (0, "", ""), result
            assert daemon.call("Describe", {"name": name})["machine"]["state"] == "stopped"

            with pytest.raises(VarlinkError) as ended:
                while True:
                    events.receive()
            assert ended.value.name == "io.systemd.MachineInstance.NotConnected"
            events.close()

            started = time.monotonic()
            for _ in range(CALLS):  # each on a fresh connection: one of them gets the freed fd number
                with Connection(daemon.address, timeout=CALL_BOUND) as conn:
                    assert [m["name"] for m in conn.call(f"{MANAGER}.List")["machines"]] == [name]
            print(f"\n{name}: {CALLS} List calls after Terminate in {time.monotonic() - started:.2f}s")
        finally:  # bounded: before the fix, these hung on the manager socket
            with contextlib.suppress(VarlinkError):  # InvalidState once it has stopped
                daemon.call("Terminate", {"name": name}, timeout=60)
            daemon.call("Remove", {"name": name}, timeout=60)
