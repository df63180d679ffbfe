# SPDX-License-Identifier: LGPL-2.1-or-later
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmspawnd.errors import InvalidSpec
from vmspawnd.model import MachineRecord, MachineState
from vmspawnd.spec import VmSpec

paths = st.text(min_size=1).map(lambda s: "/" + s.replace("\0", ""))


@given(
    name=st.from_regex(r"[a-z][a-z0-9-]{0,20}[a-z0-9]", fullmatch=True),
    linux=paths,
    initrds=st.lists(paths, max_size=3),
    ram=st.integers(min_value=1, max_value=2**40),
    kvm=st.none() | st.booleans(),
    words=st.lists(st.text().filter(lambda w: "\n" not in w and "\0" not in w), max_size=4),
)
def test_spec_json_round_trip(name: str, linux: str, initrds: list[str], ram: int, kvm: bool | None, words: list[str]) -> None:
    spec = VmSpec(name=name, linux=linux, initrds=initrds, ram=ram, kvm=kvm, kernel_cmdline=words)
    assert VmSpec.from_json(spec.to_json()) == spec


def test_defaults_stay_off_the_wire() -> None:
    assert VmSpec(name="a", linux="/k").to_json() == {"name": "a", "linux": "/k"}


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"linux": "/k", "ram": "2G"}, "ram"),
        ({"linux": "/k", "initrds": "/i"}, "initrds"),
        ({"linux": "/k", "initrds": ["/i", 3]}, "initrds[1]"),
        ({"linux": "/k", "extra_drives": []}, "extra_drives"),
        ({"linux": "/k", "kvm": "yes"}, "kvm"),
    ],
)
def test_wrong_types_name_the_field(data: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidSpec) as info:
        VmSpec.from_json(data)
    assert info.value.field == field


def test_default_name_comes_from_the_image() -> None:
    assert VmSpec(image="/var/lib/machines/fedora_41.raw").machine_name() == "fedora41"
    with pytest.raises(InvalidSpec):
        VmSpec(linux="/k").machine_name()


def test_record_round_trip_and_transitions() -> None:
    record = MachineRecord(name="a", id="0011aabb", uid=0, spec={"linux": "/k"})
    record.enter(MachineState.STARTING)
    record.enter(MachineState.RUNNING)
    assert MachineRecord.from_json(record.to_json()) == record
    with pytest.raises(AssertionError):
        record.enter(MachineState.STARTING)


@pytest.mark.parametrize("cpus", ["0", "2,cores=0", "2,foo=1", "", "1 2"])
def test_cpus_follow_qemus_smp_rules_on_the_daemon_side_too(cpus: str) -> None:
    """A raw Varlink caller gets the CLI's check (parsers.parse_smp) as InvalidSpec{cpus}."""
    with pytest.raises(InvalidSpec) as info:
        VmSpec(name="vm", linux="/k", cpus=cpus).validate()
    assert info.value.field == "cpus" and "expected a QEMU -smp value" in info.value.reason
