#!/usr/bin/env python3
"""Independent check of turnstile's golden vectors (schemas/vectors.json).

Everything here is derived from schemas/*.md only (no Rust source):
  chain.md   - genesis, canonical encoding, hash chain, Merkle tree (RFC 6962/9162
               shape with BLAKE3), run statement, "Verifying a log"
  records.md - Run / Entry / Commitment MessagePack records, key_id
  README.md  - conventions (big-endian, BLAKE3-256, ed25519 pure, lowercase hex)

Usage:
    python3 check_vectors.py [path/to/vectors.json]

Default path: ../vectors.json relative to this script (i.e. schemas/vectors.json).
Exit status 0 when every check passes, 1 on the first mismatch (with a message).
Dependencies: see requirements.txt (blake3, msgpack, PyNaCl).
"""

from __future__ import annotations

import copy
import json
import struct
import sys
from pathlib import Path

try:
    import blake3
    import msgpack
    import nacl.exceptions
    import nacl.signing
except ImportError as e:  # pragma: no cover
    sys.exit(f"missing dependency ({e}); pip install -r requirements.txt")


class CheckFailed(Exception):
    pass


class VerifyError(Exception):
    """A log verification failure; names the slot like `turnstile verify`."""

    def __init__(self, slot, reason):
        super().__init__(f"slot {slot}: {reason}")
        self.slot = slot
        self.reason = reason


CHECKS: list[str] = []


def check(cond: bool, what: str) -> None:
    if not cond:
        raise CheckFailed(what)
    CHECKS.append(what)


def check_eq(got, want, what: str) -> None:
    if got != want:
        raise CheckFailed(f"{what}\n    expected: {want!r}\n    computed: {got!r}")
    CHECKS.append(what)


# --------------------------------------------------------------------------
# Primitives (chain.md "Notation", README "Conventions")
# --------------------------------------------------------------------------

def H(data: bytes) -> bytes:
    """BLAKE3-256."""
    return blake3.blake3(data).digest(length=32)


def u32be(n: int) -> bytes:
    return struct.pack(">I", n)


def u64be(n: int) -> bytes:
    return struct.pack(">Q", n)


def s(x) -> bytes:
    """str(x) = u32be(len(x)) || x  (UTF-8 bytes)."""
    b = x.encode("utf-8") if isinstance(x, str) else bytes(x)
    return u32be(len(b)) + b


# --------------------------------------------------------------------------
# chain.md
# --------------------------------------------------------------------------

def genesis(process: str) -> bytes:
    return H(b"turnstile/genesis/v1" + s(process))


def canonical(process: str, slot: int, message_id: str, timestamp_ms: int,
              headers, body: bytes) -> bytes:
    hs = sorted(((n.encode("utf-8"), v.encode("utf-8")) for n, v in headers))
    out = s(process) + u64be(slot) + s(message_id) + u64be(timestamp_ms)
    out += u32be(len(hs))
    for n, v in hs:
        out += s(n) + s(v)
    out += H(body)
    return out


def chain_hash(prev_hash: bytes, canon: bytes) -> bytes:
    return H(b"turnstile/chain/v1" + prev_hash + canon)


def leaf(h: bytes) -> bytes:
    return H(b"\x00" + h)


def node(l: bytes, r: bytes) -> bytes:
    return H(b"\x01" + l + r)


def split_point(n: int) -> int:
    """Largest power of two strictly less than n (n > 1)."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def mth(d: list[bytes]) -> bytes:
    n = len(d)
    if n == 0:
        raise ValueError("MTH of an empty run is undefined (runs are never empty)")
    if n == 1:
        return leaf(d[0])
    k = split_point(n)
    return node(mth(d[:k]), mth(d[k:]))


def audit_path(m: int, d: list[bytes]) -> list[bytes]:
    """RFC 9162 §2.1.3.1 PATH(m, D[n]); sibling nearest the leaf first."""
    n = len(d)
    if n == 1:
        return []
    k = split_point(n)
    if m < k:
        return audit_path(m, d[:k]) + [mth(d[k:])]
    return audit_path(m - k, d[k:]) + [mth(d[:k])]


def verify_inclusion(leaf_index: int, tree_size: int, entry: bytes,
                     path: list[bytes], root: bytes) -> bool:
    """RFC 9162 §2.1.3.2, with `hash` = leaf(chain_hash)."""
    if leaf_index >= tree_size:
        return False
    fn, sn = leaf_index, tree_size - 1
    r = leaf(entry)
    for p in path:
        if sn == 0:
            return False
        if (fn & 1) or fn == sn:
            r = node(p, r)
            if not (fn & 1):
                while not (fn & 1) and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def statement(process: str, first_slot: int, count: int, root: bytes) -> bytes:
    return b"turnstile/run/v1" + s(process) + u64be(first_slot) + u64be(count) + root


# --------------------------------------------------------------------------
# records.md
# --------------------------------------------------------------------------

def key_id(public_key: bytes) -> str:
    return H(public_key)[:8].hex()


def _want(cond: bool, slot, reason: str) -> None:
    if not cond:
        raise VerifyError(slot, reason)


def _is_bin32(x) -> bool:
    return isinstance(x, (bytes, bytearray)) and len(x) == 32


def verify_log(runs: list[dict], process: str, trusted: dict[str, bytes],
               required: list[str], from_slot: int = 0, to: int | None = None,
               start_prev: bytes | None = None) -> int:
    """chain.md "Verifying a log". `runs` are decoded Run maps in slot order.

    trusted: key_id -> public key (published in <PREFIX>_KEYS or out of band).
    required: key ids that must all have committed to every run.
    start_prev: prev hash of `from_slot` when checking mid-log (taken as given).
    Returns the last verified slot; raises VerifyError naming the failing slot.
    """
    expected_slot = from_slot
    prev: bytes | None = genesis(process) if from_slot == 0 else start_prev
    last = None
    for run in runs:
        first = run.get("first_slot")
        _want(run.get("v") == 1, first, f"record version {run.get('v')!r} is not 1")
        _want(run.get("process") == process, first, "run is for another process")
        _want(first == expected_slot, expected_slot,
              f"gap: run starts at {first}, expected {expected_slot}")
        entries = run.get("entries")
        _want(isinstance(entries, list) and len(entries) > 0, first, "empty run")
        chain = []
        for i, e in enumerate(entries):
            slot = e.get("slot")
            _want(slot == first + i, first + i, f"entry slot {slot} not consecutive")
            _want(_is_bin32(e.get("prev_hash")) and _is_bin32(e.get("chain_hash")),
                  slot, "prev_hash/chain_hash is not bin32")
            if prev is None:  # first run checked mid-log: prev taken as given
                prev = bytes(e["prev_hash"])
            _want(bytes(e["prev_hash"]) == prev, slot, "prev_hash does not match previous chain hash")
            canon = canonical(process, slot, e["message_id"], e["timestamp_ms"],
                              e["headers"], bytes(e["body"]))
            ch = chain_hash(prev, canon)
            _want(ch == bytes(e["chain_hash"]), slot, "chain hash mismatch: the entry was altered")
            chain.append(ch)
            prev = ch
            last = slot
        root = mth(chain)
        stmt = statement(process, first, len(entries), root)
        commitments = run.get("commitments") or []
        _want(len(commitments) > 0, first, "run has no commitment")
        signed_by = set()
        for c in commitments:
            kid, pk, sig = c.get("key_id"), bytes(c.get("public_key", b"")), bytes(c.get("signature", b""))
            _want(len(pk) == 32 and len(sig) == 64, first, "malformed commitment")
            _want(key_id(pk) == kid, first, f"key_id {kid} is not the id of its public key")
            _want(trusted.get(kid) == pk, first, f"key {kid} is not trusted")
            try:
                nacl.signing.VerifyKey(pk).verify(stmt, sig)
            except nacl.exceptions.BadSignatureError:
                raise VerifyError(first, f"signature by {kid} does not verify over the statement")
            signed_by.add(kid)
        for kid in required:
            _want(kid in signed_by, first, f"required key {kid} has not committed")
        expected_slot = first + len(entries)
    if to is not None:
        _want(last is not None and last >= to, expected_slot,
              f"log ends at {last}, requested up to {to}: slots missing")
    return last


# --------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------

def run_checks(v: dict) -> None:
    process = v["process"]
    run_v = v["run"]
    assigns = v["assignments"]

    # --- key -------------------------------------------------------------
    seed = bytes.fromhex(v["key"]["secret_seed"])
    check_eq(len(seed), 32, "secret_seed is 32 bytes")
    check_eq(seed, b"\x42" * 32, "secret_seed is 32 x 0x42 (chain.md 'Vectors')")
    sk = nacl.signing.SigningKey(seed)
    pk = bytes(sk.verify_key)
    check_eq(pk.hex(), v["key"]["public_key"], "public_key derived from secret_seed (RFC 8032)")
    check_eq(key_id(pk), v["key"]["key_id"], "key_id = hex(BLAKE3(public_key)[:8])")

    # --- genesis ---------------------------------------------------------
    g = genesis(process)
    check_eq(g.hex(), v["genesis"], "genesis hash")

    # --- assignments / chain --------------------------------------------
    prev = g
    chain = []
    for i, a in enumerate(assigns):
        slot = a["slot"]
        check_eq(slot, run_v["first_slot"] + i, f"slot {slot}: consecutive from first_slot")
        body = bytes.fromhex(a["body_hex"])
        check_eq(H(body).hex(), a["body_hash"], f"slot {slot}: body hash")
        canon = canonical(process, slot, a["message_id"], a["timestamp_ms"], a["headers"], body)
        check_eq(canon.hex(), a["canonical_hex"], f"slot {slot}: canonical encoding")
        check_eq(prev.hex(), a["prev_hash"], f"slot {slot}: prev hash")
        ch = chain_hash(prev, canon)
        check_eq(ch.hex(), a["chain_hash"], f"slot {slot}: chain hash")
        if i:
            check(a["timestamp_ms"] >= assigns[i - 1]["timestamp_ms"],
                  f"slot {slot}: timestamp never decreases")
        chain.append(ch)
        prev = ch

    # --- Merkle ----------------------------------------------------------
    n = len(chain)
    check_eq(run_v["count"], n, "run count = number of assignments")
    root = mth(chain)
    check_eq(root.hex(), run_v["merkle_root"], "Merkle root (MTH over chain hashes)")
    check_eq(len(run_v["merkle_paths"]), n, "one audit path per assignment")
    for m in range(n):
        path = audit_path(m, chain)
        check_eq([p.hex() for p in path], run_v["merkle_paths"][m], f"audit path of leaf {m}")
        given = [bytes.fromhex(p) for p in run_v["merkle_paths"][m]]
        check(verify_inclusion(m, n, chain[m], given, root),
              f"audit path of leaf {m} verifies to the root (RFC 9162 §2.1.3.2)")
        # negative: the same path must not prove another leaf or position
        check(not verify_inclusion(m, n, chain[(m + 1) % n], given, root),
              f"audit path of leaf {m} rejects a different leaf")
        check(not verify_inclusion(n, n, chain[m], given, root),
              f"audit path check rejects leaf_index >= tree_size (leaf {m})")
        if given:
            bad = [bytes([given[0][0] ^ 1]) + given[0][1:]] + given[1:]
            check(not verify_inclusion(m, n, chain[m], bad, root),
                  f"audit path of leaf {m} with a flipped byte is rejected")

    # --- statement and signature ----------------------------------------
    stmt = statement(process, run_v["first_slot"], n, root)
    check_eq(stmt.hex(), run_v["statement_hex"], "run statement")
    sig = sk.sign(stmt).signature
    check_eq(sig.hex(), run_v["signature"], "ed25519 signature recomputed from secret_seed")
    try:
        nacl.signing.VerifyKey(bytes.fromhex(v["key"]["public_key"])).verify(
            stmt, bytes.fromhex(run_v["signature"]))
        ok = True
    except nacl.exceptions.BadSignatureError:
        ok = False
    check(ok, "ed25519 signature verifies with public_key")

    # --- Run record (MessagePack) ---------------------------------------
    raw = bytes.fromhex(run_v["record_msgpack_hex"])
    rec = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    check(isinstance(rec, dict), "record is a MessagePack map")
    check_eq(list(rec.keys()), ["v", "process", "first_slot", "entries", "commitments"],
             "Run keys (records.md)")
    check_eq(rec["v"], 1, "Run.v = 1")
    check_eq(rec["process"], process, "Run.process")
    check_eq(rec["first_slot"], run_v["first_slot"], "Run.first_slot")
    check_eq(len(rec["entries"]), n, "Run.entries length")
    for a, e in zip(assigns, rec["entries"]):
        slot = a["slot"]
        check_eq(list(e.keys()),
                 ["slot", "message_id", "timestamp_ms", "headers", "body", "prev_hash", "chain_hash"],
                 f"Entry {slot} keys (records.md)")
        check_eq(e["slot"], slot, f"Entry {slot}: slot")
        check_eq(e["message_id"], a["message_id"], f"Entry {slot}: message_id")
        check_eq(e["timestamp_ms"], a["timestamp_ms"], f"Entry {slot}: timestamp_ms")
        check_eq([list(h) for h in e["headers"]], a["headers"], f"Entry {slot}: headers (stored order)")
        check(isinstance(e["body"], bytes), f"Entry {slot}: body is bin")
        check_eq(e["body"].hex(), a["body_hex"], f"Entry {slot}: body")
        check(_is_bin32(e["prev_hash"]) and _is_bin32(e["chain_hash"]),
              f"Entry {slot}: prev_hash/chain_hash are bin32")
        check_eq(e["prev_hash"].hex(), a["prev_hash"], f"Entry {slot}: prev_hash")
        check_eq(e["chain_hash"].hex(), a["chain_hash"], f"Entry {slot}: chain_hash")
    check_eq(len(rec["commitments"]), 1, "Run has one commitment")
    c = rec["commitments"][0]
    check_eq(list(c.keys()), ["key_id", "public_key", "signature"], "Commitment keys (records.md)")
    check_eq(c["key_id"], v["key"]["key_id"], "Commitment.key_id")
    check_eq(c["public_key"].hex(), v["key"]["public_key"], "Commitment.public_key")
    check_eq(c["signature"].hex(), run_v["signature"], "Commitment.signature")

    # Rebuild the record from the vector inputs, keys in records.md table order,
    # compact ints, bin for binary: must give the same bytes.
    rebuilt = msgpack.packb({
        "v": 1, "process": process, "first_slot": run_v["first_slot"],
        "entries": [{
            "slot": a["slot"], "message_id": a["message_id"], "timestamp_ms": a["timestamp_ms"],
            "headers": a["headers"], "body": bytes.fromhex(a["body_hex"]),
            "prev_hash": bytes.fromhex(a["prev_hash"]), "chain_hash": bytes.fromhex(a["chain_hash"]),
        } for a in assigns],
        "commitments": [{"key_id": key_id(pk), "public_key": pk, "signature": sig}],
    }, use_bin_type=True)
    check_eq(rebuilt.hex(), run_v["record_msgpack_hex"],
             "Run record re-encoded from the inputs is byte-identical")

    # --- Verify the decoded Run as a log (chain.md "Verifying a log") ------
    trusted = {v["key"]["key_id"]: pk}
    required = [v["key"]["key_id"]]
    last = verify_log([rec], process, trusted, required, from_slot=0, to=assigns[-1]["slot"])
    check_eq(last, assigns[-1]["slot"], "decoded Run verifies as a log (chain + signature)")
    # receipt-style check: each entry alone, from its chain hash + path + commitment
    for m, e in enumerate(rec["entries"]):
        ok = verify_inclusion(e["slot"] - rec["first_slot"], n, e["chain_hash"],
                              [bytes.fromhex(p) for p in run_v["merkle_paths"][m]], root)
        check(ok, f"Entry {e['slot']} verifies alone (receipt-style)")

    # --- Negative checks -------------------------------------------------
    def expect_fail(runs, what, slot=None, **kw):
        try:
            verify_log(runs, process, kw.pop("trusted", trusted), kw.pop("required", required), **kw)
        except VerifyError as err:
            if slot is not None and err.slot != slot:
                raise CheckFailed(f"{what}: failed at slot {err.slot}, expected {slot} ({err})")
            CHECKS.append(f"NEG {what} -> rejected ({err})")
            print(f"  assert rejected: {what}: {err}")
            return
        raise CheckFailed(f"{what}: verification unexpectedly succeeded")

    print("negative checks:")
    # 1. flip one byte of a body inside the MessagePack bytes (slot 0 body "hello")
    body0 = bytes.fromhex(assigns[0]["body_hex"])
    marker = b"\xc4" + bytes([len(body0)]) + body0
    pos = raw.index(marker) + 2
    tampered_raw = raw[:pos] + bytes([raw[pos] ^ 0x01]) + raw[pos + 1:]
    t = msgpack.unpackb(tampered_raw, raw=False)
    e0 = t["entries"][0]
    canon_t = canonical(process, 0, e0["message_id"], e0["timestamp_ms"], e0["headers"], e0["body"])
    ch_t = chain_hash(g, canon_t)
    check(ch_t != chain[0], "NEG flipped body byte changes the chain hash")
    print(f"  assert chain hash changes: {chain[0].hex()[:16]}.. -> {ch_t.hex()[:16]}..")
    expect_fail([t], "one body byte flipped in the record", slot=0)

    # 2. same flip, attacker also recomputes the whole chain: Merkle root moves, signature fails
    t2 = copy.deepcopy(rec)
    t2["entries"][1]["body"] = b"x"
    p2 = bytes(t2["entries"][0]["chain_hash"])
    for e in t2["entries"][1:]:
        e["prev_hash"] = p2
        e["chain_hash"] = p2 = chain_hash(p2, canonical(process, e["slot"], e["message_id"],
                                                        e["timestamp_ms"], e["headers"], e["body"]))
    expect_fail([t2], "body altered and chain recomputed (signature no longer covers it)", slot=0)

    # 3. header altered
    t3 = copy.deepcopy(rec)
    t3["entries"][2]["headers"] = [["k", "w"]]
    expect_fail([t3], "header value altered", slot=2)

    # 4. signature byte flipped
    t4 = copy.deepcopy(rec)
    s4 = bytearray(t4["commitments"][0]["signature"]); s4[0] ^= 1
    t4["commitments"][0]["signature"] = bytes(s4)
    expect_fail([t4], "signature byte flipped", slot=0)

    # 5. untrusted key / wrong key_id / no commitment / version / gap / truncated
    expect_fail([rec], "key not trusted", slot=0, trusted={})
    t5 = copy.deepcopy(rec); t5["commitments"][0]["key_id"] = "0000000000000000"
    expect_fail([t5], "key_id not the id of public_key", slot=0)
    t6 = copy.deepcopy(rec); t6["commitments"] = []
    expect_fail([t6], "run without commitment", slot=0)
    t7 = copy.deepcopy(rec); t7["v"] = 2
    expect_fail([t7], "record v != 1", slot=0)
    expect_fail([rec], "required key missing", slot=0, required=["ffffffffffffffff"])
    expect_fail([rec], "log does not reach requested `to`", to=assigns[-1]["slot"] + 1)
    t8 = copy.deepcopy(rec); t8["first_slot"] = 1
    expect_fail([t8], "gap before the run")
    t9 = copy.deepcopy(rec)
    t9["entries"][0], t9["entries"][1] = t9["entries"][1], t9["entries"][0]
    expect_fail([t9], "entries out of order", slot=0)


def main(argv: list[str]) -> int:
    if len(argv) > 2:
        print(f"usage: {argv[0]} [vectors.json]", file=sys.stderr)
        return 2
    path = Path(argv[1]) if len(argv) == 2 else Path(__file__).resolve().parent.parent / "vectors.json"
    try:
        vectors = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        print(f"cannot read {path}: {e}", file=sys.stderr)
        return 2
    try:
        run_checks(vectors)
    except CheckFailed as e:
        print(f"FAIL: {e}", file=sys.stderr)
        print(f"({len(CHECKS)} checks passed before the failure)", file=sys.stderr)
        return 1
    except VerifyError as e:
        print(f"FAIL: log verification of the vector Run failed at {e}", file=sys.stderr)
        return 1
    except (KeyError, TypeError, ValueError) as e:
        print(f"FAIL: vectors file malformed or unexpected shape: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    n = len(vectors["assignments"])
    neg = sum(1 for c in CHECKS if c.startswith("NEG"))
    print(f"OK: {path}")
    print(f"  key: public_key and key_id from secret_seed")
    print(f"  genesis hash of {vectors['process']!r}")
    print(f"  {n} assignments: body hash, canonical encoding, prev hash, chain hash")
    print(f"  Merkle root; {n} audit paths recomputed and verified (RFC 9162 §2.1.3.2)")
    print(f"  statement; ed25519 signature recomputed from seed and verified with public key")
    print(f"  Run record: MessagePack decoded, fields match, re-encodes byte-identically,")
    print(f"              verifies as a log (chain.md 'Verifying a log')")
    print(f"  {neg} negative checks rejected as expected")
    print(f"  {len(CHECKS)} checks in total, all passed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
