# SPDX-License-Identifier: LGPL-2.1-or-later
"""Snapshot benchmark (issue #17): clone start versus cold start, and what a snapshot costs.

In one run, against one daemon and the same test guest (busybox on a raw disk, TCG):

* cold: Spawn → the guest's shell prompt on the console (a full boot);
* clone: Spawn{fromSnapshot} → the console answers a command typed at once (the computed
  `echo $((6*7))` comes back, so the guest really runs);
* snapshot: for each RAM size, the time of the Snapshot call and of QEMU's save alone,
  and the size of the state file;
* networked (as root: TAP networking): the Snapshot call of a source with a network card
  (the guest ejects it first, qemu/nic.py), and per clone Spawn → console answer and
  Spawn → the guest sees its own card (eth0 with the clone's MAC).

Nothing is asserted; the figures go to a JSON file and a markdown table on stdout.
Usage: flock /tmp/vmspawnd-vm.lock .venv/bin/python bench/snapshot.py --json=bench/results/snapshot.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "clients"))

from vmspawnctl.varlink import Connection, JsonObject

from tests.guest.build import Guest, ensure_guest
from tests.support import Console, Daemon, make_runtime_dir, start_daemon, stop_daemon, waiting_spec

MANAGER = "io.vmspawnd.Manager"
MIB = 1024 * 1024


def call(d: Daemon, method: str, params: dict[str, object] | None = None) -> JsonObject:
    with Connection(d.address, timeout=300) as conn:
        return conn.call(f"{MANAGER}.{method}", params)


def spec(guest: Guest, name: str, disk: Path, ram: int, **fields: object) -> dict[str, object]:
    # tpm off: a clone of a VM with a TPM gets its own swtpm, which the cold start would not need.
    return waiting_spec(guest, name, tpm=False, ram=ram, image=str(disk), **fields)


def end(d: Daemon, name: str) -> None:
    call(d, "Terminate", {"name": name})
    call(d, "Remove", {"name": name})


def cold_start(d: Daemon, guest: Guest, name: str, disk: Path, ram: int, **fields: object) -> tuple[float, Console]:
    """Seconds from Spawn to the shell prompt; the console is left open for the caller."""
    started = time.perf_counter()
    machine = call(d, "Spawn", {"spec": spec(guest, name, disk, ram, **fields)})["machine"]
    console = Console(machine)
    console.wait_for(r"guest# ", timeout=300)
    return time.perf_counter() - started, console


def clone_start(d: Daemon, name: str, bundle: str) -> tuple[float, float]:
    """Seconds from Spawn{fromSnapshot} to its reply, and to the console's answer."""
    started = time.perf_counter()
    machine = call(d, "Spawn", {"spec": {"name": name}, "fromSnapshot": bundle})["machine"]
    spawned = time.perf_counter() - started
    with Console(machine) as console:
        console.send("echo answer-$((6*7))\r")
        console.wait_for(r"answer-42", timeout=60)
    return spawned, time.perf_counter() - started


# Polls for the hot-plugged card from inside the guest (no round trip per poll); the marker
# is computed so that the echoed command line does not match it.
CARD_WAIT = "while [ ! -e /sys/class/net/eth0 ]; do sleep 0.01; done; echo card$((1+0))-[$(cat /sys/class/net/eth0/address)]\r"


def networked_clone_start(d: Daemon, name: str, bundle: str) -> tuple[float, float, str]:
    """Seconds from Spawn{fromSnapshot} to the console's answer and to the guest's own
    card; the MAC the guest sees."""
    started = time.perf_counter()
    machine = call(d, "Spawn", {"spec": {"name": name}, "fromSnapshot": bundle})["machine"]
    with Console(machine) as console:
        console.send("echo answer-$((6*7))\r")
        console.wait_for(r"answer-42", timeout=60)
        answered = time.perf_counter() - started
        console.send(CARD_WAIT)
        mac = console.wait_for(r"card1-\[([0-9a-f:]+)\]", timeout=60).group(1)
    return answered, time.perf_counter() - started, mac


def networked(d: Daemon, guest: Guest, disk: Path, runs: int) -> dict[str, object]:
    """The networked series (TAP: root only)."""
    _, console = cold_start(d, guest, "netsrc", disk, 256 * MIB, networkTap=True)
    started = time.perf_counter()
    call(d, "Snapshot", {"name": "netsrc", "bundle": "net", "stop": True})
    snapshot_seconds = time.perf_counter() - started
    console.close()
    call(d, "Remove", {"name": "netsrc"})
    answers: list[float] = []
    cards: list[float] = []
    macs: set[str] = set()
    for i in range(runs):
        answer, card, mac = networked_clone_start(d, f"netclone{i}", "net")
        answers.append(answer)
        cards.append(card)
        macs.add(mac)
        end(d, f"netclone{i}")
        print(f"networked clone {i}: console answer {answer:.2f}s, own card {card:.2f}s ({mac})", file=sys.stderr)
    call(d, "RemoveSnapshot", {"bundle": "net"})
    return {
        "snapshot_call_s": round(snapshot_seconds, 3),
        "clone_start_to_answer": answers,
        "clone_start_to_own_card": cards,
        "distinct_macs": len(macs),
    }


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5, help="cold starts and clone starts each (default 5)")
    p.add_argument("--rams", default="256,512,1024", help="RAM sizes in MiB for the snapshot figures")
    p.add_argument("--json", type=Path, required=True)
    args = p.parse_args()
    guest = ensure_guest()
    runtime = make_runtime_dir("vmspawnd-bench-snapshot-")
    disk = runtime.parent / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(64 * MIB)
    d = start_daemon(runtime, "--log-level=info")
    report: dict[str, object] = {}
    try:
        # Cold starts, the first of which is the snapshot's source.
        cold: list[float] = []
        for i in range(args.runs):
            seconds, console = cold_start(d, guest, f"cold{i}", disk, 256 * MIB)
            cold.append(seconds)
            if i == 0:
                call(d, "Snapshot", {"name": "cold0", "bundle": "bench"})
            console.close()
            end(d, f"cold{i}")
            print(f"cold start {i}: {seconds:.2f}s", file=sys.stderr)
        spawn: list[float] = []
        clone: list[float] = []
        for i in range(args.runs):
            s, c = clone_start(d, f"clone{i}", "bench")
            spawn.append(s)
            clone.append(c)
            end(d, f"clone{i}")
            print(f"clone start {i}: Spawn {s:.2f}s, console answer {c:.2f}s", file=sys.stderr)
        call(d, "RemoveSnapshot", {"bundle": "bench"})
        report["cold_start_to_prompt"] = cold
        report["clone_spawn_reply"] = spawn
        report["clone_start_to_answer"] = clone
        report["speedup_median"] = median(cold) / median(clone)

        sizes = []
        for ram in (int(r) for r in args.rams.split(",")):
            _, console = cold_start(d, guest, f"ram{ram}", disk, ram * MIB)
            started = time.perf_counter()
            snap = call(d, "Snapshot", {"name": f"ram{ram}", "bundle": f"ram{ram}", "stop": True})["snapshot"]
            seconds = time.perf_counter() - started
            console.close()
            call(d, "Remove", {"name": f"ram{ram}"})
            s, c = clone_start(d, f"ramclone{ram}", f"ram{ram}")
            end(d, f"ramclone{ram}")
            call(d, "RemoveSnapshot", {"bundle": f"ram{ram}"})
            row = {
                "ram_mib": ram,
                "snapshot_call_s": round(seconds, 3),
                "qemu_save_s": snap["saveSeconds"],
                "state_mib": round(int(str(snap["stateSize"])) / MIB, 1),
                "clone_to_answer_s": round(c, 3),
            }
            sizes.append(row)
            print(f"snapshot {row}", file=sys.stderr)
        report["snapshots"] = sizes
        if os.geteuid() == 0:
            report["networked"] = networked(d, guest, disk, args.runs)
        else:
            print("networked series skipped: TAP networking needs root", file=sys.stderr)
    finally:
        stop_daemon(d)
        shutil.rmtree(runtime.parent, ignore_errors=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    cold_m, clone_m = median(cold), median(clone)
    print("| what | median | all runs |\n| --- | --- | --- |")
    print(f"| cold start → shell prompt | {cold_m:.2f} s | {', '.join(f'{x:.2f}' for x in cold)} |")
    print(f"| clone Spawn → reply | {median(spawn):.2f} s | {', '.join(f'{x:.2f}' for x in spawn)} |")
    print(f"| clone Spawn → console answer | {clone_m:.2f} s | {', '.join(f'{x:.2f}' for x in clone)} |")
    print(f"\nclone is {cold_m / clone_m:.1f}× faster than a cold start\n")
    print("| RAM | Snapshot call | QEMU save | state file | clone → answer |\n| --- | --- | --- | --- | --- |")
    for row in sizes:
        print(
            f"| {row['ram_mib']} MiB | {row['snapshot_call_s']:.2f} s | {row['qemu_save_s']:.2f} s | "
            f"{row['state_mib']} MiB | {row['clone_to_answer_s']:.2f} s |"
        )
    net = report.get("networked")
    if isinstance(net, dict):
        answers, cards = net["clone_start_to_answer"], net["clone_start_to_own_card"]
        print(f"\nnetworked (TAP): Snapshot call {net['snapshot_call_s']:.2f} s (card ejected, saved, plugged back)")
        print("| networked clone | median | all runs |\n| --- | --- | --- |")
        print(f"| Spawn → console answer | {median(answers):.2f} s | {', '.join(f'{x:.2f}' for x in answers)} |")
        print(f"| Spawn → own card in the guest | {median(cards):.2f} s | {', '.join(f'{x:.2f}' for x in cards)} |")
        print(f"distinct MACs: {net['distinct_macs']} of {len(cards)} clones")


if __name__ == "__main__":
    main()
