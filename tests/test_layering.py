"""Dependencies point one way: protocol <- crypto <- federation <- node.

Two kinds of check:

- static: every ``import`` in the source folders (parsed with :mod:`ast`,
  function-level imports included) respects the layer order, and the pure
  layers never name the network or event-loop modules;
- dynamic: importing ``hansa.protocol`` and ``hansa.crypto`` in a fresh
  interpreter does not load ``asyncio``, ``aiohttp`` or ``socket``.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["protocol", "crypto", "federation", "node"]
"""Source folders in dependency order; each may import only those before it."""
NETWORK = ("asyncio", "aiohttp", "socket", "ssl", "selectors", "http", "urllib", "uvloop")
"""Modules the pure layers (protocol, crypto) must never import."""


def _package(folder: str) -> str:
    return f"hansa.{folder}"


def _sources(folder: str) -> list[Path]:
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files, f"no sources under {folder}/"
    return files


def _imports(path: Path, package: str) -> Iterator[tuple[int, str]]:
    """Yield ``(line, absolute module name)`` for every import in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    parts = package.split(".")
    if path.name != "__init__.py":
        parts = [*parts, path.stem]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                # "from . import x" in hansa/protocol/codec.py means hansa.protocol.
                base = parts[: len(parts) - node.level]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            yield node.lineno, module
            for alias in node.names:  # "from hansa import node" imports hansa.node
                yield node.lineno, f"{module}.{alias.name}"
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.lineno, node.args[0].value


def _violations(folder: str, forbidden: list[str]) -> list[str]:
    found = []
    for path in _sources(folder):
        for line, module in _imports(path, _package(folder)):
            for bad in forbidden:
                if module == bad or module.startswith(bad + "."):
                    found.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return found


@pytest.mark.parametrize("index", range(len(LAYERS)), ids=LAYERS)
def test_layers_import_only_lower_layers(index: int) -> None:
    folder = LAYERS[index]
    higher = [_package(f) for f in LAYERS[index + 1 :]]
    assert _violations(folder, higher) == []


@pytest.mark.parametrize("folder", ["protocol", "crypto"])
def test_pure_layers_never_import_network_modules(folder: str) -> None:
    assert _violations(folder, list(NETWORK)) == []


def test_the_checker_sees_imports() -> None:
    # Guard against a checker that finds nothing: these imports exist today.
    crypto = {m for p in _sources("crypto") for _, m in _imports(p, "hansa.crypto")}
    assert "hansa.protocol.errors" in crypto
    assert "hansa.crypto.keys" in crypto  # a relative or absolute self-import
    assert _violations("crypto", ["hansa.protocol"])  # it does depend on protocol
    node = {m for p in _sources("node") for _, m in _imports(p, "hansa.node")}
    assert any(m.startswith("hansa.protocol") for m in node)


def test_relative_imports_are_resolved(tmp_path: Path) -> None:
    source = tmp_path / "codec.py"
    source.write_text(
        "from . import errors\nfrom ..crypto import keys\nfrom .x import y\n", encoding="utf-8"
    )
    found = {m for _, m in _imports(source, "hansa.protocol")}
    assert {
        "hansa.protocol.errors",
        "hansa.crypto",
        "hansa.crypto.keys",
        "hansa.protocol.x",
    } <= found


# --- dynamic: what a fresh interpreter loads ---------------------------------------------


def _loaded_after(code: str) -> set[str]:
    """Run ``code`` in a fresh interpreter and return the names in ``sys.modules``."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


_WITHOUT_TOP_PACKAGE = """
import sys, types
# Stand in for hansa/__init__.py (whose version lookup loads importlib.metadata) so
# that only the protocol and crypto layers and their dependencies are imported.
stub = types.ModuleType("hansa")
stub.__path__ = []
sys.modules["hansa"] = stub
import hansa.protocol, hansa.crypto
assert hansa.protocol.encode and hansa.crypto.seal
"""


def test_protocol_and_crypto_load_no_network_or_event_loop() -> None:
    loaded = _loaded_after(_WITHOUT_TOP_PACKAGE)
    assert "hansa.protocol.codec" in loaded
    assert "hansa.crypto.envelope" in loaded
    assert "msgspec" in loaded
    assert "nacl.bindings" in loaded
    assert {"asyncio", "aiohttp", "socket", "ssl", "selectors"}.isdisjoint(loaded)
    assert not any(m.startswith(("hansa.federation", "hansa.node")) for m in loaded)


def test_importing_the_package_loads_no_asyncio_or_aiohttp() -> None:
    loaded = _loaded_after("import hansa.protocol, hansa.crypto")
    assert "hansa.protocol" in loaded
    assert "hansa.crypto" in loaded
    assert "asyncio" not in loaded
    assert "aiohttp" not in loaded
    assert not any(m.startswith(("hansa.federation", "hansa.node")) for m in loaded)


def test_importing_the_package_loads_no_socket() -> None:
    loaded = _loaded_after("import hansa.protocol, hansa.crypto")
    assert "socket" not in loaded
    assert "importlib.metadata" not in loaded


def test_version_matches_the_distribution_metadata() -> None:
    from importlib.metadata import version

    import hansa

    assert hansa.__version__ == version("hansa")
