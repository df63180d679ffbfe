# SPDX-License-Identifier: LGPL-2.1-or-later
"""--forward-journal: journal-remote's command line, the credential, and the no-vsock error."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest

from vmspawnd.errors import InvalidSpec, NotSupported
from vmspawnd.helpers.journal import (
    forward_credential,
    journal_remote_argv,
    start_journal_remote,
    trampoline_argv,
    vsock_available,
)


def test_argv_and_split_mode() -> None:
    assert journal_remote_argv("/lib/systemd/systemd-journal-remote", "/var/log/vm.journal") == [
        "/lib/systemd/systemd-journal-remote",
        "--output",
        "/var/log/vm.journal",
        "--split-mode",
        "none",
    ]
    assert journal_remote_argv("jr", "/var/log/vms")[-2:] == ["--split-mode", "host"]


def test_credential_names_host_cid_and_guest_cid_port() -> None:
    credential = forward_credential(42)
    assert (credential.id, credential.data) == ("journal.forward_to_socket", b"vsock:2:42")


def test_trampoline_hands_over_fd_3_with_listen_pid(tmp_path: Path) -> None:
    """The wrapped program sees LISTEN_FDS=1, LISTEN_PID = its own pid, and the fd at 3."""
    read_fd, write_fd = os.pipe()
    try:
        probe = 'echo "$LISTEN_FDS $LISTEN_PID $$"; readlink /proc/$$/fd/3'
        argv, env = trampoline_argv(read_fd, ["/bin/sh", "-c", probe])
        out = subprocess.run(argv, env=env, pass_fds=(read_fd,), capture_output=True, text=True, check=True).stdout
        first, link = out.splitlines()
        fds, listen_pid, own_pid = first.split()
        assert fds == "1" and listen_pid == own_pid
        assert link == os.readlink(f"/proc/self/fd/{read_fd}")
    finally:
        os.close(read_fd)
        os.close(write_fd)


@pytest.mark.skipif(vsock_available(), reason="this host has vhost-vsock")
def test_without_vsock_the_error_says_so(tmp_path: Path) -> None:
    with pytest.raises(NotSupported, match="vsock"), contextlib.ExitStack():
        start_journal_remote(str(tmp_path / "vm.journal"), 3, tmp_path, contextlib.AsyncExitStack())
    assert list(tmp_path.iterdir()) == []


def test_output_must_be_absolute_and_directories_exist(tmp_path: Path) -> None:
    with pytest.raises(InvalidSpec):
        start_journal_remote("vm.journal", 3, tmp_path, contextlib.AsyncExitStack())
    with pytest.raises(InvalidSpec, match="not a directory"):
        start_journal_remote(str(tmp_path / "missing"), 3, tmp_path, contextlib.AsyncExitStack())
