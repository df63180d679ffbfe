# SPDX-License-Identifier: LGPL-2.1-or-later
"""--bind-user: a host user's home and identity, transiently, inside the VM (vmspawn 259).

For each user: the host home is shared with virtiofs at /run/vmhost/home/NAME, with the
host UID/GID translated to the one assigned in the VM (a 1-ID map, so it needs a virtiofsd
that can translate IDs), and minimized JSON user and group records adjusted to that UID
and home are passed as `userdb.transient.user.NAME` / `userdb.transient.group.NAME`
credentials, where the guest's nss-systemd (systemd ≥ 258) picks them up. The record keeps
the password hash, so logins work as on the host (the man page's warning applies).

Pure: the host's user database comes in through `UserLookup`, so records are unit-tested.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable

from vmspawnd.errors import InvalidSpec

# systemd's range for users mapped in by --bind-user (docs/UIDS-GIDS.md: 60514…60577).
BIND_USER_ID_MIN = 60514
BIND_USER_ID_MAX = 60577
VM_HOME_BASE = "/run/vmhost/home"


@dataclasses.dataclass(frozen=True)
class HostUser:
    name: str
    uid: int
    gid: int
    gecos: str
    home: str
    shell: str
    hashed_password: str | None  # from the shadow database, if any


UserLookup = Callable[[str], HostUser]


@dataclasses.dataclass(frozen=True)
class BoundUser:
    host: HostUser
    vm_id: int  # UID and GID in the VM

    @property
    def vm_home(self) -> str:
        return f"{VM_HOME_BASE}/{self.host.name}"


def bind_users(names: list[str], lookup: UserLookup) -> list[BoundUser]:
    """Assign VM IDs in order; duplicates are dropped as vmspawn does."""
    unique = list(dict.fromkeys(names))
    if len(unique) > BIND_USER_ID_MAX - BIND_USER_ID_MIN + 1:
        raise InvalidSpec("bindUsers", f"at most {BIND_USER_ID_MAX - BIND_USER_ID_MIN + 1} users can be bound")
    bound = []
    for index, name in enumerate(unique):
        try:
            host = lookup(name)
        except KeyError:
            raise InvalidSpec(f"bindUsers[{index}]", f"no user {name!r} on the host") from None
        if host.uid == 0:
            raise InvalidSpec(f"bindUsers[{index}]", "root cannot be bound into a VM")
        bound.append(BoundUser(host, BIND_USER_ID_MIN + index))
    return bound


def check_homes(users: list[BoundUser], is_directory: Callable[[str], bool]) -> None:
    """Binding a user shares its home, so the home must exist. Checked before the shares
    are planned: otherwise the failure names the share (a /nonexistent "bind"), not the
    --bind-user that asked for it (system users such as nobody have no home)."""
    for index, user in enumerate(users):
        if not is_directory(user.host.home):
            raise InvalidSpec(
                f"bindUsers[{index}]",
                f"--bind-user={user.host.name}: the user's home directory {user.host.home} does not exist, "
                "and --bind-user shares it with the VM; bind a user that has a home",
            )


def user_record(user: BoundUser, shell: str | None, groups: list[str]) -> dict[str, object]:
    """The minimized record: identity, the VM's UID/GID and home, optionally shell and groups."""
    record: dict[str, object] = {
        "userName": user.host.name,
        "uid": user.vm_id,
        "gid": user.vm_id,
        "homeDirectory": user.vm_home,
        "disposition": "regular",
    }
    if user.host.gecos:
        record["realName"] = user.host.gecos.split(",", 1)[0]
    if shell == "yes":
        record["shell"] = user.host.shell
    elif shell not in (None, "no"):
        record["shell"] = shell
    if groups:
        record["memberOf"] = list(groups)
    if user.host.hashed_password:
        record["privileged"] = {"hashedPassword": [user.host.hashed_password]}
    return record


def group_record(user: BoundUser) -> dict[str, object]:
    return {"groupName": user.host.name, "gid": user.vm_id, "disposition": "regular"}


def credentials(users: list[BoundUser], shell: str | None, groups: list[str]) -> list[tuple[str, bytes]]:
    """(credential id, data): JSON records, newline-terminated as systemd writes them."""
    out = []
    for user in users:
        out.append((f"userdb.transient.user.{user.host.name}", _json(user_record(user, shell, groups))))
        out.append((f"userdb.transient.group.{user.host.name}", _json(group_record(user))))
    return out


def _json(value: object) -> bytes:
    return (json.dumps(value, separators=(",", ":")) + "\n").encode()


def lookup_host_user(name: str) -> HostUser:
    """The host's passwd entry (and shadow hash when readable: the daemon runs as root)."""
    import pwd

    entry = pwd.getpwnam(name)
    hashed = None
    try:
        with open("/etc/shadow") as shadow:
            for line in shadow:
                fields = line.split(":")
                if fields[0] == name and fields[1] not in ("", "*", "!", "!!", "x") and not fields[1].startswith("!"):
                    hashed = fields[1]
                    break
    except OSError:
        pass
    return HostUser(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_gecos, entry.pw_dir, entry.pw_shell, hashed)
