# SPDX-License-Identifier: LGPL-2.1-or-later
"""--console=gui end to end: the test guest draws four colour bands on /dev/fb0
(virtio-vga), and the daemon's Screenshot (QMP screendump) must show them.

The daemon runs as root here, so the display is served on a VNC socket in the VM's
runtime directory (docs/vmspawnd.md, "Graphical console"); the test opens it as a
viewer would and checks the RFB greeting.

Nothing tells the host when the guest has finished drawing, so the test takes
screenshots until the pattern shows (bounded); each one is a real QMP round trip.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from vmspawnctl.varlink import Connection, JsonObject, VarlinkError

from tests.guest.build import Guest
from tests.support import BOOT_TIMEOUT, Daemon

pytestmark = pytest.mark.vm

MANAGER = "io.vmspawnd.Manager"
NAME = "gui"
# Top to bottom, as tests/guest/init.sh (draw_fb_pattern) draws them.
BANDS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]


@pytest.fixture(scope="module")
def vm(daemon: Daemon, guest: Guest) -> Iterator[JsonObject]:
    daemon.call(
        "Spawn",
        {
            "spec": {
                "name": NAME,
                "kvm": False,
                "ram": 256 << 20,
                "console": "gui",
                "linux": str(guest.kernel),
                "initrds": [str(guest.initrd)],
                "kernelCmdline": ["vmspawnd_test.mode=fbpattern"],
            }
        },
    )
    yield daemon.call("Describe", {"name": NAME})["machine"]
    daemon.call("Terminate", {"name": NAME})
    daemon.call("Remove", {"name": NAME})


def screenshot(daemon: Daemon, image_format: str = "ppm") -> bytes:
    with Connection(daemon.address, timeout=60) as conn:
        fd = conn.call_for_fd(f"{MANAGER}.Screenshot", {"name": NAME, "format": image_format})
    with open(fd, "rb") as image:
        return image.read()


def parse_ppm(data: bytes) -> tuple[int, int, bytes]:
    """Binary PPM (P6, maxval 255), as QEMU writes it: width, height, RGB bytes."""
    fields = data.split(maxsplit=4)
    assert fields[0] == b"P6" and fields[3] == b"255", data[:32]
    width, height = int(fields[1]), int(fields[2])
    pixels = fields[4]
    assert len(pixels) == width * height * 3
    return width, height, pixels


def band_match(width: int, height: int, pixels: bytes) -> list[float]:
    """For each band, the share of its pixels that have the band's colour."""
    shares = []
    rows = height // len(BANDS)
    for index, colour in enumerate(BANDS):
        band = pixels[index * rows * width * 3 : (index + 1) * rows * width * 3]
        want = bytes(colour)
        hits = sum(1 for i in range(0, len(band), 3 * 7) if band[i : i + 3] == want)  # every 7th pixel
        shares.append(hits / (len(band) // (3 * 7)))
    return shares


def wait_for_pattern(daemon: Daemon) -> tuple[int, int, list[float]]:
    deadline = time.monotonic() + BOOT_TIMEOUT
    while True:
        width, height, pixels = parse_ppm(screenshot(daemon))
        shares = band_match(width, height, pixels)
        if min(shares) > 0.99 or time.monotonic() > deadline:
            return width, height, shares
        time.sleep(0.5)  # no event says "drawn"; see the module docstring


def test_display_socket_speaks_vnc(daemon: Daemon, vm: JsonObject) -> None:
    assert vm["consoleAddress"] == ""  # no console device, as vmspawn's gui mode
    display = Path(str(vm["displayAddress"]))
    assert display.parent == Path(str(vm["runtimeDirectory"]))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as viewer:
        viewer.settimeout(30)
        viewer.connect(str(display))
        assert viewer.recv(12) == b"RFB 003.008\n"


def test_screenshot_shows_what_the_guest_drew(daemon: Daemon, vm: JsonObject, tmp_path: Path) -> None:
    width, height, shares = wait_for_pattern(daemon)
    assert min(shares) > 0.99, f"bands matched {shares}"
    # The CLI saves a PNG of the same size (IHDR: width, height after the signature).
    out = tmp_path / "screen.png"
    result = subprocess.run(
        [sys.executable, "-m", "vmspawnctl.main", "--address", daemon.address, "screenshot", NAME, str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    png = out.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", png[16:24]) == (width, height)
    # QEMU wrote the image into the VM's directory; nothing of it stays there.
    assert not list(Path(str(vm["runtimeDirectory"])).glob(".screenshot-*"))


def test_bad_screenshot_requests(daemon: Daemon, vm: JsonObject) -> None:
    with Connection(daemon.address, timeout=60) as conn:
        with pytest.raises(VarlinkError) as bad_format:
            conn.call(f"{MANAGER}.Screenshot", {"name": NAME, "format": "gif"})
        assert bad_format.value.short_name == "InvalidSpec"
        assert bad_format.value.parameters["field"] == "format"
        with pytest.raises(VarlinkError) as unknown:
            conn.call(f"{MANAGER}.Screenshot", {"name": "no-such-vm"})
        assert unknown.value.short_name == "NoSuchMachine"
    result = subprocess.run(
        [sys.executable, "-m", "vmspawnctl.main", "--address", daemon.address, "screenshot", NAME, "x.gif", "--format", "gif"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "--format" in result.stderr
