# SPDX-License-Identifier: LGPL-2.1-or-later
"""Firmware descriptor discovery, parsing and selection (vmspawnd.firmware)."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmspawnd.spec.firmware import (
    EntryKind,
    FirmwareDescriptor,
    descriptor_search_dirs,
    find_descriptor_paths,
    list_descriptor_paths,
    parse_descriptor,
    select_firmware,
)

R, M, X = EntryKind.REGULAR, EntryKind.MASK, EntryKind.OTHER

SYSTEM_FW_DIR = Path("/usr/share/qemu/firmware")


def _descriptor_doc(
    *,
    code: str = "/fw/CODE.fd",
    vars_: str = "/fw/VARS.fd",
    arch: str = "x86_64",
    features: list[str] | None = None,
) -> dict[str, Any]:
    return {
        "description": "test firmware",
        "interface-types": ["uefi"],
        "mapping": {
            "device": "flash",
            "executable": {"filename": code, "format": "raw"},
            "nvram-template": {"filename": vars_, "format": "raw"},
        },
        "targets": [{"architecture": arch, "machines": ["pc-q35-*"]}],
        "features": features if features is not None else ["acpi-s3"],
        "tags": [],
    }


def _desc(path: str, **kw: Any) -> FirmwareDescriptor:
    return parse_descriptor(path, json.dumps(_descriptor_doc(**kw)).encode())


# --------------------------------------------------------------------------------------
# conf-files semantics (pure)
# --------------------------------------------------------------------------------------


def test_listing_sorted_by_file_name_across_directories() -> None:
    listing = [
        ("/home/u/.config/qemu/firmware", {"70-mine.json": R}),
        ("/etc/qemu/firmware", {"10-local.json": R}),
        ("/usr/share/qemu/firmware", {"50-edk2.json": R, "60-edk2.json": R}),
    ]
    assert list_descriptor_paths(listing) == [
        "/etc/qemu/firmware/10-local.json",
        "/usr/share/qemu/firmware/50-edk2.json",
        "/usr/share/qemu/firmware/60-edk2.json",
        "/home/u/.config/qemu/firmware/70-mine.json",
    ]


def test_listing_higher_priority_directory_shadows_same_name() -> None:
    listing = [
        ("/home/u/.config/qemu/firmware", {"50-edk2.json": R}),
        ("/etc/qemu/firmware", {"50-edk2.json": R}),
        ("/usr/share/qemu/firmware", {"50-edk2.json": R}),
    ]
    assert list_descriptor_paths(listing) == ["/home/u/.config/qemu/firmware/50-edk2.json"]


def test_listing_mask_hides_lower_entries_and_itself() -> None:
    listing = [
        ("/etc/qemu/firmware", {"50-edk2.json": M}),
        ("/usr/share/qemu/firmware", {"50-edk2.json": R, "60-edk2.json": R}),
    ]
    assert list_descriptor_paths(listing) == ["/usr/share/qemu/firmware/60-edk2.json"]


def test_listing_mask_only_counts_when_first() -> None:
    listing = [
        ("/etc/qemu/firmware", {"50-edk2.json": R}),
        ("/usr/share/qemu/firmware", {"50-edk2.json": M}),
    ]
    assert list_descriptor_paths(listing) == ["/etc/qemu/firmware/50-edk2.json"]


def test_listing_non_regular_entry_does_not_shadow() -> None:
    # systemd only records an entry once it passed the "regular file" check.
    listing = [
        ("/etc/qemu/firmware", {"50-edk2.json": X}),
        ("/usr/share/qemu/firmware", {"50-edk2.json": R}),
    ]
    assert list_descriptor_paths(listing) == ["/usr/share/qemu/firmware/50-edk2.json"]


def test_listing_filters_suffix_and_hidden_files() -> None:
    listing = [
        (
            "/usr/share/qemu/firmware",
            {
                "50-edk2.json": R,
                "50-edk2.json~": R,
                "50-edk2.json.bak": R,
                "README": R,
                ".hidden.json": R,
                ".json": R,
                "x.JSON": R,
                "a.json": R,
            },
        )
    ]
    assert list_descriptor_paths(listing) == [
        "/usr/share/qemu/firmware/50-edk2.json",
        "/usr/share/qemu/firmware/a.json",
    ]


def test_listing_sort_is_bytewise() -> None:
    listing = [("/d", {"b.json": R, "B.json": R, "a.json": R, "_.json": R, "10.json": R, "9.json": R})]
    names = [p.rsplit("/", 1)[1] for p in list_descriptor_paths(listing)]
    assert names == ["10.json", "9.json", "B.json", "_.json", "a.json", "b.json"]


def test_listing_empty() -> None:
    assert list_descriptor_paths([]) == []
    assert list_descriptor_paths([("/etc/qemu/firmware", {})]) == []


@given(
    st.lists(
        st.dictionaries(
            st.sampled_from(["a.json", "b.json", "c.json", "d.txt", ".e.json"]),
            st.sampled_from([R, M, X]),
        ),
        min_size=1,
        max_size=3,
    )
)
def test_listing_model(dirs: list[dict[str, EntryKind]]) -> None:
    """Each name resolves to its first non-OTHER entry; it is listed iff that entry is REGULAR."""
    listing = [(f"/dir{i}", entries) for i, entries in enumerate(dirs)]
    result = list_descriptor_paths(listing)
    expected = []
    for name in sorted({n for d in dirs for n in d if n.endswith(".json") and not n.startswith(".")}):
        for i, entries in enumerate(dirs):
            kind = entries.get(name, X)
            if kind is R:
                expected.append(f"/dir{i}/{name}")
                break
            if kind is M:
                break
    assert result == expected


def test_search_dirs() -> None:
    assert descriptor_search_dirs("/xdg", home="/home/u") == [
        "/xdg/qemu/firmware",
        "/etc/qemu/firmware",
        "/usr/share/qemu/firmware",
    ]
    assert descriptor_search_dirs(None, home="/home/u")[0] == "/home/u/.config/qemu/firmware"
    assert descriptor_search_dirs("", home="/home/u")[0] == "/home/u/.config/qemu/firmware"
    assert descriptor_search_dirs("relative", home="/home/u")[0] == "/home/u/.config/qemu/firmware"
    assert descriptor_search_dirs("/xdg/", home="/home/u")[0] == "/xdg/qemu/firmware"


# --------------------------------------------------------------------------------------
# the directory-reading wrapper
# --------------------------------------------------------------------------------------


def test_find_descriptor_paths_reads_directories(tmp_path: Path) -> None:
    xdg = tmp_path / "xdg"
    user_dir = xdg / "qemu" / "firmware"
    user_dir.mkdir(parents=True)
    (user_dir / "00-mine.json").write_text("{}")
    (user_dir / "01-empty-masks.json").write_text("")  # empty file = mask
    (user_dir / "02-devnull.json").symlink_to("/dev/null")  # symlink to /dev/null = mask
    (user_dir / "03-dir.json").mkdir()  # not a regular file: ignored
    (user_dir / "04-dangling.json").symlink_to(tmp_path / "nowhere")
    (user_dir / "05-link.json").symlink_to(user_dir / "00-mine.json")  # symlink to a file: fine
    paths = find_descriptor_paths(str(xdg), home="/nonexistent")
    mine = [p for p in paths if p.startswith(str(user_dir))]
    assert mine == [str(user_dir / "00-mine.json"), str(user_dir / "05-link.json")]
    # the user's masks would hide system files of the same name
    assert not any(p.endswith(("/01-empty-masks.json", "/02-devnull.json")) for p in paths)


def test_find_descriptor_paths_mask_hides_system_file(tmp_path: Path) -> None:
    if not (SYSTEM_FW_DIR / "60-edk2-x86_64.json").exists():
        pytest.skip("host has no /usr/share/qemu/firmware/60-edk2-x86_64.json")
    user_dir = tmp_path / "qemu" / "firmware"
    user_dir.mkdir(parents=True)
    (user_dir / "60-edk2-x86_64.json").symlink_to("/dev/null")
    paths = find_descriptor_paths(str(tmp_path))
    assert not any(p.endswith("/60-edk2-x86_64.json") for p in paths)


def test_find_descriptor_paths_resolves_symlinked_directory(tmp_path: Path) -> None:
    real = tmp_path / "real" / "qemu" / "firmware"
    real.mkdir(parents=True)
    (real / "zz-test.json").write_text("{}")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    paths = find_descriptor_paths(str(tmp_path / "link"))
    assert str(real / "zz-test.json") in paths


def test_find_descriptor_paths_missing_user_dir(tmp_path: Path) -> None:
    paths = find_descriptor_paths(str(tmp_path / "does-not-exist"))
    assert all(p.startswith(("/etc/qemu/firmware/", "/usr/share/qemu/firmware/")) for p in paths)


# --------------------------------------------------------------------------------------
# parsing
# --------------------------------------------------------------------------------------


def test_parse_descriptor_fields() -> None:
    d = _desc("/x.json", code="/c.fd", vars_="/v.fd", features=["secure-boot", "requires-smm"])
    assert d.path == "/x.json"
    assert d.description == "test firmware"
    assert d.interface_types == ("uefi",)
    assert (d.executable_path, d.executable_format) == ("/c.fd", "raw")
    assert (d.nvram_template_path, d.nvram_template_format) == ("/v.fd", "raw")
    assert d.architectures == ("x86_64",)
    assert d.features == ("secure-boot", "requires-smm")
    assert d.tags == ()
    assert d.supports_secure_boot
    assert d.raw["mapping"]["device"] == "flash"


def test_parse_descriptor_tolerates_unknown_keys() -> None:
    doc = _descriptor_doc()
    doc["x-vendor"] = {"anything": 1}
    doc["mapping"]["mode"] = "split"
    doc["mapping"]["executable"]["x"] = 1
    doc["targets"][0]["x"] = []
    assert parse_descriptor("/x.json", json.dumps(doc).encode()).executable_path == "/fw/CODE.fd"


def _delete(doc: dict[str, Any], path: tuple[Any, ...]) -> None:
    for p in path[:-1]:
        doc = doc[p]
    del doc[path[-1]]


def _set(doc: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    for p in path[:-1]:
        doc = doc[p]
    doc[path[-1]] = value


MANDATORY = [
    ("description",),
    ("interface-types",),
    ("mapping",),
    ("mapping", "device"),
    ("mapping", "executable"),
    ("mapping", "executable", "filename"),
    ("mapping", "executable", "format"),
    ("mapping", "nvram-template"),
    ("mapping", "nvram-template", "filename"),
    ("mapping", "nvram-template", "format"),
    ("targets",),
    ("targets", 0, "architecture"),
    ("targets", 0, "machines"),
    ("features",),
    ("tags",),
]


@pytest.mark.parametrize("key", MANDATORY, ids=lambda k: ".".join(map(str, k)))
def test_parse_descriptor_missing_mandatory_key(key: tuple[Any, ...]) -> None:
    doc = _descriptor_doc()
    _delete(doc, key)
    with pytest.raises(ValueError, match=f"missing mandatory key '[^']*{key[-1]}'"):
        parse_descriptor("/x.json", json.dumps(doc).encode())


@pytest.mark.parametrize("key", MANDATORY, ids=lambda k: ".".join(map(str, k)))
@pytest.mark.parametrize("bad", [None, 1, True])
def test_parse_descriptor_wrong_type(key: tuple[Any, ...], bad: Any) -> None:
    doc = _descriptor_doc()
    _set(doc, key, bad)
    with pytest.raises(ValueError, match="must be"):
        parse_descriptor("/x.json", json.dumps(doc).encode())


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.__setitem__("features", ["ok", 3]),
        lambda d: d.__setitem__("targets", ["x86_64"]),
        lambda d: d["mapping"].__setitem__("executable", "/fw/CODE.fd"),
    ],
)
def test_parse_descriptor_structural_errors(mutate: Any) -> None:
    doc = _descriptor_doc()
    mutate(doc)
    with pytest.raises(ValueError, match="must be"):
        parse_descriptor("/x.json", json.dumps(doc).encode())


def test_parse_descriptor_memory_mapping_without_nvram_is_rejected() -> None:
    # Stateless / "memory" firmware has no nvram-template, so vmspawn never selects it.
    doc = _descriptor_doc()
    doc["mapping"] = {"device": "memory", "filename": "/fw/OVMF.fd"}
    with pytest.raises(ValueError, match=r"mapping\.executable"):
        parse_descriptor("/x.json", json.dumps(doc).encode())


@pytest.mark.parametrize("data", [b"", b"{", b"[]", b'"x"', b"\xff\xfe", b'{"description": NaN}'])
def test_parse_descriptor_bad_json(data: bytes) -> None:
    with pytest.raises(ValueError, match=r"/x\.json"):
        parse_descriptor("/x.json", data)


def test_parse_descriptor_multiple_targets_in_order() -> None:
    doc = _descriptor_doc()
    doc["targets"] = [
        {"architecture": "i386", "machines": []},
        {"architecture": "x86_64", "machines": ["pc-q35-*"]},
    ]
    assert parse_descriptor("/x.json", json.dumps(doc).encode()).architectures == ("i386", "x86_64")


@pytest.mark.skipif(not SYSTEM_FW_DIR.is_dir(), reason="no system firmware descriptors")
def test_parse_all_real_descriptors() -> None:
    files = sorted(SYSTEM_FW_DIR.glob("*.json"))
    assert files
    for f in files:
        d = parse_descriptor(str(f), f.read_bytes())
        assert d.executable_path.startswith("/")
        assert d.nvram_template_path.startswith("/")
        assert d.architectures


# --------------------------------------------------------------------------------------
# selection
# --------------------------------------------------------------------------------------


@pytest.fixture
def debian_like() -> list[FirmwareDescriptor]:
    """The three descriptors Debian's ovmf package ships, in conf-files order."""
    return [
        _desc("/d/40-secure-enrolled.json", code="/c.ms.fd", features=["secure-boot", "enrolled-keys", "requires-smm"]),
        _desc("/d/50-secure.json", code="/c.secboot.fd", features=["secure-boot", "requires-smm"]),
        _desc("/d/60-plain.json", code="/c.fd", features=["acpi-s3"]),
    ]


def test_select_default_skips_enrolled_keys(debian_like: list[FirmwareDescriptor]) -> None:
    assert select_firmware(debian_like, "x86_64", None).path == "/d/50-secure.json"


def test_select_secure_boot_yes(debian_like: list[FirmwareDescriptor]) -> None:
    chosen = select_firmware(debian_like, "x86_64", True)
    assert chosen.path == "/d/50-secure.json" and chosen.supports_secure_boot


def test_select_secure_boot_no(debian_like: list[FirmwareDescriptor]) -> None:
    chosen = select_firmware(debian_like, "x86_64", False)
    assert chosen.path == "/d/60-plain.json" and not chosen.supports_secure_boot


def test_select_requires_architecture(debian_like: list[FirmwareDescriptor]) -> None:
    with pytest.raises(LookupError, match=r"^Failed to find OVMF config"):
        select_firmware(debian_like, "aarch64", None)
    ia32 = _desc("/d/10-ia32.json", arch="i386")
    assert select_firmware([ia32, *debian_like], "x86_64", None).path == "/d/50-secure.json"
    assert select_firmware([ia32, *debian_like], "i386", None).path == "/d/10-ia32.json"


def test_select_only_enrolled_keys_fails() -> None:
    only = [_desc("/d/a.json", features=["secure-boot", "enrolled-keys"])]
    with pytest.raises(LookupError, match="Failed to find OVMF config"):
        select_firmware(only, "x86_64", True)


def test_select_first_acceptable_wins_in_given_order() -> None:
    a = _desc("/d/a.json", code="/a.fd")
    b = _desc("/d/b.json", code="/b.fd")
    assert select_firmware([a, b], "x86_64", None) is a
    assert select_firmware([b, a], "x86_64", None) is b


def test_select_empty() -> None:
    with pytest.raises(LookupError, match="Failed to find OVMF config"):
        select_firmware([], "x86_64", None)


@pytest.mark.skipif(
    not (SYSTEM_FW_DIR / "50-edk2-x86_64-secure.json").exists(), reason="Debian/Ubuntu OVMF descriptors not installed"
)
def test_real_system_descriptors_end_to_end(tmp_path: Path) -> None:
    # An empty user directory so that only the system descriptors count.
    paths = [p for p in find_descriptor_paths(str(tmp_path)) if p.startswith(str(SYSTEM_FW_DIR))]
    names = [os.path.basename(p) for p in paths]
    assert names == sorted(names)
    descriptors = [parse_descriptor(p, Path(p).read_bytes()) for p in paths]
    auto = select_firmware(descriptors, "x86_64", None)
    assert auto.path.endswith("/50-edk2-x86_64-secure.json")
    assert auto.supports_secure_boot
    assert "enrolled-keys" not in auto.features
    plain = select_firmware(descriptors, "x86_64", False)
    assert plain.path.endswith("/60-edk2-x86_64.json")
    assert not plain.supports_secure_boot
    assert select_firmware(descriptors, "x86_64", True) == auto


def test_descriptor_equality_ignores_raw() -> None:
    a = _desc("/x.json")
    b = copy.copy(a)
    object.__setattr__(b, "raw", {"different": True})
    assert a == b
