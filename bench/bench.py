# SPDX-License-Identifier: LGPL-2.1-or-later
"""vmspawnd benchmarks: what the daemon costs, measured against plain QEMU in the same run.

Run through `bench/run` (which picks the interpreter and makes the plot). Nothing here is
asserted; the figures go to a JSON file, docs/performance.md (between the bench markers)
and docs/performance.png.

The daemon is a real `python -m vmspawnd.daemon` in a subprocess (default notify transport,
log level info), driven over its socket exactly like tests/support.py does.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NotRequired, TextIO, TypedDict

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "clients"))

from vmspawnctl.varlink import Connection, JsonObject

from tests.guest.build import Guest, ensure_guest
from tests.support import (
    Console,
    Daemon,
    children_of,
    daemon_fds,
    make_runtime_dir,
    start_daemon,
    stop_daemon,
)

MANAGER = "io.vmspawnd.Manager"
MIB = 1024 * 1024
MARKER = "VMSPAWND-TEST: facts-done"

# --- the report's shape (written as JSON, rendered into docs/performance.md) ----------------


class Comparison(TypedDict):
    """Paired timings of the daemon (a) against a baseline (b), in seconds."""

    daemon: dict[str, float]
    baseline: dict[str, float]
    ratio: float
    ratio_ci95: list[float]
    mann_whitney_p: float
    samples_daemon: list[float]
    samples_baseline: list[float]
    argv: NotRequired[list[str]]  # spawn only: the QEMU command line both sides ran


# "Describe / one connection" → {"p50_ms", "p99_ms", "max_ms", "n"}
Latency = dict[str, dict[str, float]]


class Scale(TypedDict):
    rss_kib: list[tuple[int, int]]  # (VMs supervised, daemon RSS)
    latency: dict[str, Latency]  # by VM count
    wedged: Latency  # at the highest count, one QEMU SIGSTOPped
    per_vm_kib: float
    rss_full_kib: int
    rss_after_remove_kib: int


class Snapshot(TypedDict):
    fds: list[str]
    children: list[int]
    dirs: list[str]
    rss_kib: int


class Leak(TypedDict):
    cycles: int
    seconds: float
    before: Snapshot
    after: Snapshot
    fds_same: bool
    children_same: bool
    dirs_same: bool


class Report(TypedDict):
    date: str
    machine: dict[str, str]
    command: str
    runtime_dir: NotRequired[str]
    idle_rss_kib: NotRequired[int]
    cli: NotRequired[Comparison]
    spawn: NotRequired[Comparison]
    marker: NotRequired[Comparison]
    scale: NotRequired[Scale]
    leak: NotRequired[Leak]
    wall_s: NotRequired[float]


def log(*args: object) -> None:
    print(time.strftime("%H:%M:%S"), *args, file=sys.stderr, flush=True)


# --- statistics ------------------------------------------------------------------------


def summary(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)
    return {"n": len(s), "median": statistics.median(s), "min": s[0], "max": s[-1]}


def percentile(xs: list[float], p: float) -> float:
    s = sorted(xs)
    k = (len(s) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def mann_whitney(a: list[float], b: list[float]) -> float:
    """Two-sided p-value, normal approximation with tie correction."""
    both = sorted([(x, 0) for x in a] + [(x, 1) for x in b])
    ranks = [0.0] * len(both)
    i = 0
    ties = 0.0
    while i < len(both):
        j = i
        while j + 1 < len(both) and both[j + 1][0] == both[i][0]:
            j += 1
        for k in range(i, j + 1):
            ranks[k] = (i + j) / 2 + 1
        t = j - i + 1
        ties += t**3 - t
        i = j + 1
    n1, n2 = len(a), len(b)
    r1 = sum(r for r, (_, g) in zip(ranks, both, strict=True) if g == 0)
    u = r1 - n1 * (n1 + 1) / 2
    mu = n1 * n2 / 2
    n = n1 + n2
    sigma = math.sqrt(n1 * n2 / 12 * ((n + 1) - ties / (n * (n - 1))))
    if sigma == 0:
        return 1.0
    z = (abs(u - mu) - 0.5) / sigma
    return math.erfc(max(z, 0) / math.sqrt(2))


def bootstrap_ratio(a: list[float], b: list[float], rounds: int = 10000) -> tuple[float, float]:
    """95 % bootstrap CI of median(a) / median(b)."""
    rng = random.Random(1)
    ratios = sorted(
        statistics.median(rng.choices(a, k=len(a))) / statistics.median(rng.choices(b, k=len(b))) for _ in range(rounds)
    )
    return ratios[int(0.025 * rounds)], ratios[int(0.975 * rounds)]


def compare(daemon: list[float], baseline: list[float]) -> Comparison:
    lo, hi = bootstrap_ratio(daemon, baseline)
    return {
        "daemon": summary(daemon),
        "baseline": summary(baseline),
        "ratio": statistics.median(daemon) / statistics.median(baseline),
        "ratio_ci95": [lo, hi],
        "mann_whitney_p": mann_whitney(daemon, baseline),
        "samples_daemon": daemon,
        "samples_baseline": baseline,
    }


# --- host ----------------------------------------------------------------------------


def machine_info() -> dict[str, str]:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?")
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    mem = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal"))
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    load = Path("/proc/loadavg").read_text().split()[:3]
    return {
        "nproc": str(os.cpu_count()),
        "ram": f"{mem / 1024 / 1024:.1f} GiB",
        "cpu": cpu,
        "kernel": platform.release(),
        "qemu": qemu,
        "python": platform.python_version(),
        "loadavg_at_start": " ".join(load),
    }


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def call(address: str, method: str, params: dict[str, object] | None = None, timeout: float = 300) -> JsonObject:
    with Connection(address, timeout=timeout) as conn:
        return conn.call(f"{MANAGER}.{method}", params)


def vm_spec(guest: Guest, name: str, ram: int, mode: str = "wait") -> dict[str, object]:
    # tpm off: the by-hand baseline would otherwise need its own swtpm (see docs/performance.md).
    return {
        "name": name,
        "kvm": False,
        "tpm": False,
        "ram": ram,
        "linux": str(guest.kernel),
        "initrds": [str(guest.initrd)],
        "kernelCmdline": [f"vmspawnd_test.mode={mode}"],
    }


def remove(address: str, name: str) -> None:
    call(address, "Terminate", {"name": name})
    call(address, "Remove", {"name": name})


def launch_daemon(runtime: Path) -> Daemon:
    """tests.support.start_daemon at log level info (debug logging would be part of what is measured)."""
    return start_daemon(runtime, "--log-level=info")


# --- the same QEMU by hand ----------------------------------------------------------------


class QemuTemplate:
    """The daemon's QEMU argv, read back from /proc/PID/cmdline, re-targeted at our own files."""

    def __init__(self, pid: int, runtime: Path, store: Path) -> None:
        argv = [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]]
        self.store = store
        store.mkdir(parents=True, exist_ok=True)
        self.nvram_template: Path | None = None
        nvram = runtime / "efi-vars.fd"
        # Payload files (smbios credentials, ...) are copied once; the NVRAM is copied per
        # run from the vendor template, as the daemon does.
        for path in runtime.rglob("*"):
            if path.is_file() and path.name not in ("efi-vars.fd", "console.log", "qemu.log", "state.json"):
                dest = store / "payload" / path.relative_to(runtime)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, dest)
        if nvram.exists():
            size = nvram.stat().st_size
            candidates = sorted(Path("/usr/share/OVMF").glob("OVMF_VARS*.fd"))
            same = [c for c in candidates if c.stat().st_size == size]
            exact = [c for c in same if c.read_bytes() == nvram.read_bytes()]
            self.nvram_template = (exact or same or [Path("/usr/share/OVMF/OVMF_VARS_4M.fd")])[0]
        self.argv = argv
        self.runtime = str(runtime)

    def instantiate(self, workdir: Path, qmp_fd: int, console_fd: int) -> list[str]:
        out = []
        for arg in self.argv:
            if arg.startswith("socket,id=vmspawn-qmp,fd="):
                arg = re.sub(r"fd=\d+", f"fd={qmp_fd}", arg)
            elif arg.startswith("socket,id=console,fd="):
                arg = re.sub(r"fd=\d+", f"fd={console_fd}", arg)
            if "efi-vars.fd" in arg:
                arg = arg.replace(self.runtime + "/efi-vars.fd", str(workdir / "efi-vars.fd"))
            arg = arg.replace(self.runtime + "/", str(self.store / "payload") + "/")
            out.append(arg)
        return out


def qmp_cmd(f: TextIO, sock: socket.socket, command: str) -> dict[str, Any]:
    """One QMP command's reply (JSON in the shape QEMU's QAPI schema gives it)."""
    sock.sendall(json.dumps({"execute": command}).encode() + b"\n")
    while True:
        line = f.readline()
        if not line:
            raise RuntimeError("QMP closed")
        msg: dict[str, Any] = json.loads(line)
        if "return" in msg or "error" in msg:
            return msg


class ByHand:
    """One QEMU launched from the template like the daemon does: sockets bound here and
    passed as fds, own session, -S, then QMP `cont` until query-status says running."""

    def __init__(self, template: QemuTemplate, root: Path) -> None:
        self.template = template
        self.root = root
        self.proc: subprocess.Popen[bytes] | None = None
        self.console: socket.socket | None = None

    def start(self, connect_console: bool = False) -> None:
        workdir = Path(tempfile.mkdtemp(dir=self.root))
        self.workdir = workdir
        if self.template.nvram_template:
            shutil.copyfile(self.template.nvram_template, workdir / "efi-vars.fd")
        socks = []
        for name in ("qmp", "console"):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(str(workdir / name))
            s.listen(16)
            socks.append(s)
        qmp_l, con_l = socks
        argv = self.template.instantiate(workdir, qmp_l.fileno(), con_l.fileno())
        with open(workdir / "qemu.log", "wb") as out:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                pass_fds=(qmp_l.fileno(), con_l.fileno()),
                start_new_session=True,
            )
        qmp_l.close()
        con_l.close()
        if connect_console:
            self.console = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.console.connect(str(workdir / "console"))
        qmp = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        qmp.settimeout(60)
        qmp.connect(str(workdir / "qmp"))
        with qmp, qmp.makefile("r") as f:
            json.loads(f.readline())  # greeting
            qmp_cmd(f, qmp, "qmp_capabilities")
            reply = qmp_cmd(f, qmp, "cont")
            assert "return" in reply, reply
            while qmp_cmd(f, qmp, "query-status")["return"]["status"] != "running":
                pass

    def wait_marker(self, timeout: float = 300) -> None:
        assert self.console is not None
        self.console.settimeout(timeout)
        buf = b""
        while MARKER.encode() not in buf:
            chunk = self.console.recv(65536)
            if not chunk:
                raise RuntimeError("console closed")
            buf = buf[-200:] + chunk

    def stop(self) -> None:
        if self.console:
            self.console.close()
            self.console = None
        if self.proc:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait()
            self.proc = None
        shutil.rmtree(self.workdir, ignore_errors=True)


# --- the benchmarks ----------------------------------------------------------------------


def bench_spawn(d: Daemon, guest: Guest, root: Path, runs: int) -> Comparison:
    log(f"spawn overhead: {runs} alternating pairs")
    first = call(d.address, "Spawn", {"spec": vm_spec(guest, "tmpl", 64 * MIB)})["machine"]
    template = QemuTemplate(first["qemu"]["pid"], Path(first["runtimeDirectory"]), root / "spawn-template")
    remove(d.address, "tmpl")
    a: list[float] = []  # the daemon's side
    b: list[float] = []  # the baseline's
    for i in range(runs):
        for side in (0, 1) if i % 2 == 0 else (1, 0):
            if side == 0:
                t = time.perf_counter()
                call(d.address, "Spawn", {"spec": vm_spec(guest, f"sp{i}", 64 * MIB)})
                a.append(time.perf_counter() - t)
                remove(d.address, f"sp{i}")
            else:
                h = ByHand(template, root)
                try:
                    t = time.perf_counter()
                    h.start()
                    b.append(time.perf_counter() - t)
                finally:
                    h.stop()
    result = compare(a, b)
    result["argv"] = template.argv
    return result


def bench_marker(d: Daemon, guest: Guest, root: Path, runs: int) -> Comparison:
    log(f"time to guest marker: {runs} alternating pairs")
    env = dict(os.environ, VMSPAWN_ADDRESS=d.address)
    ctl_args = [
        "--kvm=no",
        "--tpm=no",
        "--ram=256M",
        f"--linux={guest.kernel}",
        f"--initrd={guest.initrd}",
        "vmspawnd_test.mode=wait",
    ]
    template: QemuTemplate | None = None
    a: list[float] = []  # the daemon's side
    b: list[float] = []  # the baseline's
    for i in range(runs):
        # Pair 0 starts with the daemon: its QEMU is the template for the by-hand runs.
        for side in (0, 1) if i % 2 == 0 else (1, 0):
            if side == 0:
                name = f"mk{i}"
                t = time.perf_counter()
                subprocess.run(
                    [sys.executable, "-m", "vmspawnctl.main", "start", "-M", name, *ctl_args],
                    env=env,
                    check=True,
                    capture_output=True,
                    timeout=300,
                )
                machine = call(d.address, "Describe", {"name": name})["machine"]
                with Console(machine) as console:
                    console.wait_for(re.escape(MARKER), timeout=300)
                a.append(time.perf_counter() - t)
                if template is None:
                    template = QemuTemplate(machine["qemu"]["pid"], Path(machine["runtimeDirectory"]), root / "marker-template")
                remove(d.address, name)
            else:
                assert template is not None
                h = ByHand(template, root)
                try:
                    t = time.perf_counter()
                    h.start(connect_console=True)
                    h.wait_marker()
                    b.append(time.perf_counter() - t)
                finally:
                    h.stop()
        log(f"  pair {i}: daemon {a[-1]:.2f}s, by hand {b[-1]:.2f}s")
    return compare(a, b)


def bench_cli(d: Daemon, runs: int) -> Comparison:
    log(f"CLI start-up: {runs} alternating pairs")
    env = dict(os.environ, VMSPAWN_ADDRESS=d.address)
    a: list[float] = []  # the daemon's side
    b: list[float] = []  # the baseline's
    for i in range(runs):
        for side in (0, 1) if i % 2 == 0 else (1, 0):
            argv = [sys.executable, "-m", "vmspawnctl.main", "list"] if side == 0 else [sys.executable, "-c", "pass"]
            t = time.perf_counter()
            subprocess.run(argv, env=env, check=True, capture_output=True)
            (a if side == 0 else b).append(time.perf_counter() - t)
    return compare(a, b)


def latency(d: Daemon, names: list[str], calls: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for method in ("Describe", "List"):
        for mode in ("one connection", "fresh connections"):
            samples = []
            conn = Connection(d.address, timeout=60) if mode == "one connection" else None
            try:
                for k in range(calls):
                    params = {"name": names[k % len(names)]} if method == "Describe" else None
                    t = time.perf_counter()
                    if conn is not None:
                        conn.call(f"{MANAGER}.{method}", params)
                    else:
                        with Connection(d.address, timeout=60) as c:
                            c.call(f"{MANAGER}.{method}", params)
                    samples.append(time.perf_counter() - t)
            finally:
                if conn is not None:
                    conn.close()
            out[f"{method} / {mode}"] = {
                "p50_ms": percentile(samples, 50) * 1e3,
                "p99_ms": percentile(samples, 99) * 1e3,
                "max_ms": max(samples) * 1e3,
                "n": calls,
            }
    return out


def bench_scale(d: Daemon, guest: Guest, max_vms: int, levels: list[int], calls: int, idle_rss: int) -> Scale:
    log(f"scale: up to {max_vms} VMs (64M, paused right after Spawn), latency at {levels}")
    names: list[str] = []
    rss = [(0, idle_rss)]
    lat: dict[str, Latency] = {}
    wedged: Latency = {}
    pids: list[int] = []
    for n in range(1, max_vms + 1):
        name = f"vm{n:03d}"
        m = call(d.address, "Spawn", {"spec": vm_spec(guest, name, 64 * MIB)})["machine"]
        call(d.address, "Pause", {"name": name})
        names.append(name)
        pids.append(m["qemu"]["pid"])
        call(d.address, "List")
        rss.append((n, rss_kib(d.process.pid)))
        if n in levels:
            log(f"  {n} VMs: RSS {rss[-1][1] / 1024:.1f} MiB; measuring latency")
            lat[str(n)] = latency(d, names, calls)
    # One VM wedged: its QEMU stopped by SIGSTOP (QMP does not answer).
    log(f"  {len(names)} VMs with {names[0]} wedged (SIGSTOP)")
    os.kill(pids[0], signal.SIGSTOP)
    try:
        wedged = latency(d, names, calls)
    finally:
        os.kill(pids[0], signal.SIGCONT)
    call(d.address, "List")
    full_rss = rss_kib(d.process.pid)
    log("  removing them")
    for name in names:
        remove(d.address, name)
    call(d.address, "List")
    after_rss = rss_kib(d.process.pid)
    xs = [n for n, _ in rss[1:]]
    ys = [r for _, r in rss[1:]]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs) if len(xs) > 1 else 0.0
    return {
        "rss_kib": rss,
        "latency": lat,
        "wedged": wedged,
        "per_vm_kib": slope,
        "rss_full_kib": full_rss,
        "rss_after_remove_kib": after_rss,
    }


def bench_leak(d: Daemon, guest: Guest, cycles: int) -> Leak:
    log(f"leak check: {cycles} Spawn/Terminate/Remove cycles")
    call(d.address, "List")
    pid = d.process.pid
    before: Snapshot = {
        "fds": daemon_fds(d),
        "children": sorted(children_of(pid)),
        "dirs": sorted(p.name for p in (d.runtime_dir / "machines").iterdir()),
        "rss_kib": rss_kib(pid),
    }
    t = time.perf_counter()
    for i in range(cycles):
        call(d.address, "Spawn", {"spec": vm_spec(guest, f"leak{i}", 64 * MIB)})
        remove(d.address, f"leak{i}")
    elapsed = time.perf_counter() - t
    call(d.address, "List")
    time.sleep(0.5)
    after: Snapshot = {
        "fds": daemon_fds(d),
        "children": sorted(children_of(pid)),
        "dirs": sorted(p.name for p in (d.runtime_dir / "machines").iterdir()),
        "rss_kib": rss_kib(pid),
    }
    return {
        "cycles": cycles,
        "seconds": elapsed,
        "before": before,
        "after": after,
        "fds_same": before["fds"] == after["fds"],
        "children_same": before["children"] == after["children"],
        "dirs_same": before["dirs"] == after["dirs"],
    }


# --- report ------------------------------------------------------------------------------


def fmt_cmp(r: Comparison, unit: float = 1.0, suffix: str = "s", digits: int = 3) -> tuple[str, str, str]:
    def one(s: dict[str, float]) -> str:
        return f"{s['median'] * unit:.{digits}f} {suffix} ({s['min'] * unit:.{digits}f}–{s['max'] * unit:.{digits}f})"

    lo, hi = r["ratio_ci95"]
    ratio = f"{r['ratio']:.2f} (95% CI {lo:.2f}–{hi:.2f}, MW p={r['mann_whitney_p']:.3f})"
    return one(r["daemon"]), one(r["baseline"]), ratio


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def render(res: Report) -> str:
    info = res["machine"]
    L = [f"### Run of {res['date']}", ""]
    L.append(
        f"Machine: {info['nproc']} CPUs ({info['cpu']}), {info['ram']} RAM, kernel {info['kernel']}, "
        f"{info['qemu']}, Python {info['python']}; load average at start {info['loadavg_at_start']}. "
        f"KVM not used (`kvm: false`, TCG). Runtime directory {res.get('runtime_dir')}. "
        f"Command: `{res['command']}`; wall time {res['wall_s']:.0f} s."
    )
    L.append("")
    L.append("| measurement | vmspawnd | baseline | ratio | target |")
    L.append("| --- | --- | --- | --- | --- |")
    if "spawn" in res:
        r = res["spawn"]
        a, b, q = fmt_cmp(r)
        L.append(
            f"| Spawn → running, {r['daemon']['n']} A/B pairs | {a} | {b} (same argv by hand) | {q} "
            f"| ≤ 1.10: {verdict(r['ratio'] <= 1.10)} |"
        )
    if "marker" in res:
        r = res["marker"]
        a, b, q = fmt_cmp(r, digits=2)
        sig = "significant" if r["mann_whitney_p"] < 0.05 else "not significant"
        L.append(
            f"| `vmspawnctl start` → `facts-done`, {r['daemon']['n']} A/B pairs | {a} | {b} (same argv by hand) "
            f"| {q}; {sig} at 5 % | ≤ 1.05: {verdict(r['ratio'] <= 1.05)} |"
        )
    if "cli" in res:
        r = res["cli"]
        a, b, q = fmt_cmp(r, 1e3, "ms", 1)
        L.append(
            f"| `vmspawnctl list`, {r['daemon']['n']} A/B pairs | {a} | {b} (`python3 -c pass`) | {q} "
            f"| ≤ 3×: {verdict(r['ratio'] <= 3)} |"
        )
    if "idle_rss_kib" in res:
        idle = res["idle_rss_kib"] / 1024
        L.append(f"| daemon RSS idle | {idle:.1f} MiB | | | ≤ 40 MiB: {verdict(idle <= 40)} |")
    if "scale" in res:
        s = res["scale"]
        per = s["per_vm_kib"] / 1024
        n = s["rss_kib"][-1][0]
        L.append(f"| daemon RSS per VM (least squares, 1–{n} VMs) | {per:.2f} MiB | | | ≤ 1 MiB: {verdict(per <= 1)} |")
        L.append(
            f"| daemon RSS with {n} VMs / after removing them "
            f"| {s['rss_full_kib'] / 1024:.1f} / {s['rss_after_remove_kib'] / 1024:.1f} MiB | | | |"
        )
    L.append("")
    if "scale" in res:
        s = res["scale"]
        L.append(
            f"API latency in ms, p50 / p99 (max) over {next(iter(next(iter(s['latency'].values())).values()))['n']} calls each; "
            "VMs are 64M TCG guests paused right after Spawn; Describe cycles through all VMs."
        )
        L.append("")
        levels = list(s["latency"])
        cols = [f"{n} VM{'s' if int(n) > 1 else ''}" for n in levels] + [f"{levels[-1]} VMs, 1 wedged (SIGSTOP)"]
        L.append("| call | " + " | ".join(cols) + " |")
        L.append("| --- |" + " --- |" * len(cols))
        for key in s["wedged"]:
            cells = [s["latency"][n][key] for n in levels] + [s["wedged"][key]]
            L.append(
                f"| {key} | " + " | ".join(f"{c['p50_ms']:.2f} / {c['p99_ms']:.2f} ({c['max_ms']:.1f})" for c in cells) + " |"
            )
        worst = max(c["p99_ms"] for c in list(s["latency"][levels[-1]].values()) + list(s["wedged"].values()))
        L.append("")
        L.append(
            f"Target p99 ≤ 5 ms at {levels[-1]} VMs, unchanged by the wedged one: "
            f"worst p99 {worst:.2f} ms, {verdict(worst <= 5)}."
        )
        L.append("")
    if "leak" in res:
        k = res["leak"]
        before, after = k["before"], k["after"]
        L.append(
            f"Leak check, {k['cycles']} × Spawn → Terminate → Remove ({k['seconds']:.0f} s): "
            f"fds {len(before['fds'])} → {len(after['fds'])} ({'same set' if k['fds_same'] else 'DIFFERENT'}), "
            f"children {len(before['children'])} → {len(after['children'])} "
            f"({'same' if k['children_same'] else 'DIFFERENT'}), "
            f"machines/ dirs {len(before['dirs'])} → {len(after['dirs'])} ({'same' if k['dirs_same'] else 'DIFFERENT'}), "
            f"RSS {before['rss_kib'] / 1024:.1f} → {after['rss_kib'] / 1024:.1f} MiB."
        )
        L.append("")
    return "\n".join(L)


BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def write_doc(doc: Path, section: str) -> None:
    text = doc.read_text() if doc.exists() else f"# Performance\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text:
        text += f"\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(f"{head}{BEGIN}\n{section}\n{END}{tail}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", type=int, default=10, help="A/B pairs for spawn and guest-marker (default 10)")
    p.add_argument("--cli-runs", type=int, default=20)
    p.add_argument("--max-vms", type=int, default=50)
    p.add_argument("--levels", default="1,10,25,50")
    p.add_argument("--calls", type=int, default=300, help="calls per latency series (default 300)")
    p.add_argument("--cycles", type=int, default=100, help="leak-check cycles (default 100)")
    p.add_argument("--only", default="spawn,marker,cli,scale,leak")
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--doc", default="", help="markdown file whose bench-marker section is replaced (empty: none)")
    p.add_argument("--command", default="bench/run")
    p.add_argument("--runtime-base", help="where the daemon's runtime directory goes (default /tmp)")
    args = p.parse_args()
    only = set(args.only.split(","))
    started = time.perf_counter()
    guest = ensure_guest()
    res: Report = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "command": args.command,
    }
    runtime = make_runtime_dir("vmspawnd-bench-")
    if args.runtime_base:  # e.g. /dev/shm: tmpfs like a real /run (here /tmp and /run are ext4)
        shutil.rmtree(runtime.parent)
        base = Path(tempfile.mkdtemp(prefix="vmspawnd-bench-", dir=args.runtime_base))
        base.chmod(0o755)
        runtime = base / "run"
        runtime.mkdir(mode=0o755)
    res["runtime_dir"] = str(runtime)
    root = Path(tempfile.mkdtemp(prefix="vmspawnd-bench-byhand-", dir="/tmp"))
    d = launch_daemon(runtime)
    try:
        call(d.address, "List")
        time.sleep(1)
        res["idle_rss_kib"] = rss_kib(d.process.pid)
        log(f"daemon idle RSS {res['idle_rss_kib'] / 1024:.1f} MiB")
        if "cli" in only:
            res["cli"] = bench_cli(d, args.cli_runs)
        if "spawn" in only:
            res["spawn"] = bench_spawn(d, guest, root, args.runs)
        if "marker" in only:
            res["marker"] = bench_marker(d, guest, root, args.runs)
        if "scale" in only:
            levels = [int(x) for x in args.levels.split(",") if int(x) <= args.max_vms]
            res["scale"] = bench_scale(d, guest, args.max_vms, levels, args.calls, res["idle_rss_kib"])
        if "leak" in only:
            res["leak"] = bench_leak(d, guest, args.cycles)
    finally:
        stop_daemon(d)
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(runtime.parent, ignore_errors=True)
    res["wall_s"] = time.perf_counter() - started
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=1))
    section = render(res)
    print(section)
    if args.doc:
        write_doc(Path(args.doc), section)


if __name__ == "__main__":
    main()
