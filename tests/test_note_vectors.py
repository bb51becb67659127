"""Known-answer tests: public signed-note vectors (``../shared/vectors/signed_note_vectors.json``).

The vectors come from golang.org/x/mod ``sumdb/note/note_test.go`` and the
``c2sp.org/signed-note@v1.0.0`` example; Ed25519 is deterministic, so every
signature must reproduce byte for byte.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import shared_path

from hansa.crypto.note import (
    Note,
    NoteSignature,
    NoteVerifier,
    SignatureType,
    format_signer_key,
    note_key_id,
    parse_signer_key,
    sign_note,
    verify_note,
)
from hansa.protocol.errors import HansaError, NoteError


def _vectors() -> list[dict[str, Any]]:
    data = json.loads(shared_path("vectors", "signed_note_vectors.json").read_text("utf-8"))
    vectors: list[dict[str, Any]] = data["vectors"]
    return vectors


def _of_kind(key: str) -> list[dict[str, Any]]:
    return [v for v in _vectors() if key in v]


def test_vector_file_has_the_expected_shape() -> None:
    vectors = _vectors()
    assert len(vectors) == 4
    assert sum("signer_key" in v for v in vectors) == 1
    assert sum("signed_note" in v for v in vectors) == 2
    assert sum("signature_line" in v for v in vectors) == 1
    assert sum(len(v.get("bad_vkeys", ())) for v in vectors) == 2
    for v in vectors:
        assert v["expect"] in {"valid", "reject"}


def test_signer_key_reproduces_vkey_and_signature_byte_exactly() -> None:
    (vector,) = _of_kind("signer_key")
    signer = parse_signer_key(vector["signer_key"])
    assert signer.vkey == vector["vkey"]
    assert format_signer_key(signer) == vector["signer_key"]
    assert sign_note(vector["text"], [signer]) == vector["signed_note"].encode("utf-8")
    # And the signature line on its own, which is the actual known answer.
    line = signer.sign(vector["text"]).line
    assert vector["signed_note"].endswith(line)


def test_valid_vectors_verify() -> None:
    checked = 0
    for vector in _vectors():
        if vector["expect"] != "valid":
            continue
        if "signed_note" in vector:
            note = vector["signed_note"].encode("utf-8")
        else:
            note = (vector["text"] + "\n" + vector["signature_line"]).encode("utf-8")
        verifier = NoteVerifier.from_vkey(vector["vkey"])
        assert verifier.vkey == vector["vkey"]
        assert verifier.sig_type is SignatureType.ED25519
        verified = verify_note(note, [verifier])
        assert verified.verifiers == (verifier,)
        assert verified.unknown == ()
        assert Note.from_bytes(note).to_bytes() == note
        if "text" in vector:
            assert verified.text == vector["text"]
        checked += 1
    assert checked == 3


def test_both_go_signers_on_one_note_verify_together_and_separately() -> None:
    (peter,) = _of_kind("signer_key")
    (enoch,) = _of_kind("signature_line")
    assert peter["text"] == enoch["text"]
    note = (peter["signed_note"] + enoch["signature_line"]).encode("utf-8")
    pv = NoteVerifier.from_vkey(peter["vkey"])
    ev = NoteVerifier.from_vkey(enoch["vkey"])
    both = verify_note(note, [pv, ev])
    assert both.verifiers == (pv, ev)
    only_enoch = verify_note(note, [ev])
    assert only_enoch.verifiers == (ev,)
    assert [s.name for s in only_enoch.unknown] == ["PeterNeumann"]


def test_vector_signature_does_not_verify_for_other_text() -> None:
    (vector,) = _of_kind("signature_line")
    verifier = NoteVerifier.from_vkey(vector["vkey"])
    tampered = ("X" + vector["text"] + "\n" + vector["signature_line"]).encode("utf-8")
    with pytest.raises(NoteError, match="does not verify"):
        verify_note(tampered, [verifier])


def test_bad_vkeys_are_rejected() -> None:
    bad = [k for v in _of_kind("bad_vkeys") for k in v["bad_vkeys"]]
    assert len(bad) == 2
    for vkey in bad:
        with pytest.raises(HansaError):
            NoteVerifier.from_vkey(vkey)


def test_bad_vkey_unknown_algorithm_is_rejected_for_its_type() -> None:
    (vector,) = _of_kind("bad_vkeys")
    with pytest.raises(NoteError, match="unsupported signature type 0x65"):
        NoteVerifier.from_vkey(vector["bad_vkeys"][1])


def test_key_ids_match_the_vkeys() -> None:
    for vector in _of_kind("vkey"):
        verifier = NoteVerifier.from_vkey(vector["vkey"])
        name, key_id_hex, _ = vector["vkey"].split("+", 2)
        computed = note_key_id(name, SignatureType.ED25519, verifier.public_key.raw)
        assert computed.hex() == key_id_hex


def test_signature_line_vector_parses_to_its_key_id() -> None:
    (vector,) = _of_kind("signature_line")
    line = vector["signature_line"]
    assert line.endswith("\n")
    sig = NoteSignature.from_line(line[:-1])
    assert sig.key_id.hex() == vector["vkey"].split("+")[1]
    assert sig.line == line
