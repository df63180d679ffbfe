# SPDX-License-Identifier: LGPL-2.1-or-later
"""The orchestration of vmspawnd.host.registration: the plan decided without I/O
(docs/reference/systemd-vmspawn.md §5.1, §5.2), and the errors it catches."""

from __future__ import annotations

import pytest

from vmspawnd.errors import ALL_ERRORS, DBusCallError, VarlinkCallError, VmspawnError
from vmspawnd.host import registration as r
from vmspawnd.varlink.server import to_varlink_error


@pytest.mark.parametrize(
    ("register", "keep_unit", "booted", "expected"),
    [
        # machined never allocates the unit: vmspawnd's scope holds every process of the VM
        (None, False, True, r.Plan(register=True, required=False, own_scope=True, join_unit=False)),
        (True, False, True, r.Plan(register=True, required=True, own_scope=True, join_unit=False)),
        (False, False, True, r.Plan(register=False, required=False, own_scope=True, join_unit=False)),
        (None, True, True, r.Plan(register=True, required=False, own_scope=False, join_unit=True)),
        (None, False, False, r.Plan(register=True, required=False, own_scope=False, join_unit=False)),
        (None, True, False, r.Plan(register=True, required=False, own_scope=False, join_unit=False)),
    ],
)
def test_plan(register: bool | None, keep_unit: bool, booted: bool, expected: r.Plan) -> None:
    assert r.plan(register, keep_unit, booted) == expected


@pytest.mark.parametrize(
    ("error", "text"),
    [
        (VarlinkCallError("io.systemd.Machine.MachineExists", {}), "io.systemd.Machine.MachineExists"),
        (
            VarlinkCallError("org.varlink.service.InvalidParameter", {"parameter": "controlAddress"}),
            'org.varlink.service.InvalidParameter {"parameter": "controlAddress"}',
        ),
        (
            DBusCallError("org.freedesktop.DBus.Error.AccessDenied", "not root"),
            "org.freedesktop.DBus.Error.AccessDenied: not root",
        ),
        (DBusCallError("org.freedesktop.systemd1.NoSuchUnit"), "org.freedesktop.systemd1.NoSuchUnit"),
    ],
)
def test_internal_errors_reach_a_client_only_as_internal_error(error: VmspawnError, text: str) -> None:
    """The errors of the calls to machined and PID 1 sit under the error root, but are no API
    errors: the registration catches them, and one that escaped anyway would be answered as
    any unexpected exception is, never with a name the IDL does not declare."""
    assert isinstance(error, VmspawnError) and type(error) not in ALL_ERRORS
    assert str(error) == text  # what the logs and StartFailed messages show
    assert to_varlink_error(error).tojson() == {"error": "io.vmspawnd.Manager.InternalError", "parameters": {"message": text}}
