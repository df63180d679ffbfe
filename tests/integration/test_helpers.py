# SPDX-License-Identifier: LGPL-2.1-or-later
"""Helpers owned by the VM, proven in the real test guest under TCG.

swtpm, one virtiofsd per share and the SSH key pair start with the VM, reach the guest
(facts the guest prints about itself: TPM devices and PCR 0, its mounts and whether a
write worked, SMBIOS type 11 strings), and go with it. A helper that dies ends the VM
with a reason naming it, and nothing of that VM remains.
"""

from __future__ import annotations

import base64
import os
import signal
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from vmspawnctl.varlink import JsonObject, VarlinkError

from tests.guest.build import Guest
from tests.support import Console, Daemon, EventStream, children_of, no_leaks

pytestmark = pytest.mark.vm

MIB = 1024 * 1024
CREDENTIAL_PREFIX = b"io.systemd.credential.binary:"


def smbios_credentials(facts: dict[str, list[str]]) -> dict[str, bytes]:
    """`smbios11 11-K HEX` lines → {credential id: data}: the raw entry is a type-11
    structure (4-byte header, count byte) followed by NUL-terminated strings."""
    found: dict[str, bytes] = {}
    for line in facts.get("smbios11", []):
        raw = bytes.fromhex(line.split()[1])
        for text in raw[5:].split(b"\0"):
            if text.startswith(CREDENTIAL_PREFIX):
                name, _, data = text[len(CREDENTIAL_PREFIX) :].partition(b"=")
                found[name.decode()] = base64.b64decode(data)
    return found


def unique_facts(console: Console) -> dict[str, list[str]]:
    """The console's facts, each once (history and the live stream may both hold a line)."""
    return {key: list(dict.fromkeys(lines)) for key, lines in console.facts().items()}


def by_first_word(lines: list[str]) -> dict[str, list[str]]:
    return {line.split()[0]: line.split()[1:] for line in lines}


def helper_pids(machine: JsonObject) -> dict[str, int]:
    return {name: int(record["pid"]) for name, record in machine["helpers"].items()}


def alive(pid: int) -> bool:
    """Running (a zombie is not running, but is a leak the zombie check reports)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def assert_nothing_remains(machine: JsonObject, pids: list[int]) -> None:
    """No helper (nor a virtiofsd worker), no socket, no key, no transient TPM state."""
    assert not [p for p in pids if alive(p)], machine
    runtime = Path(str(machine["runtimeDirectory"]))
    left = sorted(p.name for p in runtime.iterdir())
    assert not [n for n in left if n.startswith("sock-") or n.endswith((".sock", "-tpm", "-ed25519", ".pub"))], left
    assert not [n for n in left if stat.S_ISSOCK(os.lstat(runtime / n).st_mode)], left
    assert "payload" not in left, left  # SMBIOS credential files (the public key) go too
    assert machine["sshPrivateKeyPath"] == ""


@pytest.fixture
def shares(tmp_path: Path) -> Iterator[dict[str, Path]]:
    root, rw, ro = tmp_path / "rootdir", tmp_path / "rw", tmp_path / "ro"
    for path in (root, rw, ro):
        path.mkdir()
    (root / "marker").write_text("root-share-marker\n")
    (ro / "existing").write_text("x\n")
    yield {"root": root, "rw": rw, "ro": ro}


def spec_with_shares(name: str, guest: Guest, shares: dict[str, Path], **extra: object) -> dict[str, object]:
    return {
        "name": name,
        "kvm": False,
        "ram": 256 * MIB,
        "linux": str(guest.kernel),
        "initrds": [str(guest.initrd)],
        "kernelCmdline": ["vmspawnd_test.mode=wait"],
        "binds": [
            {"source": str(shares["rw"]), "target": "/mnt/rw", "readOnly": False},
            {"source": str(shares["ro"]), "target": "/mnt/ro", "readOnly": True},
        ],
        **extra,
    }


def test_tpm_shares_and_key_reach_guest_and_a_dead_helper_ends_the_vm(
    daemon: Daemon, guest: Guest, shares: dict[str, Path]
) -> None:
    state = shares["root"].parent / "rootdir.tpmstate"
    with no_leaks(daemon), EventStream(daemon) as events:
        spec = spec_with_shares("helpers", guest, shares, directory=str(shares["root"]), tpm=True)
        machine = daemon.call("Spawn", {"spec": spec})["machine"]
        pids = helper_pids(machine)
        assert sorted(pids) == ["swtpm", "virtiofsd-mnt0", "virtiofsd-mnt1", "virtiofsd-root"]
        workers = [w for p in pids.values() for w in children_of(p)]
        key = Path(machine["sshPrivateKeyPath"])
        assert key.name == "helpers-ed25519" and stat.S_IMODE(key.stat().st_mode) == 0o600
        public = key.with_name(key.name + ".pub")
        fingerprint = subprocess.run(["ssh-keygen", "-l", "-f", str(public)], capture_output=True, text=True, check=False)
        assert fingerprint.returncode == 0, fingerprint.stderr
        with Console(machine) as console:
            console.wait_for(r"VMSPAWND-TEST: facts-done")
            facts = unique_facts(console)

        # TPM: both device nodes, and PCR 0 of the sha256 bank read through sysfs.
        assert facts["tpm"] == ["/dev/tpm0 /dev/tpmrm0"]
        pcr0 = facts["pcr-sha256-0"][0]
        assert len(pcr0) == 64 and int(pcr0, 16) >= 0
        # Persistent state beside the directory (auto), manufactured by this start.
        assert (state / "tpm2-00.permall").exists() and stat.S_IMODE(state.stat().st_mode) == 0o700
        assert "Not overwriting" not in (Path(machine["runtimeDirectory"]) / "swtpm_setup.log").read_text()

        # The -D root and the shares, where the kernel command line asked.
        cmdline = facts["cmdline"][0].split()
        assert {"root=root", "rootfstype=virtiofs", "rw"} <= set(cmdline)
        assert facts["root-marker"] == ["root-share-marker"]
        assert "marker" in facts["root-listing"][0].split()
        mounts = by_first_word(facts["mount"])
        assert mounts["mnt0"][0] == "/mnt/rw" and "rw" in mounts["mnt0"][1].split(",")
        assert mounts["mnt1"][0] == "/mnt/ro" and "ro" in mounts["mnt1"][1].split(",")
        writes = by_first_word(facts["write"])
        assert writes["/mnt/rw"] == ["ok"] and writes["/mnt/ro"] == ["failed"]
        assert writes["/mnt/root"] == ["ok"]

        # The public key reached the guest as vmspawn's credential, with the sshd drop-in.
        credentials = smbios_credentials(facts)
        assert credentials["ssh.ephemeral-authorized_keys-all"] == public.read_bytes()
        assert b"ImportCredential=ssh.ephemeral-authorized_keys-all" in credentials["systemd.unit-dropin.sshd-vsock@.service"]

        # swtpm dies: the VM ends as failed, naming it; nothing of the VM remains.
        os.kill(pids["swtpm"], signal.SIGKILL)
        events.wait_state("helpers", "failed")
        machine = daemon.call("Describe", {"name": "helpers"})["machine"]
        assert machine["reason"] == "helper swtpm exited (killed by SIGKILL)", machine["reason"]
        assert_nothing_remains(machine, [*pids.values(), *workers])
        assert not key.exists() and not public.exists()
        assert state.exists()  # persistent TPM state stays
        daemon.call("Remove", {"name": "helpers"})


def test_second_boot_reuses_tpm_state_and_a_dead_virtiofsd_ends_the_vm(
    daemon: Daemon, guest: Guest, shares: dict[str, Path]
) -> None:
    state = shares["root"].parent / "rootdir.tpmstate"
    with no_leaks(daemon), EventStream(daemon) as events:
        for round_ in ("first", "second"):
            spec = spec_with_shares(f"again-{round_}", guest, shares, directory=str(shares["root"]), tpm=True)
            spec["kernelCmdline"] = ["vmspawnd_test.mode=ignore-acpi"]
            if round_ == "first":
                # Only manufacture: the VM is stopped at once (QEMU starts paused by -S
                # anyway; the guest need not boot for the state to exist).
                daemon.call("Spawn", {"spec": spec})
                daemon.call("Terminate", {"name": "again-first"})
                daemon.call("Remove", {"name": "again-first"})
                permall = (state / "tpm2-00.permall").stat()
                continue
            machine = daemon.call("Spawn", {"spec": spec})["machine"]
        setup_log = (Path(machine["runtimeDirectory"]) / "swtpm_setup.log").read_text()
        assert "Not overwriting existing state file" in setup_log  # not manufactured again
        assert "Starting vTPM manufacturing" not in setup_log
        assert (state / "tpm2-00.permall").stat().st_ino == permall.st_ino
        pids = helper_pids(machine)
        with Console(machine) as console:
            console.wait_for(r"VMSPAWND-TEST: ignoring-acpi")
            facts = unique_facts(console)
        assert facts["tpm"] == ["/dev/tpm0 /dev/tpmrm0"]

        # The virtiofsd serving /mnt/ro dies (its worker: the process we started only
        # waits for it in its sandbox and exits with its status).
        workers = children_of(pids["virtiofsd-mnt1"])
        assert workers, "virtiofsd runs its namespace-sandboxed worker"
        os.kill(workers[0], signal.SIGKILL)
        events.wait_state("again-second", "failed")
        machine = daemon.call("Describe", {"name": "again-second"})["machine"]
        assert machine["reason"].startswith("helper virtiofsd-mnt1 exited"), machine["reason"]
        assert_nothing_remains(machine, [*pids.values(), *workers])
        daemon.call("Remove", {"name": "again-second"})


def test_two_vms_share_nothing_and_qemu_sigkill_leaves_nothing(daemon: Daemon, guest: Guest, shares: dict[str, Path]) -> None:
    with no_leaks(daemon), EventStream(daemon) as events:
        machines = {}
        for name in ("twin-a", "twin-b"):
            spec = spec_with_shares(name, guest, shares, tpm=True, tpmState="off")
            machines[name] = daemon.call("Spawn", {"spec": spec})["machine"]
        a, b = machines["twin-a"], machines["twin-b"]
        dirs = {name: Path(m["runtimeDirectory"]) for name, m in machines.items()}
        assert dirs["twin-a"] != dirs["twin-b"]
        for name, directory in dirs.items():
            assert (directory / f"{name}-tpm" / "tpm2-00.permall").exists()  # transient, per VM
        # Each VM's helper sockets are its own: tpm.sock and one sock-* per share in its directory.
        for name, directory in dirs.items():
            helper_sockets = sorted(p.name for p in directory.iterdir() if p.is_socket() and p.name.startswith(("sock-", "tpm")))
            assert len(helper_sockets) == 3 and "tpm.sock" in helper_sockets, (name, helper_sockets)
        assert set(helper_pids(a).values()).isdisjoint(helper_pids(b).values())

        pids = {name: [*helper_pids(m).values()] for name, m in machines.items()}
        for started in pids.values():
            started += [w for p in list(started) for w in children_of(p)]
        os.kill(a["qemu"]["pid"], signal.SIGKILL)
        events.wait_state("twin-a", "failed")
        a = daemon.call("Describe", {"name": "twin-a"})["machine"]
        assert "SIGKILL" in a["reason"]
        assert_nothing_remains(a, pids["twin-a"])
        assert not (dirs["twin-a"] / "twin-a-tpm").exists()  # --tpm-state=off leaves nothing
        # The other VM is untouched.
        assert all(alive(p) for p in pids["twin-b"])
        assert daemon.call("Describe", {"name": "twin-b"})["machine"]["state"] in ("running", "ready")
        daemon.call("Terminate", {"name": "twin-b"})
        b = daemon.call("Describe", {"name": "twin-b"})["machine"]
        assert_nothing_remains(b, pids["twin-b"])
        assert not (dirs["twin-b"] / "twin-b-tpm").exists()
        for name in machines:
            daemon.call("Remove", {"name": name})


def test_failed_start_stops_the_helpers_it_started(daemon: Daemon, guest: Guest, shares: dict[str, Path]) -> None:
    """QEMU refusing its command line unwinds swtpm, virtiofsd and the keys, leaving nothing."""
    before = {p for p in Path("/proc").iterdir() if p.name.isdigit()}
    with no_leaks(daemon):
        spec = spec_with_shares("unwind", guest, shares, tpm=True, tpmState="off", qemuExtra=["-no-such-option"])
        with pytest.raises(Exception) as info:
            daemon.call("Spawn", {"spec": spec})
        assert "StartFailed" in str(info.value) or "StartFailed" in repr(info.value)
    started = {p for p in Path("/proc").iterdir() if p.name.isdigit()} - before
    mine = str(daemon.runtime_dir).encode()  # other engineers' daemons may run helpers too
    leftovers = []
    for proc in started:
        try:
            if mine in (proc / "cmdline").read_bytes():
                leftovers.append(proc.name)
        except OSError:
            pass
    assert not leftovers


def test_unsupported_key_type_and_id_mapping_are_refused_clearly(daemon: Daemon, guest: Guest, shares: dict[str, Path]) -> None:
    with no_leaks(daemon):
        with pytest.raises(Exception) as info:
            daemon.call("Spawn", {"spec": spec_with_shares("badkey", guest, shares, sshKeyType="dsa")})
        assert "sshKeyType" in str(getattr(info.value, "parameters", info.value))
        if os.access("/usr/lib/qemu/virtiofsd", os.X_OK) and not any(
            os.access(p, os.X_OK) for p in ("/usr/libexec/virtiofsd", "/usr/lib/virtiofsd")
        ):
            spec = spec_with_shares("idmap", guest, shares, directory=str(shares["root"]), privateUsers="100000")
            with pytest.raises(Exception) as info:
                daemon.call("Spawn", {"spec": spec})
            assert "/usr/lib/qemu/virtiofsd" in str(getattr(info.value, "parameters", info.value))


def test_bind_user_needs_id_translation_and_says_which_binary_lacks_it(
    daemon: Daemon, guest: Guest, shares: dict[str, Path]
) -> None:
    """--bind-user maps the host UID to the VM's; bookworm's C virtiofsd cannot (the Rust one can:
    its records and argv are unit-tested). The refusal names the binary and leaves nothing."""
    if not os.access("/usr/lib/qemu/virtiofsd", os.X_OK) or any(
        os.access(p, os.X_OK) for p in ("/usr/libexec/virtiofsd", "/usr/lib/virtiofsd")
    ):
        pytest.skip("needs QEMU's C virtiofsd as the only virtiofsd")
    with no_leaks(daemon):
        spec = spec_with_shares("bounduser", guest, shares, bindUsers=["daemon"])  # home /usr/sbin exists
        with pytest.raises(VarlinkError) as info:
            daemon.call("Spawn", {"spec": spec})
    assert info.value.name == "io.vmspawnd.Manager.InvalidSpec"
    assert info.value.parameters["field"] == "bindUsers"
    assert "/usr/lib/qemu/virtiofsd" in str(info.value.parameters["reason"])
