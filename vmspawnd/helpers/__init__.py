# SPDX-License-Identifier: LGPL-2.1-or-later
"""Helper processes of a VM (swtpm, virtiofsd, journal-remote) and SSH keys.

`start_helpers` runs before QEMU is built: it starts what the spec needs, each on a socket
the daemon created, and returns what the QEMU command needs from them. Everything it
acquires goes on the HelperSet's own exit stack, in systemd-vmspawn 259's order (root
virtiofsd, bind virtiofsds, swtpm, journal-remote, SSH keys; docs/reference/systemd-vmspawn.md §1.2), so teardown
runs in reverse. That stack is closed twice over: by the start stack if start fails, and by
the machine (`HelperSet.aclose`) once QEMU has exited; a successful start pops the start
stack, so the machine's call is what stops helpers of a VM that ran. The machine
supervises the returned processes: if one dies while the VM runs, the VM ends with a reason
naming it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from pathlib import Path

from vmspawnd.helpers import bind_user, journal, sshkeys, swtpm, virtiofsd
from vmspawnd.helpers.spawn import stop_helper
from vmspawnd.host.identity import VmIdentity, hand_over
from vmspawnd.host.process import ChildProcess, is_same_process
from vmspawnd.model import ProcessRecord
from vmspawnd.qemu.resources import Credential, HelperResources
from vmspawnd.spec import VmSpec
from vmspawnd.spec.discovery import native_arch


@dataclasses.dataclass
class HelperSet:
    """The helpers of one VM: their processes, and what they give QEMU (`resources`)."""

    processes: dict[str, ChildProcess] = dataclasses.field(default_factory=dict)
    resources: HelperResources = HelperResources()
    ssh_private_key_path: str = ""
    _stack: contextlib.AsyncExitStack = dataclasses.field(default_factory=contextlib.AsyncExitStack, repr=False)

    async def aclose(self) -> None:
        """Stop every helper (reverse order of start, each reaped) and delete keys and sockets.

        Idempotent: closing an exit stack empties it.
        """
        await self._stack.aclose()


async def start_helpers(
    spec: VmSpec,
    machine_name: str,
    directory: Path,
    stack: contextlib.AsyncExitStack,
    vsock_cid: int | None = None,
    identity: VmIdentity | None = None,
) -> HelperSet:
    """Start every helper the spec asks for; unwinds what it started if one fails.

    `vsock_cid` is the guest CID the machine assigned (None without vsock): journal
    forwarding listens on host port = that CID, as vmspawn. `identity`: the VM's own uid
    (a confined QEMU, docs/security.md): swtpm runs as it, and the sockets QEMU connects to
    are its. virtiofsd stays root: it serves files of every owner.
    """
    if spec.pass_ssh_key:
        sshkeys.check_key_type(spec.ssh_key_type)  # refuse before starting anything
    helpers = HelperSet()
    stack.push_async_callback(helpers.aclose)
    own = helpers._stack
    credentials: list[Credential] = []
    cmdline: list[str] = []
    tpm_socket: str | None = None

    processes, shares, words = await virtiofsd.start_virtiofsd(spec, directory, own)
    helpers.processes.update(processes)
    cmdline += words
    if identity is not None:
        for share in shares:
            hand_over(Path(share.socket_path), identity)

    tpm = await swtpm.start_swtpm(spec, machine_name, directory, native_arch(), own, identity)
    if tpm is not None:
        helpers.processes["swtpm"], sock = tpm
        tpm_socket = str(sock)

    if spec.forward_journal:
        process, credential = journal.start_journal_remote(spec.forward_journal, vsock_cid, directory, own)
        helpers.processes["journal-remote"] = process
        credentials.append(credential)

    if spec.bind_users:  # the records go with the home shares virtiofsd started above
        users = bind_user.bind_users(spec.bind_users, bind_user.lookup_host_user)
        for cred_id, data in bind_user.credentials(users, spec.bind_user_shell, spec.bind_user_groups):
            credentials.append(Credential(cred_id, data))

    if spec.pass_ssh_key:
        key_path, key_credentials = sshkeys.create_ssh_keys(machine_name, spec.ssh_key_type, directory, own)
        helpers.ssh_private_key_path = str(key_path)
        credentials += key_credentials

    helpers.resources = HelperResources(
        tpm_socket=tpm_socket, virtiofs=tuple(shares), credentials=tuple(credentials), kernel_cmdline_extra=tuple(cmdline)
    )
    return helpers


async def stop_recorded_helpers(
    helpers: dict[str, ProcessRecord], machine_name: str, directory: Path, ssh_private_key_path: str = ""
) -> None:
    """Stop a VM's helpers known only from its record (a daemon that adopted the VM after a
    restart is not their parent), in reverse order of start, and delete what start_helpers
    left in the VM directory: sockets, the transient TPM state, the key pair.

    A recorded pid whose start time or boot differs is someone else's process and is left
    alone. Adopted helpers cannot be reaped by us; they are waited for through a pidfd.
    """
    for name, record in reversed(list(helpers.items())):
        if not is_same_process(record):
            continue
        await stop_helper(ChildProcess(name, record.pid, None))
    leftovers = [directory / swtpm.SOCKET_NAME, *directory.glob("sock-*")]
    if ssh_private_key_path:
        key = Path(ssh_private_key_path)
        leftovers += [key, key.with_name(key.name + ".pub")]
    for path in leftovers:
        path.unlink(missing_ok=True)
    shutil.rmtree(directory / f"{machine_name}-tpm", ignore_errors=True)
