# SPDX-License-Identifier: LGPL-2.1-or-later
"""The package boundaries hold: what the CLI may load, what `spec/` is, who speaks Varlink.

docs/architecture.md draws these lines; the tests read every import statement (the static
check: an import inside a function counts too) and, for the CLI, load it in a fresh
interpreter and list what it really imported.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "vmspawnd"
CLIENT = ROOT / "clients" / "vmspawnctl"

# The daemon modules a client may use: the pure, asyncio-free spec side and the error tree.
CLIENT_MAY_IMPORT = ("vmspawnd", "vmspawnd.errors", "vmspawnd.spec")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT / "clients" if path.is_relative_to(CLIENT) else ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports, absolute, anywhere in the file."""
    found: set[str] = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def allowed(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes if p != "vmspawnd") or name == "vmspawnd"


def test_the_cli_imports_only_the_pure_side_of_the_daemon_package() -> None:
    for path in CLIENT.rglob("*.py"):
        daemon_side = {m for m in imports_of(path) if m == "vmspawnd" or m.startswith("vmspawnd.")}
        # `from vmspawnd import __version__, override` names attributes, not modules.
        daemon_side -= {"vmspawnd.__version__", "vmspawnd.override"}
        bad = sorted(m for m in daemon_side if not allowed(m, CLIENT_MAY_IMPORT))
        assert not bad, f"{path.relative_to(ROOT)} imports daemon internals: {bad}"


def test_the_spec_package_is_pure() -> None:
    """spec/ is shared with the CLI: no asyncio, no Varlink, no other daemon package."""
    for path in (PACKAGE / "spec").rglob("*.py"):
        imported = imports_of(path)
        bad = sorted(
            m
            for m in imported
            if m.split(".")[0] in {"asyncio", "asyncvarlink", "qemu", "dbus_fast"}
            or (m.startswith("vmspawnd.") and not allowed(m, ("vmspawnd.errors", "vmspawnd.spec")))
        )
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_only_the_varlink_package_imports_asyncvarlink() -> None:
    outside = sorted(
        str(path.relative_to(ROOT))
        for path in PACKAGE.rglob("*.py")
        if not path.is_relative_to(PACKAGE / "varlink") and any(m.split(".")[0] == "asyncvarlink" for m in imports_of(path))
    )
    assert not outside, f"asyncvarlink imported outside vmspawnd/varlink: {outside}"


@pytest.mark.parametrize("argv", [["list"], ["start", "--help"]])
def test_the_cli_loads_no_daemon_internals_at_run_time(argv: list[str]) -> None:
    """What a real `vmspawnctl` process has in sys.modules after parsing its command line."""
    code = (
        "import json, sys\n"
        "from vmspawnctl import main\n"
        f"try:\n    main.build_parser({argv!r}).parse_args({argv!r})\nexcept SystemExit:\n    pass\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('vmspawnd', 'asyncio', 'asyncvarlink')))))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    bad = [m for m in loaded if not allowed(m, CLIENT_MAY_IMPORT)]
    assert not bad, f"vmspawnctl {' '.join(argv)} loaded {bad}"
    if argv == ["list"]:  # the one-shot verbs load nothing of the daemon package but its version
        assert [m for m in loaded if m.startswith("vmspawnd")] == ["vmspawnd"], loaded


def test_the_module_map_in_architecture_md_is_the_tree() -> None:
    """docs/architecture.md lists every module of the package, and nothing that is gone."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text[text.index("## Modules") :]
    documented = set(re.findall(r"^\| `(vmspawnd/[\w/]+\.py)` \|", section, flags=re.M))
    present = {str(path.relative_to(ROOT)) for path in PACKAGE.rglob("*.py")}
    assert documented == present, (
        f"missing from the map: {sorted(present - documented)}; no longer in the tree: {sorted(documented - present)}"
    )


def test_the_five_files_from_start_to_argv_exist() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text[text.index("### From `vmspawnctl start` to the QEMU argv") :]
    files = re.findall(r"^\d\. `([\w/]+\.py)`", section, flags=re.M)
    assert 0 < len(files) <= 5
    assert all((ROOT / f).is_file() for f in files), files


def test_the_client_names_the_daemons_interface() -> None:
    """The CLI keeps its own copy of the interface name (importing errors costs start-up)."""
    from vmspawnctl.varlink import INTERFACE as CLIENT_INTERFACE

    from vmspawnd.errors import INTERFACE

    assert CLIENT_INTERFACE == INTERFACE
