# SPDX-License-Identifier: LGPL-2.1-or-later
"""--bind-user: records, credentials and home shares, from an injected user database."""

from __future__ import annotations

import json

import pytest

from vmspawnd.errors import InvalidSpec
from vmspawnd.helpers import bind_user
from vmspawnd.helpers.virtiofsd import Dialect, Share, Virtiofsd, add_bind_user_shares, virtiofsd_argv

USERS = {
    "alice": bind_user.HostUser("alice", 1000, 1000, "Alice A.,room 1,,", "/home/alice", "/bin/zsh", "$y$j9T$salt$hash"),
    "bob": bind_user.HostUser("bob", 1001, 100, "", "/home/bob", "/bin/bash", None),
    "root": bind_user.HostUser("root", 0, 0, "root", "/root", "/bin/bash", "$6$x"),
}


def lookup(name: str) -> bind_user.HostUser:
    return USERS[name]


def test_ids_come_from_systemds_bind_user_range_in_order_without_duplicates() -> None:
    bound = bind_user.bind_users(["bob", "alice", "bob"], lookup)
    assert [(b.host.name, b.vm_id) for b in bound] == [("bob", 60514), ("alice", 60515)]
    assert bound[1].vm_home == "/run/vmhost/home/alice"


@pytest.mark.parametrize(("name", "reason"), [("carol", "no user 'carol' on the host"), ("root", "root cannot be bound")])
def test_unknown_users_and_root_are_refused(name: str, reason: str) -> None:
    with pytest.raises(InvalidSpec) as info:
        bind_user.bind_users([name], lookup)
    assert info.value.field == "bindUsers[0]" and reason in info.value.reason


@pytest.mark.parametrize(("shell", "expected"), [(None, None), ("no", None), ("yes", "/bin/zsh"), ("/bin/sh", "/bin/sh")])
def test_user_record_is_minimized_and_adjusted_to_the_vm(shell: str | None, expected: str | None) -> None:
    (alice,) = bind_user.bind_users(["alice"], lookup)
    record = bind_user.user_record(alice, shell, ["wheel", "kvm"])
    assert record["uid"] == record["gid"] == 60514  # the first bound user
    assert record["homeDirectory"] == "/run/vmhost/home/alice"
    assert record["realName"] == "Alice A."
    assert record["memberOf"] == ["wheel", "kvm"]
    assert record["privileged"] == {"hashedPassword": ["$y$j9T$salt$hash"]}
    assert record.get("shell") == expected


def test_credentials_carry_user_and_group_records() -> None:
    bound = bind_user.bind_users(["bob"], lookup)
    creds = dict(bind_user.credentials(bound, None, []))
    user = json.loads(creds["userdb.transient.user.bob"])
    group = json.loads(creds["userdb.transient.group.bob"])
    assert user["userName"] == "bob" and "privileged" not in user and "shell" not in user
    assert group == {"groupName": "bob", "gid": 60514, "disposition": "regular"}
    assert creds["userdb.transient.user.bob"].endswith(b"\n")


def test_homes_are_shared_after_the_binds_with_a_one_id_map() -> None:
    shares, words = add_bind_user_shares([Share("mnt0", "/srv")], ["w"], bind_user.bind_users(["alice", "bob"], lookup))
    assert [(s.tag, s.source, s.uid_map) for s in shares[1:]] == [
        ("mnt1", "/home/alice", (60514, 1000, 1)),
        ("mnt2", "/home/bob", (60515, 1001, 1)),
    ]
    assert words[1:] == [
        'systemd.mount-extra="mnt1:/run/vmhost/home/alice:virtiofs:rw"',
        'systemd.mount-extra="mnt2:/run/vmhost/home/bob:virtiofs:rw"',
    ]
    rust = Virtiofsd("/usr/libexec/virtiofsd", Dialect.RUST)
    argv = virtiofsd_argv(rust, shares[1], 3)
    assert argv[argv.index("--translate-uid") + 1] == "map:60514:1000:1"
    assert argv[argv.index("--translate-gid") + 1] == "map:60514:1000:1"


def test_a_user_without_a_home_is_refused_by_its_own_option() -> None:
    """nobody's home is /nonexistent: the error names --bind-user and the home, not a share."""
    bound = bind_user.bind_users(["bob", "alice"], lookup)
    with pytest.raises(InvalidSpec) as info:
        bind_user.check_homes(bound, lambda path: path != "/home/alice")
    assert info.value.field == "bindUsers[1]"
    assert "--bind-user=alice" in info.value.reason and "/home/alice does not exist" in info.value.reason
    bind_user.check_homes(bound, lambda path: True)  # homes that exist pass
