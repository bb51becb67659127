"""Signed notes, checkpoints and cosignatures (``hansa.crypto.note``).

References: c2sp.org/signed-note@v1.0.0, c2sp.org/tlog-checkpoint@v1.0.0,
c2sp.org/tlog-cosignature@v1.0.1.
"""

from __future__ import annotations

import base64
import hashlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hansa.crypto.keys import SigningKey
from hansa.crypto.note import (
    MAX_NOTE_SIZE,
    MAX_SIGNATURES,
    MAX_TIMESTAMP,
    MIN_ACCEPTED_SIGNATURES,
    Checkpoint,
    CosignatureSigner,
    Note,
    NoteSignature,
    NoteSigner,
    NoteVerifier,
    SignatureType,
    check_note,
    cosign_checkpoint,
    cosignature_message,
    format_signer_key,
    note_key_id,
    open_checkpoint,
    parse_signer_key,
    sign_checkpoint,
    sign_note,
    validate_key_name,
    verify_checkpoint,
    verify_cosignatures,
    verify_note,
)
from hansa.protocol.errors import ErrorCode, NoteError, SignatureError

EM_DASH = "\u2014"
TEXT = "hello, alliance\nsecond line\n"


def _key(i: int) -> SigningKey:
    return SigningKey(bytes([i]) * 32)


def _signer(i: int, name: str | None = None) -> NoteSigner:
    return NoteSigner(name or f"city{i}.example/log", _key(i))


def _cosigner(i: int, name: str | None = None) -> CosignatureSigner:
    return CosignatureSigner(name or f"witness{i}.example", _key(100 + i))


def _checkpoint(size: int = 8) -> Checkpoint:
    return Checkpoint("city1.example/log", size, hashlib.sha256(b"root %d" % size).digest())


LOG = _signer(1)
OTHER = _signer(2)
WITNESS = _cosigner(1)
WITNESS_KEY = _key(101)  # the key inside WITNESS
WITNESS2 = _cosigner(2)


def _rejects(note: bytes, verifiers: list[NoteVerifier]) -> NoteError:
    with pytest.raises(NoteError) as info:
        verify_note(note, verifiers)
    assert info.value.code is ErrorCode.NOTE
    return info.value


# --------------------------------------------------------------------------- names and keys


@pytest.mark.parametrize(
    "name",
    ["", "a b", "a+b", "tab\there", "nbsp\xa0x", "em\u2003space", "ideo\u3000x", "nl\nx", "nul\0x"],
)
def test_invalid_key_names_are_rejected(name: str) -> None:
    with pytest.raises(NoteError):
        validate_key_name(name)
    with pytest.raises(NoteError):
        NoteSigner(name, _key(1))


@pytest.mark.parametrize("name", ["a", "example.com/log42", "oid/1.3.6.1.4.1", "città/ø", "x—y"])
def test_valid_key_names_are_accepted(name: str) -> None:
    assert validate_key_name(name) == name
    assert NoteSigner(name, _key(1)).name == name


def test_key_id_is_sha256_of_name_newline_type_key() -> None:
    pk = _key(1).public_key.raw
    expected = hashlib.sha256(b"n\n\x01" + pk).digest()[:4]
    assert note_key_id("n", 0x01, pk) == expected
    assert NoteSigner("n", _key(1)).key_id == expected
    cosig = hashlib.sha256(b"n\n\x04" + pk).digest()[:4]
    assert CosignatureSigner("n", _key(1)).key_id == cosig != expected


def test_vkey_round_trip_for_both_types() -> None:
    for verifier in (LOG.verifier, WITNESS.verifier):
        parsed = NoteVerifier.from_vkey(verifier.vkey)
        assert parsed == verifier
        assert hash(parsed) == hash(verifier)
        assert parsed.key_id == verifier.key_id
    assert base64.b64decode(WITNESS.vkey.split("+", 2)[2])[0] == 0x04


def test_vkey_whose_base64_contains_plus_parses() -> None:
    # Find a deterministic key whose base64 part contains '+' (bounded search).
    for i in range(256):
        signer = NoteSigner("plus.example", SigningKey(bytes([i, 7]) * 16))
        if "+" in signer.vkey.split("+", 2)[2]:
            break
    else:
        pytest.fail("no key with '+' in its base64 among 256 tries")
    assert signer.vkey.count("+") > 2
    assert NoteVerifier.from_vkey(signer.vkey) == signer.verifier


def _vkey_with(name: str, key_material: bytes) -> str:
    key_id = hashlib.sha256(name.encode() + b"\n" + key_material).digest()[:4]
    return f"{name}+{key_id.hex()}+{base64.b64encode(key_material).decode()}"


def test_vkey_structural_errors_are_rejected() -> None:
    good = LOG.vkey
    name, key_id_hex, b64 = good.split("+", 2)
    bad = [
        "",
        name,
        f"{name}+{key_id_hex}",
        f"{name}{key_id_hex}{b64}",
        f"+{key_id_hex}+{b64}",
        f"{name}+{key_id_hex.upper()}+{b64}",
        f"{name}+{key_id_hex[:7]}+{b64}",
        f"{name}+0x{key_id_hex[:6]}+{b64}",
        f"{name}+{'0' * 8}+{b64}",
        f"{name} x+{key_id_hex}+{b64}",
        f"{name}+{key_id_hex}+{b64[:-1]}",
        f"{name}+{key_id_hex}+{b64}=",
        f"{name}+{key_id_hex}+ {b64}",
        f"{name}+{key_id_hex}+{b64}\n",
        f"other+{key_id_hex}+{b64}",
        f"{name}+{key_id_hex}+",
    ]
    for vkey in bad:
        with pytest.raises(NoteError):
            NoteVerifier.from_vkey(vkey)


def test_vkey_with_wrong_length_or_type_is_rejected_even_with_matching_id() -> None:
    pk = _key(1).public_key.raw
    for material, message in [
        (b"\x01" + pk[:31], "31 bytes"),
        (b"\x01" + pk + b"\0", "33 bytes"),
        (b"\x02" + pk, "unsupported signature type 0x02"),
        (b"\xff" + pk, "unsupported signature type 0xff"),
    ]:
        with pytest.raises(NoteError, match=message):
            NoteVerifier.from_vkey(_vkey_with("n", material))


def test_vkey_with_small_order_point_is_an_invalid_key() -> None:
    identity = b"\x01" + b"\0" * 31  # the neutral element: small order
    with pytest.raises(SignatureError) as info:
        NoteVerifier.from_vkey(_vkey_with("n", b"\x01" + identity))
    assert info.value.code is ErrorCode.INVALID_KEY


def test_signer_key_round_trip_and_errors() -> None:
    text = format_signer_key(LOG)
    assert text.startswith("PRIVATE+KEY+city1.example/log+")
    again = parse_signer_key(text)
    assert again.vkey == LOG.vkey
    prefix, _, rest = text.rpartition("+")
    seed_material = base64.b64decode(rest)
    as_type4 = base64.b64encode(bytes([4]) + seed_material[1:]).decode()
    bad = [
        text[len("PRIVATE+") :],
        text.replace(LOG.key_id.hex(), "00000000"),
        f"{prefix}+{as_type4}",
        f"{prefix}+{base64.b64encode(seed_material[:-1]).decode()}",
        "PRIVATE+KEY+name",
    ]
    for value in bad:
        with pytest.raises(NoteError):
            parse_signer_key(value)


def test_reprs_do_not_leak_the_seed() -> None:
    seed_hex = _key(1).seed.hex()
    for obj in (LOG, WITNESS):
        assert seed_hex not in repr(obj)
        assert base64.b64encode(_key(1).seed).decode() not in repr(obj)


# --------------------------------------------------------------------------- notes: round trips

_LINE = st.text(alphabet=st.characters(min_codepoint=0x20, exclude_categories=["Cs"]), max_size=40)
_TEXTS = st.lists(_LINE, min_size=1, max_size=6).map(lambda ls: "".join(x + "\n" for x in ls))


@given(text=_TEXTS, count=st.integers(min_value=1, max_value=4))
def test_sign_then_verify_round_trip(text: str, count: int) -> None:
    signers = [_signer(i) for i in range(1, count + 1)]
    note = sign_note(text, signers)
    parsed = Note.from_bytes(note)
    assert parsed.text == text
    assert parsed.to_bytes() == note
    verified = verify_note(note, [s.verifier for s in reversed(signers)])
    assert verified.text == text
    assert verified.verifiers == tuple(s.verifier for s in signers)
    # Any single signer suffices; the others are unknown and kept.
    only_last = verify_note(note, [signers[-1].verifier])
    assert len(only_last.unknown) == count - 1


@given(text=_TEXTS)
def test_signature_is_over_the_text_only(text: str) -> None:
    sig = LOG.sign(text)
    assert LOG.verifier.public_key.verify(text.encode("utf-8"), sig.signature)
    assert not LOG.verifier.public_key.verify((text + "\n").encode("utf-8"), sig.signature)


def test_text_separated_by_last_blank_line() -> None:
    text = "a\n\n\u2014 fake.example AAAA\n\nb\n\n"
    note = sign_note(text, [LOG])
    assert verify_note(note, [LOG.verifier]).text == text


def test_sign_note_rejects_bad_text_and_no_signers() -> None:
    for text in ["", "no newline", "cr\r\n", "tab\tx\n", "esc\x1b\n"]:
        with pytest.raises(NoteError):
            sign_note(text, [LOG])
    with pytest.raises(NoteError):
        sign_note(TEXT, [])


# --------------------------------------------------------------------------- notes: mutations


def _good() -> bytes:
    return sign_note(TEXT, [LOG])


def test_every_single_bit_flip_in_the_text_is_rejected() -> None:
    note = _good()
    text_len = len(TEXT.encode())
    for i in range(text_len + 1):  # every text byte and the blank line
        mutated = bytearray(note)
        mutated[i] ^= 0x01
        _rejects(bytes(mutated), [LOG.verifier])


def test_every_signature_byte_flip_is_rejected() -> None:
    parsed = Note.from_bytes(_good())
    (sig,) = parsed.signatures
    raw = sig.key_id + sig.signature
    for i in range(len(raw)):
        mutated = bytearray(raw)
        mutated[i] ^= 0x80
        line = f"{EM_DASH} {sig.name} {base64.b64encode(bytes(mutated)).decode()}\n"
        _rejects((TEXT + "\n" + line).encode(), [LOG.verifier])


def test_every_base64_character_change_is_rejected() -> None:
    note = _good().decode()
    start = note.rindex(" ") + 1
    for i in range(start, len(note) - 1):
        replacement = "A" if note[i] != "A" else "B"
        _rejects((note[:i] + replacement + note[i + 1 :]).encode(), [LOG.verifier])


def test_changed_name_makes_the_signature_unknown() -> None:
    note = _good().replace(LOG.name.encode(), b"city9.example/log", 1)
    note = note.replace(LOG.name.encode(), b"city9.example/log")
    err = _rejects(note, [LOG.verifier])
    assert "not signed by any known key" in err.message


@pytest.mark.parametrize(
    ("mutate", "why"),
    [
        (lambda n: n.replace(b"\n\n", b"\n"), "dropped blank line"),
        (lambda n: n.replace(b"\n", b"\r\n"), "CRLF"),
        (lambda n: n.replace(b"\n\n", b"\n\r\n"), "CR in blank line"),
        (lambda n: n[:-1], "no final newline"),
        (lambda n: n + b"\n", "extra blank line at the end"),
        (lambda n: n + b"trailing", "garbage after signatures"),
        (lambda n: n[: n.rindex(b"=")] + b"\n", "truncated base64 padding"),
        (lambda n: n[:-10] + b"\n", "truncated base64"),
        (lambda n: n[: n.rindex(b" ") + 5] + b"\n", "base64 cut to 3 bytes"),
        (lambda n: n.replace("\u2014".encode(), "\u2013".encode()), "en dash"),
        (lambda n: n.replace("\u2014".encode(), b"-"), "hyphen"),
        (lambda n: n.replace("\u2014".encode(), b"--"), "double hyphen"),
        (lambda n: n.replace("\u2014 ".encode(), "\u2014".encode()), "no space after dash"),
        (lambda n: n.replace("\u2014 ".encode(), "\u2014  ".encode()), "two spaces"),
        (lambda n: n.replace(b"log ", b"log  "), "two spaces before base64"),
        (lambda n: n.replace(b"log ", b"log\t"), "tab separator"),
        (lambda n: n.replace(b"hello", b"hel\x00lo"), "NUL in text"),
        (lambda n: n.replace(b"hello", b"hel\x7flo\x07"), "BEL in text"),
        (lambda n: n.replace(b"hello", b"hel\xfflo"), "invalid UTF-8"),
        (lambda n: n.replace(b"hello", b"hel\xed\xa0\x80lo"), "UTF-8 surrogate"),
        (lambda n: n.replace(b"hello", b"hel\xe2\x80lo"), "truncated UTF-8"),
        (lambda n: b"", "empty"),
        (lambda n: b"\n\n", "no signatures"),
        (lambda n: TEXT.encode(), "text only"),
        (lambda n: n.replace(b"\n\n", b"\n\n\n"), "blank line inside signature block"),
        (lambda n: n.replace(b"\n\xe2", b"\n \xe2"), "indented signature line"),
        (lambda n: n.replace(b"=\n", b"=\n\n"), "blank line after signatures"),
    ],
)
def test_malformed_notes_are_rejected(mutate: object, why: str) -> None:
    assert callable(mutate)
    mutated = mutate(_good())
    assert isinstance(mutated, bytes)
    assert mutated != _good(), why
    _rejects(mutated, [LOG.verifier])


def test_non_canonical_base64_is_rejected() -> None:
    note = _good()
    sig = Note.from_bytes(note).signatures[0]
    b64 = base64.b64encode(sig.key_id + sig.signature).decode()
    assert b64.endswith("=") and not b64.endswith("==")
    # 68 bytes -> one '=' pad; the last data char carries 2 unused bits.
    last = b64[-2]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    twin = alphabet[alphabet.index(last) ^ 0x01]
    assert base64.b64decode(b64[:-2] + twin + "=") == base64.b64decode(b64)
    _rejects(note.replace(b64.encode(), (b64[:-2] + twin + "=").encode()), [LOG.verifier])
    _rejects(note.replace(b64.encode(), b64.replace("+", "-").encode() + b"x"), [LOG.verifier])


def test_signature_count_limits() -> None:
    many = [_signer(i) for i in range(1, MIN_ACCEPTED_SIGNATURES + 1)]
    note = sign_note(TEXT, many)
    assert len(verify_note(note, [many[7].verifier]).unknown) == MIN_ACCEPTED_SIGNATURES - 1
    # Up to the cap is accepted (repeat an unknown line to reach it cheaply).
    extra = Note.from_bytes(sign_note(TEXT, [OTHER])).signatures[0].line.encode()
    at_cap = _good() + extra * (MAX_SIGNATURES - 1)
    assert len(Note.from_bytes(at_cap).signatures) == MAX_SIGNATURES
    assert verify_note(at_cap, [LOG.verifier]).verifiers == (LOG.verifier,)
    err = _rejects(at_cap + extra, [LOG.verifier])
    assert "more than" in err.message
    over = Note.from_bytes(at_cap).signatures + Note.from_bytes(sign_note(TEXT, [OTHER])).signatures
    with pytest.raises(NoteError, match="more than"):
        Note(TEXT, over)


def test_size_limit() -> None:
    big = ("x" * 1000 + "\n") * (MAX_NOTE_SIZE // 1001)
    assert len(sign_note(big, [LOG])) <= MAX_NOTE_SIZE
    with pytest.raises(NoteError, match="larger than"):
        sign_note(big + "x" * 1000 + "\n", [LOG])
    _rejects(b"x" * (MAX_NOTE_SIZE + 1), [LOG.verifier])


# --------------------------------------------------------------------------- verifier rules


def test_unknown_signatures_are_ignored() -> None:
    note = sign_note(TEXT, [OTHER, LOG])
    verified = verify_note(note, [LOG.verifier])
    assert verified.verifiers == (LOG.verifier,)
    assert [s.name for s in verified.unknown] == [OTHER.name]
    assert verified.verified_by(LOG.verifier)
    assert not verified.verified_by(OTHER.verifier)


def test_same_name_other_key_or_same_id_other_name_is_unknown() -> None:
    impostor = NoteSigner(LOG.name, _key(3))  # same name, other key id
    assert impostor.key_id != LOG.key_id
    note = sign_note(TEXT, [impostor, LOG])
    assert verify_note(note, [LOG.verifier]).unknown[0].name == LOG.name
    # A line with LOG's key id under another name is unknown too, even if its
    # bytes are garbage: it is never checked against LOG's key.
    bogus = NoteSignature("renamed.example", LOG.key_id, b"\0" * 64)
    note2 = Note(TEXT, (bogus, LOG.sign(TEXT))).to_bytes()
    assert verify_note(note2, [LOG.verifier]).unknown == (bogus,)


def test_known_key_with_bad_signature_rejects_whole_note() -> None:
    good = LOG.sign(TEXT)
    forged = OTHER.sign("some other text\n")  # OTHER's line, wrong message
    note = Note(TEXT, (good, forged)).to_bytes()
    # With OTHER unknown, the forged line is ignored.
    assert verify_note(note, [LOG.verifier]).verifiers == (LOG.verifier,)
    # With OTHER known, the whole note is rejected although LOG verified.
    err = _rejects(note, [LOG.verifier, OTHER.verifier])
    assert OTHER.name in err.message
    result = check_note(note, [LOG.verifier, OTHER.verifier])
    assert not result
    assert result.failed == (forged,)
    assert [v.verifier for v in result.verified] == [LOG.verifier]


def test_known_key_with_wrong_signature_length_rejects() -> None:
    short = NoteSignature(LOG.name, LOG.key_id, b"\x01" * 63)
    note = Note(TEXT, (OTHER.sign(TEXT), short)).to_bytes()
    _rejects(note, [OTHER.verifier, LOG.verifier])


def test_no_known_key_rejects() -> None:
    note = sign_note(TEXT, [OTHER])
    err = _rejects(note, [LOG.verifier])
    assert "not signed by any known key" in err.message
    _rejects(note, [])
    assert not check_note(note, [LOG.verifier])


def test_ambiguous_verifiers_are_refused() -> None:
    # Two distinct keys cannot share (name, key id) honestly; fake it.
    twin = NoteVerifier(LOG.name, _key(9).public_key)
    object.__setattr__(twin, "key_id", LOG.key_id)
    with pytest.raises(NoteError, match="ambiguous"):
        verify_note(_good(), [LOG.verifier, twin])
    # The same key twice is fine.
    assert verify_note(_good(), [LOG.verifier, LOG.verifier]).verifiers == (LOG.verifier,)


def test_cosignature_key_does_not_verify_plain_signature() -> None:
    # Same name and key, type 0x04: a different key id, so the line is unknown.
    as_cosigner = CosignatureSigner(LOG.name, LOG.signing_key)
    _rejects(_good(), [as_cosigner.verifier])


# --------------------------------------------------------------------------- checkpoints

SPEC_CHECKPOINT = (
    "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
)

_ORIGIN = st.text(
    alphabet=st.characters(
        min_codepoint=0x21, exclude_categories=["Cs", "Zs", "Zl", "Zp"], exclude_characters="+"
    ),
    min_size=1,
    max_size=30,
).filter(lambda s: not any(c.isspace() or c in "\x85\xa0" for c in s))
_EXT = st.text(alphabet=st.characters(min_codepoint=0x20, exclude_categories=["Cs"]), min_size=1)


@given(
    origin=_ORIGIN,
    size=st.integers(min_value=0, max_value=2**64 - 1),
    root=st.binary(min_size=32, max_size=32),
    extensions=st.lists(_EXT, max_size=3).map(tuple),
)
def test_checkpoint_text_round_trip(
    origin: str, size: int, root: bytes, extensions: tuple[str, ...]
) -> None:
    cp = Checkpoint(origin, size, root, extensions)
    text = cp.to_text()
    lines = text.split("\n")
    assert lines[1] == str(size)
    assert base64.b64decode(lines[2], validate=True) == root
    assert Checkpoint.from_text(text) == cp


@given(size=st.integers(min_value=0, max_value=2**40), root=st.binary(min_size=32, max_size=32))
def test_sign_then_verify_checkpoint_round_trip(size: int, root: bytes) -> None:
    cp = Checkpoint(LOG.name, size, root)
    assert verify_checkpoint(sign_checkpoint(cp, LOG), LOG.verifier) == cp


def test_spec_checkpoint_text_parses() -> None:
    cp = Checkpoint.from_text(SPEC_CHECKPOINT)
    assert cp.origin == "example.com/behind-the-sofa"
    assert cp.size == 20852163
    assert cp.root_hash == base64.b64decode("CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=")
    assert cp.extensions == ()
    assert cp.to_text() == SPEC_CHECKPOINT


@pytest.mark.parametrize(
    "size_line",
    ["01", "00", "-1", "+1", " 1", "1 ", "1_000", "\u0661", "１", "0x10", "", "1e3", str(2**64)],
)
def test_checkpoint_size_must_be_canonical_decimal(size_line: str) -> None:
    root = base64.b64encode(b"\0" * 32).decode()
    with pytest.raises(NoteError):
        Checkpoint.from_text(f"o.example\n{size_line}\n{root}\n")


def test_checkpoint_text_errors() -> None:
    root = base64.b64encode(b"\0" * 32).decode()
    bad = [
        f"o.example\n1\n{root}",  # no final newline
        "o.example\n1\n",
        f"\n1\n{root}\n",
        f"o example\n1\n{root}\n",
        f"o+x\n1\n{root}\n",
        f"o\xa0x\n1\n{root}\n",
        f"o.example\n1\n{root}\n\n",  # empty extension line
        f"o.example\n1\n{root}\next\n\n",
        f"o.example\n1\n{root.rstrip('=')}\n",
        f"o.example\n1\n{base64.b64encode(bytes(31)).decode()}\n",
        f"o.example\n1\n{base64.b64encode(bytes(33)).decode()}\n",
        "o.example\n1\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAB=\n",  # non-canonical
        f"o.example\n1\n{root}\nx\ty\n",
    ]
    for text in bad:
        with pytest.raises(NoteError):
            Checkpoint.from_text(text)


def test_checkpoint_constructor_validates() -> None:
    root = bytes(32)
    for args in [("", 1, root), ("o", -1, root), ("o", 2**64, root), ("o", 1, root[:31])]:
        with pytest.raises(NoteError):
            Checkpoint(*args)
    with pytest.raises(NoteError):
        Checkpoint("o", True, root)
    with pytest.raises(NoteError):
        Checkpoint("o", 1, root, ("a\nb",))


def test_verify_checkpoint_checks_origin_key_and_format() -> None:
    cp = _checkpoint()
    note = sign_checkpoint(cp, LOG)
    assert verify_checkpoint(note, LOG.verifier, origin=cp.origin) == cp
    with pytest.raises(NoteError, match="origin"):
        verify_checkpoint(note, LOG.verifier, origin="city2.example/log")
    with pytest.raises(NoteError):
        verify_checkpoint(note, OTHER.verifier)
    # Signed by the right key but not a checkpoint.
    with pytest.raises(NoteError):
        verify_checkpoint(sign_note(TEXT, [LOG]), LOG.verifier)
    # Origin defaults to the key name: a log key named differently must pass it.
    renamed = NoteSigner("log-key", LOG.signing_key)
    note2 = sign_checkpoint(cp, renamed)
    with pytest.raises(NoteError, match="origin"):
        verify_checkpoint(note2, renamed.verifier)
    assert verify_checkpoint(note2, renamed.verifier, origin=cp.origin) == cp


def test_checkpoint_signed_only_by_a_witness_is_rejected() -> None:
    note = sign_checkpoint(_checkpoint(), OTHER)
    cosigned = cosign_checkpoint(note, WITNESS, 1_700_000_000)
    with pytest.raises(NoteError, match="not signed by the log key"):
        open_checkpoint(cosigned, LOG.verifier, witnesses=[WITNESS.verifier])


# --------------------------------------------------------------------------- cosignatures


def test_cosignature_message_is_byte_exact() -> None:
    assert cosignature_message(SPEC_CHECKPOINT, 1679315147) == (
        b"cosignature/v1\ntime 1679315147\n" + SPEC_CHECKPOINT.encode()
    )
    assert cosignature_message(SPEC_CHECKPOINT, 0).startswith(b"cosignature/v1\ntime 0\n")


def test_cosign_and_list_cosignatures_with_timestamps() -> None:
    cp = _checkpoint()
    note = sign_checkpoint(cp, LOG)
    once = cosign_checkpoint(note, WITNESS, 1_700_000_000)
    twice = cosign_checkpoint(once, WITNESS2, 1_700_000_123)
    line = twice.decode().splitlines()[-2]
    payload = base64.b64decode(line.rsplit(" ", 1)[1])
    assert len(payload) == 76 and len(line.rsplit(" ", 1)[1]) == 104
    assert payload[:4] == WITNESS.key_id
    assert struct.unpack(">Q", payload[4:12]) == (1_700_000_000,)
    assert WITNESS.verifier.public_key.verify(
        cosignature_message(cp.to_text(), 1_700_000_000), payload[12:]
    )

    opened = open_checkpoint(twice, LOG.verifier, witnesses=[WITNESS.verifier, WITNESS2.verifier])
    assert opened.checkpoint == cp
    assert [(c.name, c.timestamp) for c in opened.cosignatures] == [
        (WITNESS.name, 1_700_000_000),
        (WITNESS2.name, 1_700_000_123),
    ]
    assert opened.cosigners() == {WITNESS.name, WITNESS2.name}
    listed = verify_cosignatures(twice, [WITNESS2.verifier])
    assert [(c.verifier, c.timestamp) for c in listed] == [(WITNESS2.verifier, 1_700_000_123)]
    assert verify_cosignatures(note, [WITNESS.verifier]) == ()
    # The log signature alone still verifies; cosignatures are unknown lines.
    assert verify_checkpoint(twice, LOG.verifier) == cp
    # Verifying with the witness key alone is an ordinary signed-note check.
    alone = verify_note(twice, [WITNESS.verifier])
    assert alone.verified[0].timestamp == 1_700_000_000


def test_cosignature_timestamp_bounds() -> None:
    note = sign_checkpoint(_checkpoint(), LOG)
    for ts in (0, MAX_TIMESTAMP):
        got = verify_cosignatures(cosign_checkpoint(note, WITNESS, ts), [WITNESS.verifier])
        assert got[0].timestamp == ts
    for bad in (-1, MAX_TIMESTAMP + 1):
        with pytest.raises(NoteError):
            cosign_checkpoint(note, WITNESS, bad)
    # A correctly signed cosignature claiming a time >= 2^63 is invalid.
    text = _checkpoint().to_text()
    ts = MAX_TIMESTAMP + 1
    message = b"cosignature/v1\ntime %d\n" % ts + text.encode()
    sig = WITNESS_KEY.sign(message)
    line = NoteSignature(WITNESS.name, WITNESS.key_id, struct.pack(">Q", ts) + sig)
    forged = Note.from_bytes(note).with_signatures(line).to_bytes()
    with pytest.raises(NoteError, match="does not verify"):
        open_checkpoint(forged, LOG.verifier, witnesses=[WITNESS.verifier])


def test_tampered_cosignature_rejects_when_witness_is_known() -> None:
    note = cosign_checkpoint(sign_checkpoint(_checkpoint(), LOG), WITNESS, 1_700_000_000)
    parsed = Note.from_bytes(note)
    log_sig, cosig = parsed.signatures
    later = struct.pack(">Q", 1_700_000_001) + cosig.signature[8:]
    tampered = Note(parsed.text, (log_sig, NoteSignature(cosig.name, cosig.key_id, later)))
    with pytest.raises(NoteError, match="does not verify"):
        open_checkpoint(tampered.to_bytes(), LOG.verifier, witnesses=[WITNESS.verifier])
    with pytest.raises(NoteError, match="does not verify"):
        verify_cosignatures(tampered.to_bytes(), [WITNESS.verifier])
    # Unknown witness: ignored.
    assert open_checkpoint(tampered.to_bytes(), LOG.verifier).cosignatures == ()


def test_cosignature_over_other_checkpoint_does_not_transfer() -> None:
    a = sign_checkpoint(_checkpoint(8), LOG)
    b = sign_checkpoint(_checkpoint(9), LOG)
    cosig = Note.from_bytes(cosign_checkpoint(a, WITNESS, 5)).signatures[-1]
    moved = Note.from_bytes(b).with_signatures(cosig).to_bytes()
    with pytest.raises(NoteError):
        open_checkpoint(moved, LOG.verifier, witnesses=[WITNESS.verifier])


def test_cosign_checkpoint_errors() -> None:
    note = sign_checkpoint(_checkpoint(), LOG)
    once = cosign_checkpoint(note, WITNESS, 1)
    with pytest.raises(NoteError, match="already"):
        cosign_checkpoint(once, WITNESS, 2)
    with pytest.raises(NoteError):
        cosign_checkpoint(sign_note(TEXT, [LOG]), WITNESS, 1)
    with pytest.raises(NoteError):
        cosign_checkpoint(b"garbage", WITNESS, 1)
    with pytest.raises(NoteError, match="type 0x04"):
        open_checkpoint(once, LOG.verifier, witnesses=[OTHER.verifier])
    with pytest.raises(NoteError, match="type 0x04"):
        verify_cosignatures(once, [LOG.verifier])


def test_spec_cosignature_example_decodes() -> None:
    # c2sp.org/tlog-cosignature@v1.0.1 example (spec text CC BY 4.0); the keys
    # are not published, so only the structure and the message are checked.
    example = (
        SPEC_CHECKPOINT + "\n"
        "\u2014 example.com/behind-the-sofa Az3grlgtzPICa5OS8npVmf1Myq/5IZniMp+ZJurmRDeOoRDe4URY"
        "N7u5/Zhcyv2q1gGzGku9nTo+zyWE+xeMcTOAYQ8=\n"
        "\u2014 witness.example.com/w1 jWbPPwAAAABkGFDLEZMHwSRaJNiIDoe9DYn/zXcrtPHeolMI5OWXEhZC"
        "B9dlrDJsX3b2oyin1nPZqhf5nNo0xUe+mbIUBkBIfZ+qnA==\n"
    ).encode()
    note = Note.from_bytes(example)
    assert note.to_bytes() == example
    assert Checkpoint.from_text(note.text).size == 20852163
    log_sig, cosig = note.signatures
    assert log_sig.name == "example.com/behind-the-sofa" and len(log_sig.signature) == 64
    assert cosig.name == "witness.example.com/w1"
    assert cosig.key_id.hex() == "8d66cf3f"
    assert len(cosig.signature) == 72
    (timestamp,) = struct.unpack(">Q", cosig.signature[:8])
    assert timestamp == 1679315147
    assert cosignature_message(note.text, timestamp) == (
        b"cosignature/v1\ntime 1679315147\n"
        b"example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
    )
    # Our keys are not the example's: no known key, so the note is rejected.
    err = _rejects(example, [LOG.verifier, WITNESS.verifier])
    assert "not signed by any known key" in err.message


def test_signature_types_are_the_spec_bytes() -> None:
    assert int(SignatureType.ED25519) == 0x01
    assert int(SignatureType.COSIGNATURE_V1) == 0x04
    with pytest.raises(NoteError):
        NoteVerifier("n", _key(1).public_key, 0x02)  # type: ignore[arg-type]


@given(data=st.binary(max_size=300))
def test_arbitrary_bytes_parse_or_raise_note_error(data: bytes) -> None:
    try:
        note = Note.from_bytes(data)
    except NoteError:
        return
    assert note.to_bytes() == data


@given(text=_TEXTS, tail=st.text(max_size=120))
def test_arbitrary_signature_blocks_parse_or_raise_note_error(text: str, tail: str) -> None:
    data = (text + "\n\u2014 " + tail).encode("utf-8", "surrogatepass")
    try:
        note = Note.from_bytes(data)
    except NoteError:
        return
    assert note.to_bytes() == data
    with pytest.raises(NoteError):
        verify_note(data, [LOG.verifier])
