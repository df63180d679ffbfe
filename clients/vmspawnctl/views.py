# SPDX-License-Identifier: LGPL-2.1-or-later
"""What `list` and `status` show: Machine records (as the daemon sends them) to lines of text.

Pure: no I/O, colour passed in, so every form is testable without a terminal or a daemon.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .output import BOLD, paint, state_style

Record = Mapping[str, object]

LIST_COLUMNS = ("NAME", "STATE", "PID", "ID", "REGISTERED", "REASON")


def display_state(m: Record) -> str:
    """The state as a user reads it: a frozen VM is "paused", whatever it was before."""
    state = str(m["state"])
    return "paused" if m.get("paused") and state in ("running", "ready") else state


def _qemu_pid(m: Record) -> str:
    qemu = m.get("qemu")
    if isinstance(qemu, Mapping) and m.get("state") not in ("stopped", "failed"):
        return str(qemu.get("pid", "-"))
    return "-"


def machine_table(machines: Sequence[Record], *, legend: bool = True, colour: bool = False) -> list[str]:
    """`vmspawnctl list`: a header, one row per VM, and "N machines listed." (machinectl's
    layout); without the legend only the rows, for scripts and completion."""
    rows = [
        (
            str(m["name"]),
            display_state(m),
            _qemu_pid(m),
            str(m["id"]),
            "yes" if m.get("registered") else "no",
            str(m.get("reason") or ""),
        )
        for m in machines
    ]
    shown = [LIST_COLUMNS, *rows] if legend else rows
    widths = [max((len(r[i]) for r in shown), default=0) for i in range(len(LIST_COLUMNS))]
    lines = []
    if legend:
        lines.append(paint("  ".join(h.ljust(widths[i]) for i, h in enumerate(LIST_COLUMNS)).rstrip(), BOLD, colour))
    for row in rows:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row)]
        # Pad before painting: escape sequences have no width.
        cells[1] = paint(cells[1], state_style(row[1]), colour)
        lines.append("  ".join(cells).rstrip())
    if legend:
        lines += ["", f"{len(machines)} machine{'s' if len(machines) != 1 else ''} listed."]
    return lines


def _readiness(m: Record) -> str:
    """What "ready" rests on for this VM (the guest's READY=1, or why running counts), and
    whether it has been reached."""
    source = str(m.get("readiness") or "")
    if not source:
        return "-"
    return f"{source}; {'reached' if m.get('ready') else 'not yet'}"


def machine_status(m: Record, *, colour: bool = False) -> list[str]:
    """`vmspawnctl status NAME`: one VM, labels right-aligned as in `systemctl status`."""
    qemu = m.get("qemu") if isinstance(m.get("qemu"), Mapping) else {}
    reaper = m.get("reaper") if isinstance(m.get("reaper"), Mapping) else {}
    assert isinstance(qemu, Mapping) and isinstance(reaper, Mapping)
    state = display_state(m)
    fields: list[tuple[str, str]] = [
        ("State", paint(state, state_style(state), colour) + (f" ({m['reason']})" if m.get("reason") else "")),
        ("Readiness", _readiness(m)),
    ]
    if m.get("statusText"):
        fields.append(("Status", f'"{m["statusText"]}"'))
    fields += [
        ("Leader", f"{reaper.get('pid', '-')} (vmspawnd-reaper)" if reaper else f"{qemu.get('pid', '-')} (qemu)"),
        ("QEMU", str(qemu.get("pid", "-"))),
        ("Unit", str(m.get("unit") or "-")),
        ("Registered", "yes (systemd-machined)" if m.get("registered") else "no"),
        ("UID", str(m["uid"])),
        ("Control", str(m.get("controlAddress") or "-") + (" (io.systemd.MachineInstance)" if m.get("controlAddress") else "")),
        ("QMP", str(m.get("qmpAddress") or "-")),
        ("Console", str(m.get("consoleAddress") or "-")),
        ("Log", str(m.get("consoleLog") or "-")),
    ]
    if m.get("displayAddress"):
        fields.append(("Display", f"vnc+unix://{m['displayAddress']}"))
    if m.get("exitCode") is not None:
        fields.append(("Exit", f"status {m['exitCode']}"))
    if m.get("exitSignal") is not None:
        fields.append(("Exit", f"signal {m['exitSignal']}"))
    width = max(len(label) for label, _ in fields) + 1
    lines = [paint(f"{m['name']} ({m['id']})", BOLD, colour)]
    lines += [f"{label + ':':>{width + 1}} {value}" for label, value in fields]
    tail = str(m.get("stderrTail") or "").strip()
    if tail and m.get("state") == "failed":
        lines += ["", "QEMU said:", tail]
    return lines
