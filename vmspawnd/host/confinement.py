# SPDX-License-Identifier: LGPL-2.1-or-later
"""Pure: how a VM process is started without privileges — the setpriv prefix.

util-linux's setpriv (in every Debian/Fedora base system) changes the identity, clears
supplementary groups, empties every capability set, sets no_new_privs and then execs the
program: the pid stays the same through the exec chain, so the reaper still reports the
pid of QEMU itself and adoption (pid + start time) is unchanged. Changing the uid clears
the parent-death signal the reaper set (kernel commit_creds), `--pdeathsig=keep` sets it
again after the change, so QEMU still dies with its leader.
"""

from __future__ import annotations

from collections.abc import Sequence

from vmspawnd.host.identity import VmIdentity

SETPRIV = "setpriv"


def unprivileged_prefix(identity: VmIdentity, groups: Sequence[int] = ()) -> list[str]:
    """argv words that run what follows as `identity`, with no capabilities at all.

    `groups` are supplementary groups kept on purpose (the group of /dev/kvm); none else.
    """
    argv = [SETPRIV, f"--reuid={identity.uid}", f"--regid={identity.gid}"]
    argv += [f"--groups={','.join(str(g) for g in groups)}"] if groups else ["--clear-groups"]
    argv += ["--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all", "--no-new-privs", "--pdeathsig=keep", "--"]
    return argv
