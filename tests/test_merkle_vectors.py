"""transparency-dev/merkle conformance vectors for inclusion and consistency proofs.

Every JSON probe under ``vectors/transparency-dev-merkle/testdata/{inclusion,consistency}``
is one test: the verifier must return ``not wantErr``. Fields are described in
``shared/vectors/README.md``; hashes are base64 and absent values are ``null``. The happy
paths are built from the standard RFC 6962 leaves, so they are also regenerated.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import SHARED, shared_path

from hansa.crypto.merkle import (
    MerkleTree,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    root_hash,
    verify_consistency,
    verify_inclusion,
)

TESTDATA = ("vectors", "transparency-dev-merkle", "testdata")

# The standard RFC 6962 test leaves the upstream generator (cmd/proofgen) uses.
STANDARD_LEAVES = [
    bytes.fromhex(h)
    for h in (
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    )
]


def _params(kind: str) -> list[Any]:
    """One param per vector file, id = path relative to ``testdata``."""
    root = SHARED.joinpath(*TESTDATA)
    files = sorted(root.joinpath(kind).glob("**/*.json")) if root.is_dir() else []
    if not files:
        # Resolved inside the test through shared_path, which skips with a reason.
        return [pytest.param(f"{kind}/<absent>", id=f"{kind}-absent")]
    return [
        pytest.param(p.relative_to(root).as_posix(), id=p.relative_to(root).as_posix())
        for p in files
    ]


def _load(relative: str) -> dict[str, Any]:
    path: Path = shared_path(*TESTDATA, *relative.split("/"))
    data = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def _b64(value: object) -> bytes:
    """Decode a base64 hash; a null or absent value is the empty (invalid) hash."""
    if value is None:
        return b""
    assert isinstance(value, str)
    return base64.b64decode(value, validate=True)


def _proof(value: object) -> list[bytes]:
    if value is None:
        return []
    assert isinstance(value, list)
    return [_b64(v) for v in value]


@pytest.mark.parametrize("relative", _params("inclusion"))
def test_inclusion_vector(relative: str) -> None:
    v = _load(relative)
    got = verify_inclusion(
        _b64(v.get("leafHash")),
        v["leafIdx"],
        v["treeSize"],
        _proof(v.get("proof")),
        _b64(v.get("root")),
    )
    assert got is (not v["wantErr"]), v["desc"]


@pytest.mark.parametrize("relative", _params("consistency"))
def test_consistency_vector(relative: str) -> None:
    v = _load(relative)
    got = verify_consistency(
        v["size1"], v["size2"], _b64(v.get("root1")), _b64(v.get("root2")), _proof(v.get("proof"))
    )
    assert got is (not v["wantErr"]), v["desc"]


def _happy_paths(kind: str) -> list[str]:
    return sorted(
        p.relative_to(SHARED.joinpath(*TESTDATA)).as_posix()
        for p in shared_path(*TESTDATA, kind).glob("*/happy-path.json")
    )


def test_vector_sets_are_complete() -> None:
    # Guard against a partial checkout silently shrinking the conformance run (README: 98 each).
    for kind in ("inclusion", "consistency"):
        assert len(list(shared_path(*TESTDATA, kind).glob("**/*.json"))) == 98, kind
        assert len(_happy_paths(kind)) == 5, kind


def test_regenerate_inclusion_happy_paths() -> None:
    tree = MerkleTree()
    for entry in STANDARD_LEAVES:
        tree.append(entry)
    for relative in _happy_paths("inclusion"):
        v = _load(relative)
        index, size = v["leafIdx"], v["treeSize"]
        leaves = STANDARD_LEAVES[:size]
        assert leaf_hash(leaves[index]) == _b64(v["leafHash"]), relative
        assert root_hash(leaves) == tree.root_at(size) == _b64(v["root"]), relative
        want = _proof(v.get("proof"))
        assert inclusion_proof(leaves, index) == want, relative
        assert tree.inclusion_proof(index, size) == want, relative


def test_regenerate_consistency_happy_paths() -> None:
    tree = MerkleTree()
    for entry in STANDARD_LEAVES:
        tree.append(entry)
    for relative in _happy_paths("consistency"):
        v = _load(relative)
        size1, size2 = v["size1"], v["size2"]
        assert tree.root_at(size1) == _b64(v["root1"]), relative
        assert tree.root_at(size2) == _b64(v["root2"]), relative
        want = _proof(v.get("proof"))
        assert consistency_proof(STANDARD_LEAVES[:size2], size1) == want, relative
        assert tree.consistency_proof(size1, size2) == want, relative
