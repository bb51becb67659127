"""The committed spec vectors (``spec/vectors/*.json``) against the generator and the code.

Three layers:

1. Regenerate every vector file in memory and require byte equality with
   the committed files, so a change to the generator or to anything it reads
   must be committed together with its vectors (CI re-runs the generator).
2. Check each committed vector against the implementation: keys, PAE,
   envelopes (valid ones open, invalid ones fail with the stated code),
   message bodies (decode to the stated value, re-encode byte for byte),
   replay-guard scenarios, Merkle proofs, checkpoints and cosignatures.
3. Check that ``spec/protocol.md`` agrees with the code: the error-code table
   (§9) with :class:`~hansa.protocol.errors.ErrorCode`, every struct field
   table with the msgspec struct, and the limits table (§5.1) with the
   ``MAX_*`` constants.
"""

from __future__ import annotations

import enum
import importlib.util
import json
import re
import sys
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import msgspec
import pytest

from hansa.crypto import merkle
from hansa.crypto.envelope import open_envelope, seal
from hansa.crypto.keyfile import read_key_file
from hansa.crypto.keys import PublicKey, SigningKey, key_id, verify_strict
from hansa.crypto.note import (
    Checkpoint,
    CosignatureSigner,
    NoteSigner,
    NoteVerifier,
    cosign_checkpoint,
    open_checkpoint,
    sign_checkpoint,
)
from hansa.federation.sketch import (
    bucket_index,
    merge_sketches,
    sketch_from_values,
    sketch_quantiles,
)
from hansa.protocol import envelope as envelope_module
from hansa.protocol import messages
from hansa.protocol.codec import decode_as, encode
from hansa.protocol.envelope import pae
from hansa.protocol.errors import (
    ErrorCode,
    HansaError,
    KeyFileError,
    NoteError,
    SignatureError,
)
from hansa.protocol.freshness import FreshnessLimits, ReplayGuard

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "spec"
VECTORS = SPEC / "vectors"
PROTOCOL_MD = SPEC / "protocol.md"


@cache
def generator() -> ModuleType:
    """Import ``spec/generate_vectors.py`` (not a package) by path."""
    spec = importlib.util.spec_from_file_location(
        "hansa_spec_generate_vectors", SPEC / "generate_vectors.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@cache
def vectors(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / name).read_text(encoding="utf-8"))
    return data


def cases(name: str, key: str) -> list[Any]:
    """Parametrize over ``vectors(name)[key]``, with each case's name as its id."""
    items: list[dict[str, Any]] = vectors(name)[key]
    return [pytest.param(item, id=str(item.get("name", i))) for i, item in enumerate(items)]


def seeds() -> dict[str, bytes]:
    return {k["name"]: bytes.fromhex(k["seed"]) for k in vectors("keys.json")["valid"]}


def code_of(action: Callable[[], object]) -> str:
    """Run ``action`` and return the ErrorCode name it fails with ("ok" if it succeeds)."""
    try:
        action()
    except HansaError as exc:
        return exc.code.name
    return "ok"


# --- 1. the committed files are what the generator writes ---------------------------------


def test_committed_vectors_equal_a_fresh_generation() -> None:
    problems = generator().check(VECTORS)
    assert not problems, "spec/vectors is out of date; run python spec/generate_vectors.py\n" + (
        "\n".join(problems)
    )


def test_every_vector_file_is_rendered_canonically() -> None:
    for path in sorted(VECTORS.glob("*.json")):
        text = path.read_text(encoding="utf-8")
        assert (
            text
            == json.dumps(json.loads(text), sort_keys=True, indent=2, ensure_ascii=False) + "\n"
        ), path.name


def test_check_reports_a_changed_file(tmp_path: Path) -> None:
    gen = generator()
    gen.write(tmp_path)
    assert gen.check(tmp_path) == []
    target = tmp_path / "pae.json"
    target.write_text(target.read_text(encoding="utf-8").replace("DSSEv1", "DSSEv2"), "utf-8")
    (tmp_path / "stray.json").write_text("{}\n", encoding="utf-8")
    problems = gen.check(tmp_path)
    assert any(p.startswith("pae.json: differs") for p in problems)
    assert any(p.startswith("stray.json") for p in problems)
    assert gen.main(["--check"]) == 0


# --- 2a. keys and PAE (§3, §4.2) ---------------------------------------------------------


@pytest.mark.parametrize("case", cases("keys.json", "valid"))
def test_seed_gives_public_key_and_key_id(case: dict[str, Any]) -> None:
    key = SigningKey(bytes.fromhex(case["seed"]))
    assert key.public_key.raw.hex() == case["public_key"]
    assert key.key_id.hex() == case["key_id"] == key_id(key.public_key.raw).hex()
    assert bytes.fromhex(case["key_id_input_hex"]).startswith(
        bytes.fromhex(vectors("keys.json")["key_id_prefix_hex"])
    )


@pytest.mark.parametrize("case", cases("keys.json", "invalid_public_keys"))
def test_invalid_public_key_is_refused(case: dict[str, Any]) -> None:
    with pytest.raises(SignatureError) as info:
        PublicKey(bytes.fromhex(case["public_key"]))
    assert info.value.code.name == case["error"]


@pytest.mark.parametrize("case", cases("keys.json", "signatures"))
def test_strict_verification(case: dict[str, Any]) -> None:
    ok = verify_strict(
        bytes.fromhex(case["public_key"]),
        bytes.fromhex(case["message_hex"]),
        bytes.fromhex(case["signature"]),
    )
    assert ok is case["valid"]


@pytest.mark.parametrize("case", cases("pae.json", "vectors"))
def test_pae(case: dict[str, Any]) -> None:
    data = pae(case["payload_type"], bytes.fromhex(case["payload_hex"]))
    assert data.hex() == case["pae_hex"]
    if "pae_text" in case:
        assert data == case["pae_text"].encode()


# --- 2b. envelopes (§4) ------------------------------------------------------------------


def trusted_keys() -> dict[bytes, PublicKey]:
    env = vectors("envelopes.json")
    keys = (PublicKey(bytes.fromhex(env["keys"][name]["public_key"])) for name in env["trusted"])
    return {k.key_id: k for k in keys}


@pytest.mark.parametrize("case", cases("envelopes.json", "valid"))
def test_valid_envelope_opens_and_reseals_byte_exactly(case: dict[str, Any]) -> None:
    data = bytes.fromhex(case["envelope_hex"])
    cls = getattr(messages, case["expected_type"])
    opened = open_envelope(data, trusted_keys(), cls)
    assert opened.message_id.hex() == case["message_id"]
    assert opened.signer.key_id.hex() == case["key_id"]
    assert opened.envelope.payload.hex() == case["body_hex"]
    assert opened.envelope.signature.hex() == case["signature"]
    assert pae(case["payload_type"], opened.envelope.payload).hex() == case["pae_hex"]
    assert seal(opened.message, SigningKey(seeds()[case["signer"]])) == data


@pytest.mark.parametrize("case", cases("envelopes.json", "invalid"))
def test_invalid_envelope_is_rejected_with_its_code(case: dict[str, Any]) -> None:
    cls = getattr(messages, case["expected_type"])
    data = bytes.fromhex(case["envelope_hex"])
    kwargs = {"max_size": case["max_size"]} if "max_size" in case else {}
    got = code_of(lambda: open_envelope(data, trusted_keys(), cls, **kwargs))
    assert got == case["error"], case["why"]


def test_every_payload_type_has_a_valid_envelope_vector() -> None:
    seen = {c["payload_type"] for c in vectors("envelopes.json")["valid"]}
    assert seen == {pt.value for pt in envelope_module.PayloadType}


# --- 2c. message bodies (§5-§7) ------------------------------------------------------------


def named(value: Any) -> Any:
    """Render a decoded struct the way the vectors' ``value`` does (bytes as hex)."""
    if isinstance(value, msgspec.Struct):
        out: dict[str, Any] = {"kind": value.__struct_config__.tag}
        for field in value.__struct_fields__:
            out[field] = named(getattr(value, field))
        return out
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, tuple | list):
        return [named(v) for v in value]
    return value


def wire_structs() -> Iterator[type[msgspec.Struct]]:
    for obj in vars(messages).values():
        if (
            isinstance(obj, type)
            and issubclass(obj, msgspec.Struct)
            and isinstance(obj.__struct_config__.tag, str)
            and not obj.__name__.startswith("_")
        ):
            yield obj


@pytest.mark.parametrize("case", cases("messages.json", "valid"))
def test_valid_body_decodes_to_its_value_and_reencodes(case: dict[str, Any]) -> None:
    body = bytes.fromhex(case["body_hex"])
    decoded = decode_as(body, getattr(messages, case["type"]))
    assert named(decoded) == case["value"]
    assert encode(decoded) == body


@pytest.mark.parametrize("case", cases("messages.json", "valid_non_canonical"))
def test_non_canonical_body_is_accepted(case: dict[str, Any]) -> None:
    body = bytes.fromhex(case["body_hex"])
    decoded = decode_as(body, getattr(messages, case["type"]))
    assert named(decoded) == case["value"]
    assert encode(decoded).hex() == case["canonical_hex"] != case["body_hex"]


@pytest.mark.parametrize("case", cases("messages.json", "invalid"))
def test_invalid_body_is_rejected_with_its_code(case: dict[str, Any]) -> None:
    body = bytes.fromhex(case["body_hex"])
    got = code_of(lambda: decode_as(body, getattr(messages, case["type"])))
    assert got == case["error"], case["why"]


def test_every_wire_struct_has_a_valid_body_vector() -> None:
    covered = {c["type"] for c in vectors("messages.json")["valid"]}
    assert {cls.__name__ for cls in wire_structs()} <= covered


def test_every_enum_value_appears_in_some_valid_body() -> None:
    text = json.dumps(vectors("messages.json")["valid"])
    for enum_type in (
        messages.FilterOp,
        messages.TimeUnit,
        messages.ColumnType,
        messages.ColumnRole,
        messages.SuppressionReason,
        messages.ResultScope,
    ):
        for member in enum_type:
            assert f'"{member.value}"' in text, f"{enum_type.__name__}.{member.name}"


# --- 2d. freshness and replay (§8) ---------------------------------------------------------


@pytest.mark.parametrize("scenario", cases("replay.json", "scenarios"))
def test_replay_scenario(scenario: dict[str, Any]) -> None:
    guard = ReplayGuard(vectors("replay.json")["audience"], FreshnessLimits(**scenario["limits"]))
    for number, step in enumerate(scenario["steps"]):

        def run(step: dict[str, Any] = step) -> None:
            guard.check(
                message_id=bytes.fromhex(step["message_id"]),
                requester=step["requester"],
                nonce=bytes.fromhex(step["nonce"]),
                audience=step["audience"],
                issued_at=step["issued_at"],
                expires_at=step["expires_at"],
                now_ms=step["now_ms"],
            )

        assert code_of(run) == step["expect"], f"step {number}"


def test_replay_defaults_are_the_code_defaults() -> None:
    limits = FreshnessLimits()
    assert vectors("replay.json")["defaults"] == {
        "max_skew_ms": limits.max_skew_ms,
        "max_validity_ms": limits.max_validity_ms,
        "capacity": limits.capacity,
    }


# --- 2e. Merkle tree (§11) -------------------------------------------------------------------


def leaves() -> list[bytes]:
    return [bytes.fromhex(x) for x in vectors("merkle.json")["leaves_hex"]]


def test_merkle_leaf_hashes_and_roots() -> None:
    data = vectors("merkle.json")
    assert [merkle.leaf_hash(x).hex() for x in leaves()] == data["leaf_hashes"]
    tree = merkle.MerkleTree()
    assert tree.root().hex() == data["roots"]["0"] == merkle.root_hash([]).hex()
    for n, leaf in enumerate(leaves(), start=1):
        tree.append(leaf)
        assert merkle.root_hash(leaves()[:n]).hex() == data["roots"][str(n)]
        assert tree.root().hex() == data["roots"][str(n)]
    for n in range(len(leaves()) + 1):
        assert tree.root_at(n).hex() == data["roots"][str(n)]


def built_tree() -> merkle.MerkleTree:
    tree = merkle.MerkleTree()
    for leaf in leaves():
        tree.append(leaf)
    return tree


@pytest.mark.parametrize("case", cases("merkle.json", "inclusion"))
def test_merkle_inclusion(case: dict[str, Any]) -> None:
    m, n = case["leaf_index"], case["tree_size"]
    proof = [bytes.fromhex(h) for h in case["proof"]]
    assert merkle.inclusion_proof(leaves()[:n], m) == proof
    assert built_tree().inclusion_proof(m, n) == proof
    assert merkle.verify_inclusion(
        bytes.fromhex(case["leaf_hash"]), m, n, proof, bytes.fromhex(case["root"])
    )


@pytest.mark.parametrize("case", cases("merkle.json", "consistency"))
def test_merkle_consistency(case: dict[str, Any]) -> None:
    m, n = case["size1"], case["size2"]
    proof = [bytes.fromhex(h) for h in case["proof"]]
    assert merkle.consistency_proof(leaves()[:n], m) == proof
    assert built_tree().consistency_proof(m, n) == proof
    assert merkle.verify_consistency(
        m, n, bytes.fromhex(case["root1"]), bytes.fromhex(case["root2"]), proof
    )


@pytest.mark.parametrize("case", cases("merkle.json", "invalid_inclusion"))
def test_merkle_invalid_inclusion(case: dict[str, Any]) -> None:
    proof = [bytes.fromhex(h) for h in case["proof"]]
    assert not merkle.verify_inclusion(
        bytes.fromhex(case["leaf_hash"]),
        case["leaf_index"],
        case["tree_size"],
        proof,
        bytes.fromhex(case["root"]),
    )


@pytest.mark.parametrize("case", cases("merkle.json", "invalid_consistency"))
def test_merkle_invalid_consistency(case: dict[str, Any]) -> None:
    proof = [bytes.fromhex(h) for h in case["proof"]]
    assert not merkle.verify_consistency(
        case["size1"],
        case["size2"],
        bytes.fromhex(case["root1"]),
        bytes.fromhex(case["root2"]),
        proof,
    )


# --- 2f. signed notes, checkpoints, cosignatures (§12) -----------------------------------------


def log_verifier() -> NoteVerifier:
    return NoteVerifier.from_vkey(vectors("notes.json")["log"]["vkey"])


def witness_verifier() -> NoteVerifier:
    return NoteVerifier.from_vkey(vectors("notes.json")["witness"]["vkey"])


def test_note_vkeys_and_key_ids() -> None:
    data = vectors("notes.json")
    for role, verifier in (("log", log_verifier()), ("witness", witness_verifier())):
        assert verifier.name == data[role]["name" if role == "witness" else "origin"]
        assert verifier.key_id.hex() == data[role]["key_id"]
        assert verifier.public_key.raw.hex() == data[role]["public_key"]
        assert verifier.vkey == data[role]["vkey"]


@pytest.mark.parametrize("case", cases("notes.json", "checkpoints"))
def test_checkpoint_signs_verifies_and_cosigns_byte_exactly(case: dict[str, Any]) -> None:
    data = vectors("notes.json")
    log = NoteSigner(data["log"]["origin"], SigningKey(seeds()[data["log"]["key"]]))
    witness = CosignatureSigner(
        data["witness"]["name"], SigningKey(seeds()[data["witness"]["key"]])
    )
    checkpoint = Checkpoint(data["log"]["origin"], case["tree_size"], bytes.fromhex(case["root"]))
    assert checkpoint.to_text() == case["body"]
    signed = sign_checkpoint(checkpoint, log)
    assert signed == case["signed_note"].encode()
    cosigned = cosign_checkpoint(signed, witness, case["cosignature_timestamp"])
    assert cosigned == case["cosigned_note"].encode()
    opened = open_checkpoint(cosigned, log_verifier(), witnesses=[witness_verifier()])
    assert opened.checkpoint == checkpoint
    assert [c.timestamp for c in opened.cosignatures] == [case["cosignature_timestamp"]]
    assert open_checkpoint(signed, log_verifier()).checkpoint == checkpoint


@pytest.mark.parametrize("case", cases("notes.json", "invalid"))
def test_invalid_checkpoint_note_is_rejected(case: dict[str, Any]) -> None:
    with pytest.raises(NoteError):
        open_checkpoint(case["note"].encode(), log_verifier())


# --- 2g. key files (§3.5) and DDSketch (§7.3.6) -----------------------------------------------


def _key_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "vector.key"
    path.write_bytes(text.encode("utf-8"))
    path.chmod(0o600)
    return path


def _passphrase(case: dict[str, Any]) -> bytes | None:
    value = case["passphrase"]
    return None if value is None else str(value).encode()


@pytest.mark.parametrize("case", cases("keyfiles.json", "valid"))
def test_key_file_reads_back(case: dict[str, Any], tmp_path: Path) -> None:
    key = read_key_file(_key_file(tmp_path, case["text"]), passphrase=_passphrase(case))
    assert key.seed.hex() == case["seed"]
    assert key.public_key.raw.hex() == case["public_key"]


@pytest.mark.parametrize("case", cases("keyfiles.json", "invalid"))
def test_invalid_key_file_is_refused(case: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(KeyFileError) as info:
        read_key_file(_key_file(tmp_path, case["text"]), passphrase=_passphrase(case))
    assert info.value.code.name == case["error"]


def test_sketch_indices_state_merge_and_estimates() -> None:
    data = vectors("sketch.json")
    alpha = data["alpha"]
    for item in data["indices"]:
        if item["index"] is not None:
            assert bucket_index(item["value"], alpha) == item["index"], item
    state = sketch_from_values(data["values"], alpha)
    assert named(state) == data["state"]
    assert encode(state).hex() == data["state_body_hex"]
    parts = [sketch_from_values(p["values"], alpha) for p in data["parts"]]
    assert [named(p) for p in parts] == [p["state"] for p in data["parts"]]
    assert merge_sketches(*parts) == state
    estimates = sketch_quantiles(state, data["ranks"])
    assert estimates == pytest.approx(data["estimates"], rel=1e-9, abs=1e-12)
    empty = sketch_from_values([], alpha)
    assert list(sketch_quantiles(empty, data["ranks"])) == data["empty_estimates"]


# --- 3. protocol.md agrees with the code ---------------------------------------------------------


def spec_text() -> str:
    return PROTOCOL_MD.read_text(encoding="utf-8")


def spec_section(number: str) -> str:
    """The text of ``## <number>. …`` up to the next level-2 heading."""
    match = re.search(rf"^## {re.escape(number)}\. .*?(?=^## |\Z)", spec_text(), re.M | re.S)
    assert match, f"spec/protocol.md has no section {number}"
    return match.group(0)


def test_error_code_table_matches_the_enum() -> None:
    rows = re.findall(
        r"^\| (\d{3}) \| `([A-Z_]+)` \| (yes|no) \| (.+?) \|$", spec_section("9"), re.M
    )
    table = {name: (int(code), wire == "yes", meaning) for code, name, wire, meaning in rows}
    expected = {c.name: (int(c), c.on_wire, c.meaning) for c in ErrorCode}
    assert table == expected


def test_struct_field_tables_match_the_structs() -> None:
    text = spec_text()
    documented: dict[str, tuple[str, list[str]]] = {}
    for match in re.finditer(r"^Struct `(\w+)`, tag `([^`]+)`:\n\n((?:\|.*\n)+)", text, re.M):
        name, tag, table = match.groups()
        fields = re.findall(r"^\| `(\w+)` \|", table, re.M)
        assert name not in documented, f"{name} is documented twice"
        documented[name] = (tag, fields)
    for cls in wire_structs():
        assert cls.__name__ in documented, f"spec/protocol.md lacks a field table for {cls}"
        tag, fields = documented.pop(cls.__name__)
        assert tag == cls.__struct_config__.tag, cls.__name__
        assert fields == list(cls.__struct_fields__), cls.__name__
    assert not documented, f"tables for structs that do not exist: {sorted(documented)}"


def test_limits_table_matches_the_constants() -> None:
    rows = dict(re.findall(r"^\| `(MAX_\w+)` \| ([0-9]+) \|", spec_section("5"), re.M))
    constants = {
        name: value
        for module in (messages, envelope_module)
        for name, value in vars(module).items()
        if name.startswith("MAX_") and isinstance(value, int)
    }
    assert {k: int(v) for k, v in rows.items()} == constants
