# SPDX-License-Identifier: LGPL-2.1-or-later
"""vmspawnctl: control vmspawnd over Varlink.

Kept light on purpose (no asyncio; of the daemon package only the pure spec side, and that only
for start and run): a one-shot call should cost
little more than starting Python. Errors are one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import typing

from .varlink import INTERFACE, Connection, ConnectionFailed, VarlinkError

if typing.TYPE_CHECKING:  # the shapes of the replies, for the type checker only: free at run time
    from vmspawnd.spec.wire import EventJson, MachineJson

EXIT_FAILURE = 1
EXIT_USAGE = 2


def default_address() -> str:
    if env := os.environ.get("VMSPAWN_ADDRESS"):
        return env
    if os.geteuid() == 0:
        return "/run/vmspawnd/io.vmspawnd.Manager"
    runtime = os.environ.get("XDG_RUNTIME_DIR", f"/run/user/{os.geteuid()}")
    return f"{runtime}/vmspawnd/io.vmspawnd.Manager"


def requested_command(argv: list[str]) -> str | None:
    """The subcommand named on the command line, found without parsing everything."""
    args = iter(argv)
    for arg in args:
        if arg == "--address":
            next(args, None)
        elif not arg.startswith("-"):
            return arg
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The whole CLI; `start`/`run` (all of systemd-vmspawn's options, their parsers and the
    spec model) are only built when asked for, so `list` and friends start fast."""
    from vmspawnd import __version__

    command = requested_command(sys.argv[1:] if argv is None else argv)
    full = command not in {"list", "status", "stop", "terminate", "remove", "pause", "resume", "reboot",
                           "log", "console", "events", "kill", "shutdown-all", "screenshot"}

    parser = argparse.ArgumentParser(prog="vmspawnctl", description="Control virtual machines supervised by vmspawnd.")
    parser.add_argument("--address", default=None, help="vmspawnd socket (default: $VMSPAWN_ADDRESS, else the system or user instance)")
    parser.add_argument("--version", action="version", version=f"vmspawnctl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    start = sub.add_parser("start", help="spawn a VM (systemd-vmspawn options)", description="Spawn a VM; takes systemd-vmspawn's options.")
    if full:
        from .start_options import add_start_options

        add_start_options(start)
    start.add_argument("--wait", action="store_true", help="return only once the VM is ready (vmspawnctl extension)")
    start.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS", help="with --wait: give up after this long (default 300)")
    shutdown = sub.add_parser("shutdown-all", help="power off every running VM (host shutdown), terminating after the timeout")
    shutdown.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS", help="ACPI grace period per VM (default 120)")

    lst = sub.add_parser("list", help="list VMs")
    lst.add_argument("--json", action="store_true", help="print JSON")
    status = sub.add_parser("status", help="show one VM")
    status.add_argument("name")
    status.add_argument("--json", action="store_true", help="print JSON")
    stop = sub.add_parser("stop", help="power a VM off (ACPI), terminating it after the deadline")
    stop.add_argument("name")
    stop.add_argument("--deadline", type=float, default=None, metavar="SECONDS", help="grace period before termination (default 60)")
    for verb, text in (
        ("terminate", "stop a VM immediately"),
        ("remove", "forget a stopped VM"),
        ("pause", "freeze a VM's vCPUs"),
        ("resume", "let a paused VM run again"),
        ("reboot", "reset a VM"),
    ):
        sub.add_parser(verb, help=text).add_argument("name")
    log = sub.add_parser("log", help="print a VM's console history (kept across daemon restarts)")
    log.add_argument("name")
    log.add_argument("-f", "--follow", action="store_true", help="then follow the live console (read-only)")
    log.add_argument("-n", "--lines", type=int, default=None, metavar="N", help="only the last N lines")
    console = sub.add_parser(
        "console", help="attach to a VM's console", description="Attach the terminal to a VM's console; Ctrl-] three times within 1s detaches (the VM keeps running).",
    )
    console.add_argument("name")
    console.add_argument("--read-only", action="store_true", help="watch only; any number of watchers may attach")
    console.add_argument("--force", action="store_true", help="take the console over from its current interactive client")
    run_parser = sub.add_parser(
        "run", help="run a VM in the foreground, like systemd-vmspawn",
        description="Drop-in for systemd-vmspawn: start the VM, attach its console, wait for it to end. "
        "Ctrl-] three times within 1s kills the VM; SIGINT/SIGTERM power it off; if this process dies, the VM is terminated.",
    )
    if full:
        from .run import add_run_options

        add_run_options(run_parser)
    shot = sub.add_parser(
        "screenshot", help="save the display of a --console=gui VM as an image",
        description="Save the guest's display (QEMU's screendump) to FILE, or to stdout for '-'.",
    )
    shot.add_argument("name")
    shot.add_argument("file", help="where to write the image ('-': stdout)")
    shot.add_argument("--format", choices=("png", "ppm"), default=None, help="image format (default: from FILE's extension, else png)")
    events = sub.add_parser("events", help="follow VM events (state changes, QMP events)")
    events.add_argument("name", nargs="?", help="only this VM")
    events.add_argument("--json", action="store_true", help="one JSON object per line")
    kill = sub.add_parser("kill", help="send a signal to a VM's QEMU")
    kill.add_argument("name")
    kill.add_argument("-s", "--signal", default="SIGTERM", help="signal name or number: SIGTERM, TERM, SIGRTMIN+4, 15 (default SIGTERM)")
    return parser


def signal_number(text: str) -> int:
    from vmspawnd.spec.parsers import parse_signal

    try:
        return parse_signal(text)
    except ValueError as exc:
        raise SystemExit(f"vmspawnctl: --signal: {exc}") from None


def format_error(exc: VarlinkError) -> str:
    p = exc.parameters
    match exc.short_name:
        case "InvalidSpec":
            return f"invalid {p.get('field')}: {p.get('reason')}"
        case "NoSuchMachine":
            return f"no machine named {p.get('name')!r}"
        case "MachineExists":
            return f"a machine named {p.get('name')!r} already exists"
        case "InvalidState":
            return f"cannot {p.get('operation')} {p.get('name')!r} while it is {p.get('state')}"
        case "StartFailed":
            tail = str(p.get("stderrTail") or "").strip()
            return f"failed to start ({p.get('step')}): {p.get('message')}" + (f"\n{tail}" if tail else "")
        case "PermissionDenied":
            return "permission denied: this vmspawnd instance only serves its owner"
        case "Timeout":
            return f"timed out: {p.get('operation')}"
        case "NotSupported":
            return f"not supported: {p.get('feature')}"
        case "ConsoleBusy":
            return f"the console of {p.get('name')!r} is in use by another interactive client (use --force to take it over, or --read-only)"
    return f"{exc.name}: {json.dumps(p)}" if p else exc.name


def display_state(m: MachineJson) -> str:
    """The state as a user reads it: a frozen VM is "paused", whatever it was before."""
    state = str(m["state"])
    return "paused" if m.get("paused") and state in ("running", "ready") else state


def print_table(machines: list[MachineJson]) -> None:
    rows = [("NAME", "STATE", "PID", "ID", "REASON")]
    for m in machines:
        qemu = m.get("qemu")
        pid = str(qemu["pid"]) if qemu and m.get("state") not in ("stopped", "failed") else "-"
        rows.append((str(m["name"]), display_state(m), pid, str(m["id"]), str(m.get("reason") or "")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    bold = sys.stdout.isatty() and "NO_COLOR" not in os.environ
    for index, row in enumerate(rows):
        line = "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip()
        print(f"\033[1m{line}\033[0m" if bold and index == 0 else line)
    print(f"\n{len(machines)} machine{'s' if len(machines) != 1 else ''} listed.")


def print_status(m: MachineJson) -> None:
    qemu, reaper = m.get("qemu"), m.get("reaper")
    qemu_pid = qemu["pid"] if qemu else "-"
    lines = [
        f"{m['name']} ({m['id']})",
        f"     State: {display_state(m)}" + (f" ({m['reason']})" if m.get("reason") else ""),
        f"    Leader: {reaper['pid']} (vmspawnd-reaper)" if reaper else f"    Leader: {qemu_pid} (qemu)",
        f"      QEMU: {qemu_pid}",
        f"      Unit: {m.get('unit') or '-'}" + (" (registered with systemd-machined)" if m.get("registered") else ""),
        f"       UID: {m['uid']}",
        f"       QMP: {m.get('qmpAddress') or '-'}",
        f"   Console: {m.get('consoleAddress') or '-'}",
        f"       Log: {m.get('consoleLog') or '-'}",
    ]
    if m.get("displayAddress"):
        lines.append(f"   Display: vnc+unix://{m['displayAddress']}")
    if m.get("exitCode") is not None:
        lines.append(f"      Exit: status {m['exitCode']}")
    if m.get("exitSignal") is not None:
        lines.append(f"      Exit: signal {m['exitSignal']}")
    print("\n".join(lines))
    tail = str(m.get("stderrTail") or "").strip()
    if tail and m.get("state") == "failed":
        print("\nQEMU said:\n" + tail)


def follow_events(conn: Connection, name: str | None, as_json: bool) -> None:
    """Print events until interrupted (the stream never ends by itself)."""
    params = {"name": name} if name else {}
    try:
        for reply in conn.call_more(f"{INTERFACE}.SubscribeEvents", params):
            event: EventJson = reply["event"]
            if as_json:
                print(json.dumps(event), flush=True)
                continue
            assert isinstance(event, dict)
            if event["event"] == "Subscribed":
                continue
            data = event.get("data") or {}
            detail = data.get("state") if event["event"] == "StateChanged" else json.dumps(data) if data else ""
            print(f"{event.get('machine') or '-'}\t{event['event']}\t{detail}", flush=True)
    except KeyboardInterrupt:
        pass


def wait_until_ready(address: str, name: str, timeout: float, quiet: bool) -> int:
    """Follow the VM's events until it is ready, with a progress line on stderr."""
    progress = sys.stderr.isatty() and not quiet

    def show(text: str) -> None:
        if progress:
            print(f"\r\033[K{name}: {text}", end="", file=sys.stderr, flush=True)

    try:
        with Connection(address, timeout=timeout) as stream, Connection(address, timeout=timeout) as conn:
            events = stream.call_more(f"{INTERFACE}.SubscribeEvents", {"name": name})
            next(events)  # Subscribed: nothing after this is missed
            machine: MachineJson = conn.call(f"{INTERFACE}.Describe", {"name": name})["machine"]
            state: str = machine["state"]
            show(f"{state}, waiting for the guest to report ready…")
            for reply in events:
                if state in ("ready", "stopped", "failed"):
                    break
                event: EventJson = reply["event"]
                data = event.get("data") or {}
                if event["event"] == "StateChanged":
                    state = data["state"]
                elif event["event"] == "Notify" and "STATUS" in data:
                    show(str(data["STATUS"]))
    except TimeoutError:
        show("")
        print(f"vmspawnctl: timed out after {timeout:g}s waiting for {name} to be ready", file=sys.stderr)
        return EXIT_FAILURE
    if progress:
        print("\r\033[K", end="", file=sys.stderr)
    if state != "ready":
        print(f"vmspawnctl: {name} ended before it was ready ({state})", file=sys.stderr)
        return EXIT_FAILURE
    if not quiet:
        print(f"VM {name} is ready.")
    return 0


def save_screenshot(conn: Connection, name: str, file: str, image_format: str | None) -> None:
    """Screenshot: the daemon hands over the image as an open file; copy it out."""
    import shutil

    image_format = image_format or ("ppm" if file.lower().endswith(".ppm") else "png")
    fd = conn.call_for_fd(f"{INTERFACE}.Screenshot", {"name": name, "format": image_format})
    with open(fd, "rb") as image:
        if file == "-":
            shutil.copyfileobj(image, sys.stdout.buffer)
            return
        with open(file, "wb") as out:
            shutil.copyfileobj(image, out)


def shutdown_all(address: str, timeout: float) -> int:
    """ACPI power-off of every active VM at once (libvirt-guests' job at host shutdown)."""
    import threading

    with Connection(address) as conn:
        machines: list[MachineJson] = conn.call(f"{INTERFACE}.List")["machines"]
    active = [m["name"] for m in machines if m["state"] in ("starting", "running", "ready", "stopping")]
    failures: list[str] = []

    def power_off(name: str) -> None:
        try:
            with Connection(address) as c:
                m: MachineJson = c.call(f"{INTERFACE}.PowerOff", {"name": name, "deadline": timeout})["machine"]
            print(f"{name}: {m['state']} ({m['reason']})")
        except (VarlinkError, ConnectionFailed) as exc:
            failures.append(f"{name}: {format_error(exc) if isinstance(exc, VarlinkError) else exc}")

    threads = [threading.Thread(target=power_off, args=(name,)) for name in active]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for failure in failures:
        print(f"vmspawnctl: {failure}", file=sys.stderr)
    return EXIT_FAILURE if failures else 0


def run(args: argparse.Namespace) -> int:
    address = args.address or default_address()
    method = f"{INTERFACE}."
    if args.command == "start":
        from .start_options import spec_from_args

        spec = spec_from_args(args)
        with Connection(address) as conn:
            spawned: MachineJson = conn.call(method + "Spawn", {"spec": spec.to_json()})["machine"]
        if not args.quiet:
            qemu = spawned.get("qemu")  # set once Spawn returns: QEMU runs
            print(f"Spawned VM {spawned['name']} (id {spawned['id']}, QEMU pid {qemu['pid'] if qemu else '-'}).")
        if args.wait:
            return wait_until_ready(address, spawned["name"], args.timeout, args.quiet)
        return 0
    if args.command == "shutdown-all":
        return shutdown_all(address, args.timeout)
    if args.command == "run":
        from .run import run_vm

        return run_vm(args, address)
    with Connection(address) as conn:
        if args.command == "list":
            machines: list[MachineJson] = conn.call(method + "List")["machines"]
            if args.json:
                print(json.dumps(machines, indent=2))
            else:
                print_table(machines)
        elif args.command == "status":
            machine: MachineJson = conn.call(method + "Describe", {"name": args.name})["machine"]
            print(json.dumps(machine, indent=2) if args.json else "", end="\n" if args.json else "")
            if not args.json:
                print_status(machine)
        elif args.command == "stop":
            params: dict[str, object] = {"name": args.name}
            if args.deadline is not None:
                params["deadline"] = args.deadline
            machine = conn.call(method + "PowerOff", params)["machine"]
            print(f"{machine['name']}: {machine['state']} ({machine['reason']})")
        elif args.command in ("pause", "resume", "reboot"):
            machine = conn.call(method + args.command.capitalize(), {"name": args.name})["machine"]
            print(f"{machine['name']}: {display_state(machine)}")
        elif args.command == "events":
            follow_events(conn, args.name, args.json)
        elif args.command == "terminate":
            machine = conn.call(method + "Terminate", {"name": args.name})["machine"]
            print(f"{machine['name']}: {machine['state']} ({machine['reason']})")
        elif args.command == "kill":
            conn.call(method + "Kill", {"name": args.name, "signal": signal_number(args.signal)})
        elif args.command == "remove":
            conn.call(method + "Remove", {"name": args.name})
        elif args.command == "log":
            from .console import follow_log

            return follow_log(conn, args.name, args.lines, args.follow)
        elif args.command == "console":
            from .console import attach

            return attach(conn, args.name, args.read_only, args.force)
        elif args.command == "screenshot":
            save_screenshot(conn, args.name, args.file, args.format)
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    # Only start and run validate a spec in the client (InvalidSpec before any call). The
    # error tree is imported on that path alone: loading it costs `list` and the other
    # one-shot verbs ~25 ms of their ~70 (docs/performance.md, "CLI start-up").
    spec_errors: tuple[type[Exception], ...] = ()
    if args.command in ("start", "run"):
        from vmspawnd.errors import InvalidSpec

        spec_errors = (InvalidSpec,)
    try:
        code = run(args)
    except VarlinkError as exc:
        print(f"vmspawnctl: {format_error(exc)}", file=sys.stderr)
        code = EXIT_FAILURE
    except ConnectionFailed as exc:
        print(f"vmspawnctl: {exc} (is vmspawnd running? see --address)", file=sys.stderr)
        code = EXIT_FAILURE
    except spec_errors as exc:
        print(f"vmspawnctl {args.command}: {exc}", file=sys.stderr)
        code = EXIT_USAGE
    except BrokenPipeError:
        code = EXIT_FAILURE
    sys.exit(code)


if __name__ == "__main__":
    main()
