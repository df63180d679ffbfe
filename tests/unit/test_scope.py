# SPDX-License-Identifier: LGPL-2.1-or-later
"""The pure builders of vmspawnd.host.scope (the VM's unit with PID 1: the scope's
properties, the org.freedesktop.systemd1 messages, unit object paths) and ScopeStart's wait
for the start job (docs/reference/systemd-vmspawn.md §5.2)."""

from __future__ import annotations

import asyncio
import signal

import pytest
from dbus_fast import Variant
from hypothesis import given
from hypothesis import strategies as st

from vmspawnd.errors import DBusCallError
from vmspawnd.host import dbus, scope


def test_systemd_messages() -> None:
    start = scope.start_transient_unit_message("a.scope", [["Description", Variant("s", "x")]])
    assert (start.member, start.signature, start.body[0], start.body[1], start.body[3]) == (
        "StartTransientUnit",
        "ssa(sv)a(sa(sv))",
        "a.scope",
        "fail",
        [],
    )
    assert start.destination == "org.freedesktop.systemd1" and start.path == "/org/freedesktop/systemd1"
    kill = scope.kill_unit_message("a.scope")
    assert (kill.member, kill.signature, kill.body) == ("KillUnit", "ssi", ["a.scope", "all", int(signal.SIGKILL)])
    assert (scope.abandon_scope_message("a.scope").member, scope.abandon_scope_message("a.scope").signature) == (
        "AbandonScope",
        "s",
    )
    assert (scope.unref_unit_message("a.scope").member, scope.unref_unit_message("a.scope").body) == ("UnrefUnit", ["a.scope"])


@pytest.mark.parametrize(
    ("text", "escaped"),
    [("foo.scope", "foo_2escope"), ("", "_"), ("1a", "_31a"), ("a-b_c", "a_2db_5fc"), ("a1", "a1")],
)
def test_bus_label_escape(text: str, escaped: str) -> None:
    assert dbus.bus_label_escape(text) == escaped


@given(st.text(min_size=1, max_size=40))
def test_bus_label_escape_gives_valid_path_elements(text: str) -> None:
    label = dbus.bus_label_escape(text)
    assert label and all(c.isascii() and (c.isalnum() or c == "_") for c in label)
    assert not label[0].isdigit()


def test_unit_object_path() -> None:
    assert scope.unit_object_path("vm-1.scope") == "/org/freedesktop/systemd1/unit/vm_2d1_2escope"


def plain_properties(props: list[list[object]]) -> dict[object, tuple[str, object]]:
    """An `a(sv)` as {name: (signature, value)}; every value must be a Variant."""
    plain: dict[object, tuple[str, object]] = {}
    for name, v in props:
        assert isinstance(v, Variant), (name, v)
        plain[name] = (v.signature, v.value)
    return plain


def test_scope_properties() -> None:
    props = scope.scope_properties("vm1", None, [10, 11], ["TasksMax=50"], ":1.5")
    plain = plain_properties(props)
    assert plain == {
        "Description": ("s", "Virtual Machine vm1"),
        "CollectMode": ("s", "inactive-or-failed"),
        "AddRef": ("b", True),
        "Slice": ("s", "machine.slice"),
        "Before": ("as", ["vmspawnd-guests.service"]),  # stopped after the guests powered off
        "Controller": ("s", ":1.5"),
        "PIDs": ("au", [10, 11]),
        "TasksMax": ("t", 50),
    }
    with_fds = plain_properties(scope.scope_properties("vm1", "my/vms", [10, 11], [], None, 2))
    assert with_fds["PIDFDs"] == ("ah", [0, 1]) and "PIDs" not in with_fds
    assert with_fds["Slice"] == ("s", "my-vms.slice")
    assert "Controller" not in with_fds


def test_scope_unit_name_is_mangled() -> None:
    assert scope.scope_unit_name("vm1") == "vm1.scope"


def test_attach_processes_message() -> None:
    msg = scope.attach_processes_message("client.service", [10, 11])
    assert (msg.member, msg.signature, msg.body) == ("AttachProcessesToUnit", "ssau", ["client.service", "", [10, 11]])


def test_systemd_is_service_manager() -> None:
    assert scope.systemd_is_service_manager({}, lambda p: p == "/run/systemd/system")
    assert not scope.systemd_is_service_manager({}, lambda p: False)
    assert not scope.systemd_is_service_manager({"VMSPAWND_SYSTEMD_BOOTED": "0"}, lambda p: True)
    assert scope.systemd_is_service_manager({"VMSPAWND_SYSTEMD_BOOTED": "1"}, lambda p: False)


@pytest.mark.asyncio
async def test_scope_start_waits_for_its_own_job() -> None:
    """JobRemoved of other jobs does not end the wait; the scope's own "done" does."""
    results: dict[str, str] = {}
    changed = asyncio.Event()
    started = scope.ScopeStart("vm1.scope", "/org/freedesktop/systemd1/job/7", results, changed)
    waiting = asyncio.create_task(started.wait())

    def job_removed(job: str, result: str) -> None:  # what start_scope's signal handler does
        results[job] = result
        changed.set()

    await asyncio.sleep(0)  # one loop step: the waiter runs up to its first wait
    job_removed("/org/freedesktop/systemd1/job/6", "done")
    await asyncio.sleep(0)  # one more: it wakes, sees another job's end, and waits again
    assert not waiting.done() and not changed.is_set()
    job_removed("/org/freedesktop/systemd1/job/7", "done")
    await waiting


@pytest.mark.asyncio
async def test_scope_start_job_that_fails_raises() -> None:
    started = scope.ScopeStart("vm1.scope", "/job/7", {"/job/7": "failed"}, asyncio.Event())
    with pytest.raises(DBusCallError) as raised:
        await started.wait()
    assert raised.value.name == "org.freedesktop.systemd1.JobFailed"
    assert str(raised.value) == "org.freedesktop.systemd1.JobFailed: starting vm1.scope ended with 'failed'"
