# SPDX-License-Identifier: LGPL-2.1-or-later
"""Who may do what: only the instance's owner calls io.vmspawnd.Manager; files are private;
planted symlinks are refused, never followed.

Two throw-away system users are created for the module (and deleted after it). Clients
and the user instance run as those users through /usr/bin/python3 with this checkout and
the dev venv's site-packages on PYTHONPATH: the dev interpreter lives under /root, which
other users cannot enter, and nothing here needs /root opened up.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from vmspawnctl.varlink import JsonObject

from tests.guest.build import Guest
from tests.support import MANAGER, Daemon, kill_leftovers, make_runtime_dir, qemu_processes, wait_notify

MIB = 1024 * 1024
REPO = Path(__file__).resolve().parents[2]
SYSTEM_PYTHON = "/usr/bin/python3"
# Called by every test user: one JSON line per call, the reply's keys or the error's name.
CLIENT = r"""
import errno, json, sys
from vmspawnctl.varlink import Connection, ConnectionFailed, VarlinkError
address, calls = sys.argv[1], json.loads(sys.argv[2])
for method, params, more in calls:
    try:
        with Connection(address, timeout=120) as conn:
            conn.send(method, params, more=more)
            reply = conn.receive()
            print(json.dumps({"ok": reply.get("parameters") or {}}))
    except VarlinkError as exc:
        print(json.dumps({"error": exc.name}))
    except ConnectionFailed as exc:
        print(json.dumps({"connect": str(exc)}))
"""


@pytest.fixture(scope="module", autouse=True)
def system_python() -> None:
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip("needs /usr/bin/python3 for the unprivileged processes")


def python_path() -> str:
    site = next(p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir())
    return os.pathsep.join([str(REPO), str(REPO / "clients"), site])


@contextlib.contextmanager
def system_user(tag: str) -> Iterator[pwd.struct_passwd]:
    name = f"vmspawnd-test-{tag}{os.getpid() % 100000}"
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True, capture_output=True
    )
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)


@pytest.fixture(scope="module")
def alice() -> Iterator[pwd.struct_passwd]:
    with system_user("a") as user:
        yield user


@pytest.fixture(scope="module")
def bob() -> Iterator[pwd.struct_passwd]:
    with system_user("b") as user:
        yield user


def as_user(user: pwd.struct_passwd) -> Callable[[], None]:
    def drop() -> None:
        os.setgroups([])
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)

    return drop


def user_env(user: pwd.struct_passwd, runtime_base: Path) -> dict[str, str]:
    return {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": str(runtime_base),
        "XDG_RUNTIME_DIR": str(runtime_base),
        "PYTHONPATH": python_path(),
        "PYTHONDONTWRITEBYTECODE": "1",
        "USER": user.pw_name,
    }


def calls_as(user: pwd.struct_passwd, address: str, calls: list[tuple[str, dict[str, object], bool]]) -> list[JsonObject]:
    result = subprocess.run(
        [SYSTEM_PYTHON, "-c", CLIENT, address, json.dumps(calls)],
        preexec_fn=as_user(user),
        env=user_env(user, Path("/nonexistent")),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def manager_methods(daemon_call: Callable[[str, dict[str, object]], JsonObject]) -> list[str]:
    """Every method the interface declares, from the daemon's own introspection."""
    idl = str(daemon_call("org.varlink.service.GetInterfaceDescription", {"interface": MANAGER})["description"])
    return re.findall(r"^method (\w+)\(", idl, re.M)


STREAMING = {"SubscribeEvents", "HoldMachine"}


def every_call(methods: list[str], name: str, kernel: str) -> list[tuple[str, dict[str, object], bool]]:
    """Each method with parameters it would accept from the owner."""
    special: dict[str, dict[str, object]] = {
        "Spawn": {"spec": {"name": "intruder", "kvm": False, "ram": 128 * MIB, "linux": kernel}},
        "List": {},
        "SubscribeEvents": {},
        "Kill": {"name": name, "signal": 9},
        "OpenConsole": {"name": name, "mode": "interactive", "force": True},
        "PowerOff": {"name": name, "deadline": 0},
    }
    return [(f"{MANAGER}.{m}", special.get(m, {"name": name}), m in STREAMING) for m in methods]


def guest_spec(guest: Guest, name: str, **extra: object) -> dict[str, object]:
    return {
        "name": name,
        "kvm": False,
        "ram": 128 * MIB,
        "linux": str(guest.kernel),
        "initrds": [str(guest.initrd)],
        "kernelCmdline": ["vmspawnd_test.mode=wait"],
        **extra,
    }


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


# --- (a) the system instance refuses other users, on every method -----------------------------


@pytest.mark.vm
def test_created_user_is_denied_every_method_of_the_system_instance(
    daemon: Daemon, alice: pwd.struct_passwd, guest: Guest
) -> None:
    with daemon.connect() as conn:
        methods = manager_methods(conn.call)
    assert {
        "Spawn",
        "List",
        "Describe",
        "PowerOff",
        "Terminate",
        "Kill",
        "Remove",
        "SubscribeEvents",
        "OpenConsole",
        "HoldMachine",
    } <= set(methods), methods
    daemon.call("Spawn", {"spec": guest_spec(guest, "rootvm")})
    try:
        before = daemon.call("Describe", {"name": "rootvm"})["machine"]
        results = calls_as(alice, daemon.address, every_call(methods, "rootvm", str(guest.kernel)))
        assert len(results) == len(methods)
        leaked = {m: r for m, r in zip(methods, results, strict=True) if r != {"error": f"{MANAGER}.PermissionDenied"}}
        assert leaked == {}, leaked
        after = daemon.call("Describe", {"name": "rootvm"})["machine"]
        assert after["state"] == before["state"] and after["state"] in ("running", "ready"), (before, after)
        assert after["qemu"]["pid"] == before["qemu"]["pid"] and after["qemu"]["pid"] in qemu_processes()
        assert [m["name"] for m in daemon.call("List")["machines"]] == ["rootvm"]
        # Introspection stays public.
        info = calls_as(alice, daemon.address, [("org.varlink.service.GetInfo", {}, False)])
        assert info[0]["ok"]["product"] == "vmspawnd"
    finally:
        daemon.call("Terminate", {"name": "rootvm"})
        daemon.call("Remove", {"name": "rootvm"})


# --- (c) private files -------------------------------------------------------------------------


@pytest.mark.vm
def test_runtime_files_are_private(daemon: Daemon, guest: Guest) -> None:
    secret = base64.b64encode(b"hunter2").decode()
    machine = daemon.call("Spawn", {"spec": guest_spec(guest, "private", credentials=[{"id": "password", "data": secret}])})[
        "machine"
    ]
    try:
        directory = Path(str(machine["runtimeDirectory"]))
        assert mode(daemon.runtime_dir / "machines") == 0o700
        assert mode(directory) == 0o700
        assert mode(directory / "payload") == 0o700
        payloads = list((directory / "payload").iterdir())
        assert payloads, "the credential should be an SMBIOS payload file"
        assert {p.name: mode(p) for p in payloads} == {p.name: 0o600 for p in payloads}
        assert b"hunter2" not in Path(f"/proc/{machine['qemu']['pid']}/cmdline").read_bytes()
        assert mode(directory / "state.json") & 0o077 == 0
        # Everything else in the VM's directory too: every directory 0700, every socket 0600,
        # and no file that others could read (logs: console history may hold what was typed
        # at a prompt). swtpm writes its state 0640 (its default, `--tpmstate dir=D,mode=`):
        # the group bit is allowed there only, inside a 0700 directory.
        public = {}
        for path in directory.rglob("*"):
            bits, st = mode(path), os.lstat(path)
            swtpm_state = path.parent.name.endswith("tpm") and stat.S_ISREG(st.st_mode)
            allowed = 0o700 if stat.S_ISDIR(st.st_mode) else 0o640 if swtpm_state else 0o600
            if stat.S_ISLNK(st.st_mode) or bits & ~allowed or (stat.S_ISDIR(st.st_mode) and bits != 0o700):
                public[str(path.relative_to(directory))] = oct(bits)
        assert public == {}, public
        assert mode(daemon.runtime_dir / "lock") & 0o077 == 0
        assert mode(daemon.socket_path) == 0o666  # so that others get a typed PermissionDenied
    finally:
        daemon.call("Terminate", {"name": "private"})
        daemon.call("Remove", {"name": "private"})


# --- (d) planted symlinks --------------------------------------------------------------------


@pytest.mark.vm
def test_symlinked_state_json_is_replaced_not_written_through(daemon: Daemon, guest: Guest, tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("untouched\n")
    machine = daemon.call("Spawn", {"spec": guest_spec(guest, "planted")})["machine"]
    try:
        state = Path(str(machine["runtimeDirectory"])) / "state.json"
        state.unlink()
        state.symlink_to(target)
        daemon.call("Terminate", {"name": "planted"})  # a state change: state.json is rewritten
        assert target.read_text() == "untouched\n"
        assert not state.is_symlink() and json.loads(state.read_text())["machine"]["state"] == "stopped"
    finally:
        with contextlib.suppress(Exception):
            daemon.call("Terminate", {"name": "planted"})
        daemon.call("Remove", {"name": "planted"})
    assert target.read_text() == "untouched\n"


@pytest.mark.parametrize("planted", ["machines", "lock", "io.vmspawnd.Manager"])
def test_daemon_refuses_symlinks_planted_in_its_runtime_dir(planted: str, tmp_path: Path) -> None:
    """A fresh daemon finds a symlink where it keeps machines/, its lock or its socket: it
    must refuse to start (or replace nothing), and the link's target stays as it was."""
    runtime = make_runtime_dir()
    try:
        target = tmp_path / "target"
        target.mkdir() if planted == "machines" else target.write_text("untouched\n")
        (runtime / planted).symlink_to(target)
        log = runtime.parent / "run.log"
        with open(log, "wb") as out:
            result = subprocess.run(
                [sys.executable, "-m", "vmspawnd.daemon", f"--runtime-dir={runtime}"], stdout=out, stderr=out, timeout=60
            )
        assert result.returncode != 0, log.read_text()
        why = {
            "machines": "is not a directory",
            "lock": "Too many levels of symbolic links",
            "io.vmspawnd.Manager": "refusing to bind over something that is not a socket",
        }[planted]
        assert why in log.read_text(), log.read_text()
        assert (runtime / planted).is_symlink()
        if planted == "machines":
            assert list(target.iterdir()) == [] and mode(target) == 0o755
        else:
            assert target.read_text() == "untouched\n"
    finally:
        kill_leftovers(runtime)
        shutil.rmtree(runtime.parent, ignore_errors=True)


# --- (b) a user instance: its owner may, another user may not ------------------------------


@pytest.fixture
def user_instance(alice: pwd.struct_passwd, guest: Guest) -> Iterator[tuple[Daemon, Path, Path]]:
    """vmspawnd run by alice in a runtime dir of hers, with a copy of the guest she can read."""
    base = Path(tempfile.mkdtemp(prefix="vmspawnd-user-", dir="/tmp"))
    base.chmod(0o755)  # like /run/user: the rest of the path is public
    home = base / "xdg"
    home.mkdir(mode=0o755)
    os.chown(home, alice.pw_uid, alice.pw_gid)
    files = base / "guest"
    files.mkdir(mode=0o755)
    kernel, initrd = files / "vmlinuz", files / "initrd"
    shutil.copyfile(guest.kernel, kernel)
    shutil.copyfile(guest.initrd, initrd)
    kernel.chmod(0o644)
    initrd.chmod(0o644)
    runtime = home / "vmspawnd"
    notify_path = base / "notify"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    notify.bind(str(notify_path))
    os.chmod(notify_path, 0o666)
    log_path = base / "daemon.log"
    with open(log_path, "wb") as log:
        env = dict(user_env(alice, home), NOTIFY_SOCKET=str(notify_path))
        process = subprocess.Popen(
            [SYSTEM_PYTHON, "-m", "vmspawnd.daemon", "--log-level=debug", "--stop-vms-on-exit"],
            stdout=log,
            stderr=log,
            env=env,
            preexec_fn=as_user(alice),
            cwd="/",
        )
    daemon = Daemon(process, runtime, runtime / "io.vmspawnd.Manager", log_path, notify)
    try:
        try:
            wait_notify(notify, "READY=1", 60)
        except TimeoutError:
            raise AssertionError(f"user instance not ready:\n{daemon.log()}") from None
        yield daemon, kernel, initrd
    finally:
        if daemon.alive():
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        kill_leftovers(runtime)
        notify.close()
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.vm
def test_user_instance_serves_its_owner_only(
    user_instance: tuple[Daemon, Path, Path], alice: pwd.struct_passwd, bob: pwd.struct_passwd
) -> None:
    daemon, kernel, initrd = user_instance
    assert daemon.runtime_dir == Path(user_env(alice, daemon.runtime_dir.parent)["XDG_RUNTIME_DIR"]) / "vmspawnd"
    spec = {
        "name": "alicevm",
        "kvm": False,
        "ram": 128 * MIB,
        "linux": str(kernel),
        "initrds": [str(initrd)],
        "kernelCmdline": ["vmspawnd_test.mode=wait"],
    }
    [spawned] = calls_as(alice, daemon.address, [(f"{MANAGER}.Spawn", {"spec": spec}, False)])
    assert "ok" in spawned, (spawned, daemon.log()[-3000:])
    machine = spawned["ok"]["machine"]
    pid = machine["qemu"]["pid"]
    try:
        assert os.stat(f"/proc/{pid}").st_uid == alice.pw_uid  # QEMU runs as alice
        assert machine["uid"] == alice.pw_uid  # the VM records its creator
        assert os.stat(daemon.runtime_dir / "machines").st_uid == alice.pw_uid
        assert mode(daemon.runtime_dir / "machines") == 0o700

        # Bob reaches the socket (the path is public) but every method is refused...
        [idl] = calls_as(bob, daemon.address, [("org.varlink.service.GetInterfaceDescription", {"interface": MANAGER}, False)])
        methods = re.findall(r"^method (\w+)\(", str(idl["ok"]["description"]), re.M)
        results = calls_as(bob, daemon.address, every_call(methods, "alicevm", str(kernel)))
        leaked = {m: r for m, r in zip(methods, results, strict=True) if r != {"error": f"{MANAGER}.PermissionDenied"}}
        assert leaked == {}, leaked
        # ...and he cannot look into her runtime directory either.
        listing = subprocess.run(
            [SYSTEM_PYTHON, "-c", f"import os; os.listdir({str(daemon.runtime_dir / 'machines')!r})"],
            preexec_fn=as_user(bob),
            env=user_env(bob, Path("/nonexistent")),
            capture_output=True,
            text=True,
        )
        assert listing.returncode != 0 and "PermissionError" in listing.stderr
        # Alice's VM is untouched, and she sees it.
        [listed] = calls_as(alice, daemon.address, [(f"{MANAGER}.List", {}, False)])
        assert [m["name"] for m in listed["ok"]["machines"]] == ["alicevm"]
        assert listed["ok"]["machines"][0]["state"] in ("running", "ready")
        assert pid in qemu_processes()
        # Root is not alice either: an instance serves its owner, nobody else.
        with pytest.raises(Exception) as info:
            daemon.call("List", timeout=30)
        assert getattr(info.value, "name", None) == f"{MANAGER}.PermissionDenied"
    finally:
        done = calls_as(
            alice,
            daemon.address,
            [(f"{MANAGER}.Terminate", {"name": "alicevm"}, False), (f"{MANAGER}.Remove", {"name": "alicevm"}, False)],
        )
        assert all("ok" in r for r in done), done
    assert pid not in qemu_processes()
