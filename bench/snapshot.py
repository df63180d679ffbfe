# SPDX-License-Identifier: LGPL-2.1-or-later
"""Snapshot benchmark (issue #17): clone start versus cold start, and what a snapshot costs.

In one run, against one daemon and the same test guest (busybox on a raw disk, TCG):

* cold: Spawn → the guest's shell prompt on the console (a full boot);
* clone: Spawn{fromSnapshot} → the console answers a command typed at once (the computed
  `echo $((6*7))` comes back, so the guest really runs);
* snapshot: for each RAM size, the time of the Snapshot call and of QEMU's save alone,
  and the size of the state file.

Nothing is asserted; the figures go to a JSON file and a markdown table on stdout.
Usage: flock /tmp/vmspawnd-vm.lock .venv/bin/python bench/snapshot.py --json=bench/results/snapshot.json
"""

from __future__ import annotations

import argparse
import json
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


def spec(guest: Guest, name: str, disk: Path, ram: int) -> dict[str, object]:
    # tpm off: a clone of a VM with a TPM gets its own swtpm, which the cold start would not need.
    return waiting_spec(guest, name, tpm=False, ram=ram, image=str(disk))


def end(d: Daemon, name: str) -> None:
    call(d, "Terminate", {"name": name})
    call(d, "Remove", {"name": name})


def cold_start(d: Daemon, guest: Guest, name: str, disk: Path, ram: int) -> tuple[float, Console]:
    """Seconds from Spawn to the shell prompt; the console is left open for the caller."""
    started = time.perf_counter()
    machine = call(d, "Spawn", {"spec": spec(guest, name, disk, ram)})["machine"]
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


if __name__ == "__main__":
    main()
