# SPDX-License-Identifier: LGPL-2.1-or-later
"""Profile the daemon answering List/Describe with N VMs supervised (py-spy on the daemon).

    PYTHON bench/profile_api.py --vms=50 --seconds=15 --py-spy=PATH/py-spy

Prints the functions with the most samples, inclusive and self, as file:function.
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import (
    MANAGER,
    MIB,
    Connection,
    call,
    ensure_guest,
    launch_daemon,
    make_runtime_dir,
    stop_daemon,
    vm_spec,
)


def top(raw: Path, n: int = 25) -> None:
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = []
        for f in stack.split(";"):
            # "function (file:line)" → "file:function"
            name, _, where = f.partition(" (")
            frames.append(f"{where.rsplit(':', 1)[0].removesuffix(')')}:{name}")
        c = int(count)
        total += c
        for f in set(frames):
            inclusive[f] += c
        own[frames[-1]] += c
    print(f"{total} samples")
    print("inclusive:")
    for f, c in inclusive.most_common(n):
        print(f"  {100 * c / total:5.1f}%  {f}")
    print("self:")
    for f, c in own.most_common(n):
        print(f"  {100 * c / total:5.1f}%  {f}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--vms", type=int, default=50)
    p.add_argument("--seconds", type=int, default=15)
    p.add_argument("--method", default="List")
    p.add_argument("--py-spy", default="py-spy")
    p.add_argument("--out", type=Path, default=Path("/tmp/vmspawnd-profile.txt"))
    args = p.parse_args()
    guest = ensure_guest()
    runtime = make_runtime_dir("vmspawnd-prof-")
    d = launch_daemon(runtime)
    try:
        for i in range(args.vms):
            call(d.address, "Spawn", {"spec": vm_spec(guest, f"p{i}", 64 * MIB)})
            call(d.address, "Pause", {"name": f"p{i}"})
        stop = threading.Event()
        count = [0]

        def load() -> None:
            if args.method == "Spawn":  # Spawn → Pause → Terminate → Remove, counted per Spawn
                k = 0
                while not stop.is_set():
                    name = f"s{k}"
                    call(d.address, "Spawn", {"spec": vm_spec(guest, name, 64 * MIB)})
                    call(d.address, "Terminate", {"name": name})
                    call(d.address, "Remove", {"name": name})
                    k += 1
                    count[0] += 1
                return
            with Connection(d.address, timeout=60) as conn:
                while not stop.is_set():
                    params = {"name": f"p{count[0] % args.vms}"} if args.method == "Describe" else None
                    conn.call(f"{MANAGER}.{args.method}", params)
                    count[0] += 1

        t = threading.Thread(target=load)
        t.start()
        subprocess.run(
            [
                args.py_spy,
                "record",
                "--format",
                "raw",
                "--rate",
                "250",
                "--duration",
                str(args.seconds),
                "--output",
                str(args.out),
                "--pid",
                str(d.process.pid),
            ],
            check=True,
            capture_output=True,
        )
        stop.set()
        t.join()
        print(f"{args.method} with {args.vms} VMs: {count[0] / args.seconds:.0f} calls/s under the profiler")
        top(args.out)
    finally:
        stop_daemon(d)
        import shutil

        shutil.rmtree(runtime.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
