# SPDX-License-Identifier: LGPL-2.1-or-later
"""Snapshot bundles on disk: their layout and the daemon's store of them.

A bundle is a directory (0700; every file 0600: the state file holds the guest's memory,
keys and all):

    bundle.json   the SnapshotRecord (format version, QEMU version, spec, normalized argv),
                  written last: a directory without it is an unfinished bundle
    state         the migration stream QEMU wrote (devices, RAM, the TPM's state)
    disk.raw      the guest's disk frozen while it was paused (absent without a disk)
    efivars.fd    the guest's NVRAM (absent without secure-boot firmware)

The store is `STATE/snapshots/NAME/`, with STATE the daemon's state directory
(`--state-dir`), so bundles outlive the daemon; a bundle given by path (`--output`) lives
where its owner put it and is referred to by that absolute path.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path

from vmspawnd.errors import InvalidSpec, NoSuchSnapshot
from vmspawnd.model import SNAPSHOT_FORMAT_VERSION, SnapshotRecord
from vmspawnd.runtime_dir import make_private_dir, read_json, write_json_atomic
from vmspawnd.spec import check_machine_name

_log = logging.getLogger(__name__)

METADATA = "bundle.json"
STATE = "state"
DISK = "disk.raw"
NVRAM = "efivars.fd"


def write_metadata(bundle: Path, record: SnapshotRecord) -> None:
    """Complete the bundle: its record, atomically, 0600."""
    write_json_atomic(bundle / METADATA, {"version": SNAPSHOT_FORMAT_VERSION, "snapshot": record.to_json()})


def read_metadata(bundle: Path, reference: str) -> SnapshotRecord:
    """The bundle's record; NoSuchSnapshot when there is no finished bundle there."""
    try:
        data = read_json(bundle / METADATA)
    except (FileNotFoundError, NotADirectoryError):
        raise NoSuchSnapshot(reference) from None
    except (OSError, ValueError) as exc:
        raise InvalidSpec("fromSnapshot", f"unreadable snapshot bundle {reference!r}: {exc}") from None
    if not isinstance(data, dict) or data.get("version") != SNAPSHOT_FORMAT_VERSION:
        version = data.get("version") if isinstance(data, dict) else None
        raise InvalidSpec(
            "fromSnapshot", f"snapshot bundle {reference!r} has format version {version!r}, not {SNAPSHOT_FORMAT_VERSION}"
        )
    try:
        record = SnapshotRecord.from_json(data["snapshot"])
    except (KeyError, TypeError) as exc:
        raise InvalidSpec("fromSnapshot", f"unreadable snapshot bundle {reference!r}: {exc}") from None
    record.path = str(bundle)  # a bundle directory that was moved is still itself
    return record


class BundleStore:
    """The daemon's bundles, one directory each under `root` (0700)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _ensure_root(self) -> None:
        self.root.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        make_private_dir(self.root)

    def locate(self, reference: str) -> Path:
        """A bundle by name (in the store) or by absolute path (--output)."""
        if reference.startswith("/"):
            return Path(reference)
        check_machine_name(reference, field="bundle")
        return self.root / reference

    def new_bundle(self, name: str | None, output: str | None) -> Path:
        """A new, empty bundle directory (0700): `output` if given (absent or empty), else
        `name` in the store (refused if taken)."""
        if output is not None:
            if not output.startswith("/"):
                raise InvalidSpec("output", f"must be an absolute path, got {output!r}")
            path = Path(output)
            if path.exists() and (not path.is_dir() or any(path.iterdir())):
                raise InvalidSpec("output", f"{output} exists and is not an empty directory")
            make_private_dir(path)
            return path
        assert name is not None
        check_machine_name(name, field="bundle")
        self._ensure_root()
        path = self.root / name
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            raise InvalidSpec("bundle", f"a snapshot named {name!r} exists already (remove it first)") from None
        return path

    def load(self, reference: str) -> SnapshotRecord:
        return read_metadata(self.locate(reference), reference)

    def list(self) -> list[SnapshotRecord]:
        """The finished bundles in the store, by name; unfinished ones are skipped (a save
        in progress, or one a crash cut short: `remove` deletes those)."""
        if not self.root.is_dir():
            return []
        records = []
        for entry in sorted(self.root.iterdir(), key=lambda p: p.name):
            if entry.is_dir() and not entry.is_symlink() and (entry / METADATA).exists():
                with contextlib.suppress(InvalidSpec, NoSuchSnapshot):
                    records.append(read_metadata(entry, entry.name))
        return records

    def remove(self, reference: str) -> None:
        """Delete a bundle (finished or not); NoSuchSnapshot if there is none."""
        path = self.locate(reference)
        if path.is_symlink() or not path.is_dir():
            raise NoSuchSnapshot(reference)
        if reference.startswith("/") and not (path / METADATA).exists():
            # Never delete a directory given by path that is not a bundle of ours.
            raise NoSuchSnapshot(reference)
        shutil.rmtree(path)
