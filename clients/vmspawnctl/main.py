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

from . import output
from .usage import CommandLineParser, UsageError, usage_error
from .varlink import INTERFACE, Connection, ConnectionFailed, VarlinkError
from .views import display_state, machine_status, machine_table

if typing.TYPE_CHECKING:  # the shapes of the replies, for the type checker only: free at run time
    from vmspawnd.spec.wire import EventJson, MachineJson

EXIT_FAILURE = 1
EXIT_USAGE = 2
DEFAULT_POWEROFF_DEADLINE = 60.0  # the daemon's, for the progress line (docs/vmspawnctl.md: stop)
# The verbs with --json[=MODE] (only theirs is rewritten: start's words after the first
# positional are the kernel's).
JSON_VERBS = ("list", "status", "events", "snapshot")


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
    full = command not in {
        "list",
        "status",
        "stop",
        "terminate",
        "remove",
        "pause",
        "resume",
        "reboot",
        "log",
        "console",
        "events",
        "kill",
        "shutdown-all",
        "screenshot",
        "snapshot",
    }

    parser = CommandLineParser(prog="vmspawnctl", description="Control virtual machines supervised by vmspawnd.")
    parser.add_argument(
        "--address", default=None, help="vmspawnd socket (default: $VMSPAWN_ADDRESS, else the system or user instance)"
    )
    parser.add_argument("--version", action="version", version=f"vmspawnctl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    start = sub.add_parser(
        "start", help="spawn a VM (systemd-vmspawn options)", description="Spawn a VM; takes systemd-vmspawn's options."
    )
    if full:
        from .start_options import add_start_options

        add_start_options(start)
    start.add_argument("--wait", action="store_true", help="return only once the VM is ready (vmspawnctl extension)")
    start.add_argument(
        "--timeout", type=float, default=300.0, metavar="SECONDS", help="with --wait: give up after this long (default 300)"
    )
    start.add_argument(
        "--from-snapshot",
        metavar="BUNDLE",
        help="start a clone of a snapshot (its name, or the directory given to snapshot --output); "
        "-M names the clone (vmspawnctl extension)",
    )
    snap = sub.add_parser(
        "snapshot",
        help="save a running VM into a snapshot bundle; 'snapshot list', 'snapshot remove BUNDLE'",
        description="Pause the VM, save its state, disk and NVRAM into a bundle, resume it (or stop it with --stop). "
        "'snapshot list' lists the daemon's bundles, 'snapshot remove BUNDLE' deletes one. "
        "Start clones with 'start --from-snapshot=BUNDLE -M CLONE'.",
    )
    snap.add_argument("name", help="the VM to save, or 'list' or 'remove'")
    snap.add_argument("bundle", nargs="?", help="with 'remove': the bundle to delete (a name, or an --output directory)")
    snap.add_argument("--name", dest="bundle_name", metavar="BUNDLE", help="the bundle's name (default: the VM's name)")
    snap.add_argument("--output", metavar="DIR", help="write the bundle to DIR (absent or empty) instead of the daemon's store")
    snap.add_argument("--stop", action="store_true", help="stop the VM after saving it, instead of resuming it")
    add_json_option(snap, "print the Snapshot records as JSON")
    shutdown = sub.add_parser("shutdown-all", help="power off every running VM (host shutdown), terminating after the timeout")
    shutdown.add_argument(
        "--timeout", type=float, default=120.0, metavar="SECONDS", help="ACPI grace period per VM (default 120)"
    )

    lst = sub.add_parser("list", help="list VMs")
    add_json_option(lst, "print the Machine records as JSON")
    lst.add_argument("--no-legend", action="store_true", help="no column headers and no footer")
    status = sub.add_parser("status", help="show one VM")
    status.add_argument("name")
    add_json_option(status, "print the Machine record as JSON")
    stop = sub.add_parser("stop", help="power a VM off (ACPI), terminating it after the deadline")
    stop.add_argument("name")
    stop.add_argument(
        "--deadline", type=float, default=None, metavar="SECONDS", help="grace period before termination (default 60)"
    )
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
    log.add_argument(
        "--no-pager",
        action="store_true",
        help="do not pipe the history into a pager (on a terminal: $SYSTEMD_PAGER, $PAGER, less)",
    )
    console = sub.add_parser(
        "console",
        help="attach to a VM's console",
        description="Attach the terminal to a VM's console; Ctrl-] three times within 1s detaches (the VM keeps running).",
    )
    console.add_argument("name")
    console.add_argument("--read-only", action="store_true", help="watch only; any number of watchers may attach")
    console.add_argument("--force", action="store_true", help="take the console over from its current interactive client")
    run_parser = sub.add_parser(
        "run",
        help="run a VM in the foreground, like systemd-vmspawn",
        description="Drop-in for systemd-vmspawn: start the VM, attach its console, wait for it to end. "
        "Ctrl-] three times within 1s kills the VM; SIGINT/SIGTERM power it off; if this process dies, the VM is terminated.",
    )
    if full:
        from .run import add_run_options

        add_run_options(run_parser)
    shot = sub.add_parser(
        "screenshot",
        help="save the display of a --console=gui VM as an image",
        description="Save the guest's display (QEMU's screendump) to FILE, or to stdout for '-'.",
    )
    shot.add_argument("name")
    shot.add_argument("file", help="where to write the image ('-': stdout)")
    shot.add_argument(
        "--format", choices=("png", "ppm"), default=None, help="image format (default: from FILE's extension, else png)"
    )
    events = sub.add_parser("events", help="follow VM events (state changes, QMP events)")
    events.add_argument("name", nargs="?", help="only this VM")
    add_json_option(events, "print each event as JSON (short: one object per line)")
    kill = sub.add_parser("kill", help="send a signal to a VM's QEMU")
    kill.add_argument("name")
    kill.add_argument(
        "-s", "--signal", default="SIGTERM", help="signal name or number: SIGTERM, TERM, SIGRTMIN+4, 15 (default SIGTERM)"
    )
    return parser


def add_json_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--json",
        type=output.json_mode,
        default="off",
        metavar="MODE",
        help=f"{what}: pretty, short or off (default off; --json alone: pretty on a terminal, else short)",
    )


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
            # The daemon may say why in the operation: "snapshot (REASON)".
            operation, _, reason = str(p.get("operation")).partition(" (")
            text = f"cannot {operation} {p.get('name')!r} while it is {p.get('state')}"
            if reason:
                text += f": {reason.removesuffix(')')}"
            if p.get("operation") == "remove":
                text += f"; stop it first (vmspawnctl stop {p.get('name')}, or terminate to pull the plug)"
            return text
        case "StartFailed":
            message, tail = str(p.get("message")), str(p.get("stderrTail") or "").strip()
            # The daemon names QEMU's own error line in the message; the rest of its output
            # follows only if there is more to it.
            return f"failed to start ({p.get('step')}): {message}" + (f"\n{tail}" if tail and tail not in message else "")
        case "PermissionDenied":
            return "permission denied: this vmspawnd instance only serves its owner"
        case "Timeout":
            return f"timed out: {p.get('operation')}"
        case "NotSupported":
            return f"not supported: {p.get('feature')}"
        case "NoSuchSnapshot":
            return f"no snapshot bundle {p.get('bundle')!r} (see vmspawnctl snapshot list)"
        case "SnapshotIncompatible":
            options = p.get("options") or []
            named = f" ({', '.join(str(o) for o in options)})" if isinstance(options, list) and options else ""
            return f"snapshot {p.get('bundle')!r}: {p.get('reason')}{named}"
        case "ConsoleBusy":
            return (
                f"the console of {p.get('name')!r} is in use by another interactive client "
                "(use --force to take it over, or --read-only)"
            )
    return f"{exc.name}: {json.dumps(p)}" if p else exc.name


def follow_events(conn: Connection, name: str | None, json_mode: str) -> None:
    """Print events until interrupted (the stream never ends by itself)."""
    params = {"name": name} if name else {}
    try:
        for reply in conn.call_more(f"{INTERFACE}.SubscribeEvents", params):
            event: EventJson = reply["event"]
            if json_mode != "off":
                print(output.dumps(event, json_mode), flush=True)
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


def stop_with_progress(conn: Connection, name: str, deadline: float | None) -> MachineJson:
    """`stop`: the PowerOff call, which returns once the VM is down (up to the deadline and
    the escalation after it). On a terminal a progress line says what it is waiting for,
    so the wait is never silent."""
    import threading
    import time

    params: dict[str, object] = {"name": name}
    if deadline is not None:
        params["deadline"] = deadline
    if not sys.stderr.isatty():
        return typing.cast("MachineJson", conn.call(f"{INTERFACE}.PowerOff", params)["machine"])
    limit = DEFAULT_POWEROFF_DEADLINE if deadline is None else deadline
    done = threading.Event()

    def show_progress() -> None:
        started = time.monotonic()
        while True:
            waited = time.monotonic() - started
            if waited < limit:
                text = f"waiting for the guest to power off (ACPI power button)… {waited:.0f}s, terminating it after {limit:g}s"
            else:
                text = "the guest did not power off in time: terminating it…"
            print(f"\r\033[K{name}: {text}", end="", file=sys.stderr, flush=True)
            if done.wait(1.0):
                break
        print("\r\033[K", end="", file=sys.stderr, flush=True)

    progress = threading.Thread(target=show_progress, name="stop-progress", daemon=True)
    progress.start()
    try:
        return typing.cast("MachineJson", conn.call(f"{INTERFACE}.PowerOff", params)["machine"])
    finally:
        done.set()
        progress.join()


def shutdown_all(address: str, timeout: float) -> int:
    """ACPI power-off of every active VM at once (libvirt-guests' job at host shutdown)."""
    import threading

    with Connection(address) as conn:
        machines: list[MachineJson] = conn.call(f"{INTERFACE}.List")["machines"]
    active = [m["name"] for m in machines if m["state"] in ("starting", "running", "ready", "stopping")]
    if not active:
        print("No VM is running: nothing to power off.")
        return 0
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
        from .start_spec import clone_request_from_args, spec_from_args

        params: dict[str, object]
        if args.from_snapshot:
            params = {"spec": clone_request_from_args(args), "fromSnapshot": absolute_bundle(args.from_snapshot)}
        else:
            params = {"spec": spec_from_args(args).to_json()}
        with Connection(address) as conn:
            spawned: MachineJson = conn.call(method + "Spawn", params)["machine"]
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
            if args.json != "off":
                print(output.dumps(machines, args.json))
            else:
                colour = output.colour_enabled(sys.stdout)
                print("\n".join(machine_table(machines, legend=not args.no_legend, colour=colour)))
        elif args.command == "status":
            machine: MachineJson = conn.call(method + "Describe", {"name": args.name})["machine"]
            if args.json != "off":
                print(output.dumps(machine, args.json))
            else:
                print("\n".join(machine_status(machine, colour=output.colour_enabled(sys.stdout))))
        elif args.command == "stop":
            machine = stop_with_progress(conn, args.name, args.deadline)
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

            return follow_log(conn, args.name, args.lines, args.follow, pager=not args.no_pager)
        elif args.command == "console":
            from .console import attach

            return attach(conn, args.name, args.read_only, args.force)
        elif args.command == "screenshot":
            save_screenshot(conn, args.name, args.file, args.format)
        elif args.command == "snapshot":
            return snapshot_verb(conn, args)
    return 0


def absolute_bundle(reference: str) -> str:
    """A bundle name stays a name; anything that looks like a path becomes absolute."""
    return os.path.abspath(reference) if "/" in reference or reference.startswith(".") else reference


def snapshot_verb(conn: Connection, args: argparse.Namespace) -> int:
    """snapshot NAME | snapshot list | snapshot remove BUNDLE."""
    method = f"{INTERFACE}."
    if args.name == "list":
        bundles = conn.call(method + "ListSnapshots")["snapshots"]
        if args.json != "off":
            print(output.dumps(bundles, args.json))
        else:
            mib = 1024 * 1024
            for b in bundles:
                print(f"{b['name']}\t{b['machine']}\t{b['ram'] // mib}M RAM\t{b['stateSize'] // mib}M state\t{b['path']}")
        return 0
    if args.name == "remove":
        if not args.bundle:
            raise UsageError("snapshot remove needs the bundle to delete")
        conn.call(method + "RemoveSnapshot", {"bundle": absolute_bundle(args.bundle)})
        return 0
    if args.bundle:
        raise UsageError(f"unexpected argument {args.bundle!r}: snapshot takes one VM name")
    params: dict[str, object] = {"name": args.name, "stop": args.stop}
    if args.bundle_name:
        params["bundle"] = args.bundle_name
    if args.output:
        params["output"] = os.path.abspath(args.output)
    bundle = conn.call(method + "Snapshot", params)["snapshot"]
    if args.json != "off":
        print(output.dumps(bundle, args.json))
    else:
        print(f"{args.name}: saved to {bundle['path']} ({bundle['stateSize']} bytes of state in {bundle['saveSeconds']}s)")
    return 0


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if requested_command(argv) in JSON_VERBS:
        argv = output.expand_bare_json(argv, sys.stdout.isatty())
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
    except UsageError as exc:  # a start/run command line that cannot mean what it says
        usage_error(f"vmspawnctl {args.command}", str(exc))
    except BrokenPipeError:
        code = EXIT_FAILURE
    sys.exit(code)


if __name__ == "__main__":
    main()
