#!/usr/bin/env python3
"""Independent check of turnstile's golden vectors (schemas/vectors.json).

Everything here is derived from schemas/*.md only (no Rust source):
  chain.md   - genesis, canonical encoding, hash chain, Merkle tree (RFC 6962/9162
               shape with BLAKE3), run statement (v3: prev_seq and the declared keys;
               v2: without keys) and digest, the seal (batch root, batch statement,
               one signature per batch), "Which keys a run must carry" and
               "Verifying a log: chain and foreign messages" (class LogVerifier): every
               log scenario of vectors.json ("logs") is fed to it message by message
               and each verdict (chain + data loss, or foreign + fault code) and the
               chain's end must be the expected ones
  records.md - record version 3 (and 2, still read): Run (prev_seq, keys) / Entry /
               Seal / Commitment / Receipt (run_prev_seq, run_keys) MessagePack records,
               key_id, "A receipt verifies alone"; the Receipt vector
               (receipt.msgpack_hex) is decoded, verified alone, compared field by
               field with the receipt built from the decoded run, re-encoded
               byte-identically, and altered in many ways that must all fail
  subjects.md - process token, message id and stored-header rules
  README.md  - conventions (big-endian, BLAKE3-256, ed25519 pure, lowercase hex)

Usage:
    python3 check_vectors.py [path/to/vectors.json]

Default path: ../vectors.json relative to this script (i.e. schemas/vectors.json).
Set CHECK_VECTORS_VERBOSE=1 to list each negative check and its rejection.
Exit status 0 when every check passes, 1 on the first mismatch (with a message),
2 when the file cannot be read. Dependencies: see requirements.txt.
"""

from __future__ import annotations

import copy
import json
import os
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
    """A verification failure; names the slot like `turnstile verify`."""

    def __init__(self, slot, reason):
        super().__init__(f"slot {slot}: {reason}")
        self.slot = slot
        self.reason = reason


CHECKS: list[str] = []
VERBOSE = bool(os.environ.get("CHECK_VECTORS_VERBOSE"))  # list every negative check


def check(cond: bool, what: str) -> None:
    if not cond:
        raise CheckFailed(what)
    CHECKS.append(what)


def check_eq(got, want, what: str) -> None:
    if got != want:
        raise CheckFailed(f"{what}\n    expected: {want!r}\n    computed: {got!r}")
    CHECKS.append(what)


def unhex(x, what: str, length: int | None = None) -> bytes:
    if not isinstance(x, str) or x != x.lower():
        raise CheckFailed(f"{what}: not a lowercase hex string: {x!r}")
    try:
        b = bytes.fromhex(x)
    except ValueError:
        raise CheckFailed(f"{what}: not valid hex: {x!r}")
    if length is not None and len(b) != length:
        raise CheckFailed(f"{what}: {len(b)} bytes, expected {length}")
    return b


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


def canonical_bh(process: str, slot: int, message_id: str, timestamp_ms: int,
                 headers, body_hash: bytes) -> bytes:
    """Canonical encoding given H(body) (a Receipt carries only the hash)."""
    hs = sorted((n.encode("utf-8"), v.encode("utf-8")) for n, v in headers)
    out = s(process) + u64be(slot) + s(message_id) + u64be(timestamp_ms)
    out += u32be(len(hs))
    for n, v in hs:
        out += s(n) + s(v)
    return out + body_hash


def headers_sorted(headers) -> bool:
    """records.md Entry.headers: sorted by (name bytes, value bytes), as chain.md sorts."""
    hs = [(n.encode("utf-8"), v.encode("utf-8")) for n, v in headers]
    return hs == sorted(hs)


def canonical(process, slot, message_id, timestamp_ms, headers, body: bytes) -> bytes:
    return canonical_bh(process, slot, message_id, timestamp_ms, headers, H(body))


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
        raise ValueError("MTH of an empty list is undefined (runs and batches are never empty)")
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


def root_from_path(leaf_index: int, tree_size: int, leaf_hash: bytes,
                   path: list[bytes]) -> bytes | None:
    """RFC 9162 §2.1.3.2 steps 1-5 up to the final comparison: the root the path
    leads to, or None when the path cannot be valid (index out of range, path too
    long or too short). `leaf_hash` is leaf(x), not x (chain.md)."""
    if not (0 <= leaf_index < tree_size):
        return None
    fn, sn = leaf_index, tree_size - 1
    r = leaf_hash
    for p in path:
        if sn == 0:
            return None
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
    return r if sn == 0 else None


def verify_inclusion(leaf_index: int, tree_size: int, entry: bytes,
                     path: list[bytes], root: bytes) -> bool:
    """RFC 9162 §2.1.3.2, starting from leaf(entry)."""
    r = root_from_path(leaf_index, tree_size, leaf(entry), path)
    return r is not None and r == root


RECORD_VERSION = 3          # records.md: what is written now
READ_VERSIONS = (2, 3)      # records.md: runs (and receipts) of version 2 are still read


def run_statement(process: str, prev_seq: int, first_slot: int, count: int, root: bytes,
                  keys: list[str] | None) -> bytes:
    """chain.md "The run statement and its digest": version 3 with the declared key
    set (`keys`, a list); version 2 (keys None) without it, under its own tag."""
    if keys is None:
        return (b"turnstile/run/v2" + s(process) + u64be(prev_seq)
                + u64be(first_slot) + u64be(count) + root)
    out = (b"turnstile/run/v3" + s(process) + u64be(prev_seq)
           + u64be(first_slot) + u64be(count) + root + u32be(len(keys)))
    for k in keys:
        out += s(k)
    return out


def batch_statement(batch_size: int, batch_root: bytes) -> bytes:
    return b"turnstile/batch/v1" + u64be(batch_size) + batch_root


# --------------------------------------------------------------------------
# records.md: decoding with the documented rules
# --------------------------------------------------------------------------

def key_id(public_key: bytes) -> str:
    return H(public_key)[:8].hex()


def _is_uint(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _is_bin(x, n: int | None = None) -> bool:
    return isinstance(x, (bytes, bytearray)) and (n is None or len(x) == n)


class RecordError(Exception):
    pass


def _fields(m, names: list[str], what: str) -> dict:
    """Known fields of a map; unknown ones ignored, a missing one refused."""
    if not isinstance(m, dict):
        raise RecordError(f"{what} is not a map")
    missing = [n for n in names if n not in m]
    if missing:
        raise RecordError(f"{what} lacks field(s) {missing}")
    return {n: m[n] for n in names}


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise RecordError(what)


def parse_headers(h, what: str) -> list[tuple[str, str]]:
    _need(isinstance(h, list), f"{what}.headers is not an array")
    out = []
    for pair in h:
        _need(isinstance(pair, (list, tuple)) and len(pair) == 2
              and all(isinstance(x, str) for x in pair), f"{what}.headers has a non-[str, str] item")
        out.append((pair[0], pair[1]))
    return out


def parse_commitment(m, what: str) -> dict:
    c = _fields(m, ["key_id", "public_key", "signature"], what)
    _need(isinstance(c["key_id"], str), f"{what}.key_id is not str")
    _need(_is_bin(c["public_key"], 32), f"{what}.public_key is not bin (32)")
    _need(_is_bin(c["signature"], 64), f"{what}.signature is not bin (64)")
    return {k: (bytes(x) if _is_bin(x) else x) for k, x in c.items()}


def parse_seal(m, what: str = "Seal") -> dict:
    sl = _fields(m, ["batch_size", "batch_index", "batch_path", "commitments"], what)
    _need(_is_uint(sl["batch_size"]), f"{what}.batch_size is not uint")
    _need(_is_uint(sl["batch_index"]), f"{what}.batch_index is not uint")
    _need(isinstance(sl["batch_path"], list) and all(_is_bin(p, 32) for p in sl["batch_path"]),
          f"{what}.batch_path is not an array of bin32")
    _need(isinstance(sl["commitments"], list), f"{what}.commitments is not an array")
    sl["batch_path"] = [bytes(p) for p in sl["batch_path"]]
    sl["commitments"] = [parse_commitment(c, f"{what}.commitments[{i}]")
                         for i, c in enumerate(sl["commitments"])]
    return sl


ENTRY_FIELDS = ["slot", "message_id", "timestamp_ms", "headers", "body", "prev_hash", "chain_hash"]
RUN_FIELDS = ["v", "process", "prev_seq", "first_slot", "keys", "entries", "seal"]
RUN_FIELDS_V2 = [f for f in RUN_FIELDS if f != "keys"]
SEAL_FIELDS = ["batch_size", "batch_index", "batch_path", "commitments"]
COMMITMENT_FIELDS = ["key_id", "public_key", "signature"]
RECEIPT_FIELDS = ["v", "process", "slot", "message_id", "timestamp_ms", "headers", "body_hash",
                  "prev_hash", "chain_hash", "durable", "duplicate", "run_prev_seq",
                  "run_first_slot", "run_count", "run_keys", "merkle_path", "seal"]
RECEIPT_FIELDS_V2 = [f for f in RECEIPT_FIELDS if f != "run_keys"]


def _version(m, what: str) -> int:
    _need(isinstance(m, dict), f"{what} is not a map")
    _need("v" in m, f"{what} lacks field(s) ['v']")
    v = m["v"]
    _need(_is_uint(v) and v in READ_VERSIONS, f"{what}.v is {v!r}, not one of {READ_VERSIONS}")
    return v


def parse_key_set(x, what: str) -> list[str]:
    """records.md Run.keys: key ids, sorted by their UTF-8 bytes, each once."""
    _need(isinstance(x, list) and all(isinstance(k, str) for k in x), f"{what} is not an array of str")
    b = [k.encode("utf-8") for k in x]
    _need(all(b[i] < b[i + 1] for i in range(len(b) - 1)), f"{what} is not sorted and distinct")
    return list(x)


def parse_entry(m, what: str) -> dict:
    e = _fields(m, ENTRY_FIELDS, what)
    _need(_is_uint(e["slot"]), f"{what}.slot is not uint")
    _need(isinstance(e["message_id"], str), f"{what}.message_id is not str")
    _need(_is_uint(e["timestamp_ms"]), f"{what}.timestamp_ms is not uint")
    e["headers"] = parse_headers(e["headers"], what)
    _need(_is_bin(e["body"]), f"{what}.body is not bin")
    _need(_is_bin(e["prev_hash"], 32), f"{what}.prev_hash is not bin32")
    _need(_is_bin(e["chain_hash"], 32), f"{what}.chain_hash is not bin32")
    for k in ("body", "prev_hash", "chain_hash"):
        e[k] = bytes(e[k])
    return e


def parse_run(m) -> dict:
    v = _version(m, "Run")
    r = _fields(m, RUN_FIELDS if v >= 3 else RUN_FIELDS_V2, "Run")
    # A version 2 run declares no key set (a `keys` field there is unknown: ignored).
    r["keys"] = parse_key_set(r["keys"], "Run.keys") if v >= 3 else None
    _need(isinstance(r["process"], str), "Run.process is not str")
    _need(_is_uint(r["prev_seq"]), "Run.prev_seq is not uint")
    _need(_is_uint(r["first_slot"]), "Run.first_slot is not uint")
    _need(isinstance(r["entries"], list), "Run.entries is not an array")
    # records.md Run.entries: "never empty" (a run of no entries is no Run).
    _need(len(r["entries"]) > 0, "Run.entries is empty")
    r["entries"] = [parse_entry(e, f"Run.entries[{i}]") for i, e in enumerate(r["entries"])]
    r["seal"] = parse_seal(r["seal"], "Run.seal")
    return r


def parse_receipt(m) -> dict:
    v = _version(m, "Receipt")
    r = _fields(m, RECEIPT_FIELDS if v >= 3 else RECEIPT_FIELDS_V2, "Receipt")
    r["run_keys"] = parse_key_set(r["run_keys"], "Receipt.run_keys") if v >= 3 else None
    _need(isinstance(r["process"], str), "Receipt.process is not str")
    for k in ("slot", "timestamp_ms", "run_prev_seq", "run_first_slot", "run_count"):
        _need(_is_uint(r[k]), f"Receipt.{k} is not uint")
    _need(isinstance(r["message_id"], str), "Receipt.message_id is not str")
    r["headers"] = parse_headers(r["headers"], "Receipt")
    for k in ("body_hash", "prev_hash", "chain_hash"):
        _need(_is_bin(r[k], 32), f"Receipt.{k} is not bin32")
        r[k] = bytes(r[k])
    for k in ("durable", "duplicate"):
        _need(isinstance(r[k], bool), f"Receipt.{k} is not bool")
    _need(isinstance(r["merkle_path"], list) and all(_is_bin(p, 32) for p in r["merkle_path"]),
          "Receipt.merkle_path is not an array of bin32")
    r["merkle_path"] = [bytes(p) for p in r["merkle_path"]]
    r["seal"] = parse_seal(r["seal"], "Receipt.seal")
    return r


def decode(raw: bytes):
    # raw=False: str must be valid UTF-8 and decodes to str; bin decodes to bytes.
    return msgpack.unpackb(raw, raw=False, strict_map_key=True)


def encode(obj) -> bytes:
    # use_bin_type: bytes -> bin, str -> str; msgpack-python packs ints compactly.
    return msgpack.packb(obj, use_bin_type=True)


# --------------------------------------------------------------------------
# chain.md "The seal" / "Verifying a log", records.md "A receipt verifies alone"
# --------------------------------------------------------------------------

def seal_fault(seal: dict, digest: bytes, trusted: dict[str, bytes],
               required: list[str]) -> tuple[str, str] | None:
    """chain.md "The seal" and rule 3 of "Verifying a log": None when the seal holds,
    else (fault code, why). Checked in the order rule 3 lists them: no commitment, a
    key not trusted, a signature that does not verify, a required key id missing
    (`required`: the run's declared keys, then the verifier's own)."""
    if not seal["commitments"]:
        return "unsigned", "the seal has no commitment"
    for c in seal["commitments"]:
        kid, pk = c["key_id"], c["public_key"]
        if key_id(pk) != kid:
            return "untrusted_key", f"key_id {kid} is not the id of its public key"
        if trusted.get(kid) != pk:
            return "untrusted_key", f"key {kid} is not trusted"
    # root = RFC 9162 root from leaf(run_digest), batch_index, batch_size, batch_path
    root = root_from_path(seal["batch_index"], seal["batch_size"], leaf(digest), seal["batch_path"])
    if root is None:
        return "bad_signature", (f"batch path cannot lead to a root (index {seal['batch_index']} "
                                 f"of {seal['batch_size']}, {len(seal['batch_path'])} elements)")
    stmt = batch_statement(seal["batch_size"], root)
    for c in seal["commitments"]:
        try:
            nacl.signing.VerifyKey(c["public_key"]).verify(stmt, c["signature"])
        except nacl.exceptions.BadSignatureError:
            return "bad_signature", f"signature by {c['key_id']} does not verify over the batch statement"
    signed_by = {c["key_id"] for c in seal["commitments"]}
    for kid in required:
        if kid not in signed_by:
            return "missing_key", f"required key {kid} has not committed"
    return None


def verify_seal(seal: dict, digest: bytes, trusted: dict[str, bytes], required: list[str],
                slot: int) -> None:
    """A receipt's seal; `slot` names the failure."""
    fault = seal_fault(seal, digest, trusted, required)
    if fault is not None:
        raise VerifyError(slot, f"{fault[0]}: {fault[1]}")


# --------------------------------------------------------------------------
# chain.md "Verifying a log: chain and foreign messages"
# --------------------------------------------------------------------------

FAULT_CODES = ["undecodable", "wrong_process", "broken_link", "bad_chain_hash", "unsigned",
               "untrusted_key", "bad_signature", "missing_key", "replayed", "fork",
               "unauthorized_key_change"]
LOSS_CODES = ["lost", "gap"]


def decode_run(data: bytes) -> dict:
    """Rule 1: the message as a Run of this record version, or RecordError."""
    try:
        m = decode(data)
    except Exception as e:          # not MessagePack, truncated, trailing bytes, bad UTF-8
        raise RecordError(f"not MessagePack: {type(e).__name__}: {e}")
    return parse_run(m)


def run_fault(run: dict, process: str, trusted: dict[str, bytes],
              required: list[str]) -> tuple[str, str] | None:
    """Rules 1 (process), 2 and 3: what is wrong with the run wherever it sits."""
    if run["process"] != process:
        return "wrong_process", f"run names process {run['process']!r}"
    first, entries = run["first_slot"], run["entries"]
    chain = []
    for i, e in enumerate(entries):
        slot = first + i
        if e["slot"] != slot:
            return "broken_link", f"entry {i} has slot {e['slot']}, not first_slot + {i} = {slot}"
        if i == 0 and slot == 0 and e["prev_hash"] != genesis(process):
            return "broken_link", "slot 0 does not link to the genesis hash"
        if i > 0 and e["prev_hash"] != entries[i - 1]["chain_hash"]:
            return "broken_link", f"slot {slot} does not link to slot {slot - 1}"
        ch = chain_hash(e["prev_hash"], canonical(process, slot, e["message_id"], e["timestamp_ms"],
                                                  e["headers"], e["body"]))
        if ch != e["chain_hash"]:
            return "bad_chain_hash", f"slot {slot}: chain hash does not recompute"
        chain.append(ch)
    digest = H(run_statement(process, run["prev_seq"], first, len(entries), mth(chain), run["keys"]))
    return seal_fault(run["seal"], digest, trusted, (run["keys"] or []) + list(required))


class LogVerifier:
    """The rule of chain.md, one message at a time, in stream order on one subject.

    feed() returns {"verdict": "chain", "lost": [codes]} or
    {"verdict": "foreign", "fault": code}, plus "why" (not part of the vectors)."""

    def __init__(self, process: str, trusted: dict[str, bytes], required: list[str],
                 from_genesis: bool = True):
        self.process, self.trusted, self.required = process, trusted, list(required)
        if from_genesis:
            # initially slot 0 and genesis(P); `before` of the first message is 0
            self.next_slot, self.prev, self.last_seq = 0, genesis(process), 0
        else:
            # "Verifying from slot `from` > 0": the first run's place (prev_seq) and
            # first prev_hash are taken as given.
            self.next_slot, self.prev, self.last_seq = None, None, None
        # "Which keys a run must carry": the key set the chain's last run declares;
        # None when there is none to hand over from (genesis, a version 2 run, mid-log).
        self.keys = None
        self.chain_runs = []          # (seq, run) of the runs that continue the chain

    def feed(self, seq: int, data: bytes) -> dict:
        if self.last_seq is not None and seq <= self.last_seq:
            raise CheckFailed(f"stream sequence {seq} after {self.last_seq}: not in stream order")
        before, self.last_seq = self.last_seq, seq
        try:
            run = decode_run(data)
        except RecordError as e:
            return {"verdict": "foreign", "fault": "undecodable", "why": str(e)}
        fault = run_fault(run, self.process, self.trusted, self.required)
        if fault is not None:
            return {"verdict": "foreign", "fault": fault[0], "why": fault[1]}
        if before is not None and run["prev_seq"] < before:
            return {"verdict": "foreign", "fault": "replayed",
                    "why": f"written after {run['prev_seq']}, found after {before}"}
        first, first_prev = run["first_slot"], run["entries"][0]["prev_hash"]
        if self.next_slot is not None:
            if first < self.next_slot:
                return {"verdict": "foreign", "fault": "fork",
                        "why": f"starts at {first}, the chain holds up to {self.next_slot - 1}"}
            if first == self.next_slot and first_prev != self.prev:
                return {"verdict": "foreign", "fault": "fork",
                        "why": f"starts at {first} but does not link to the chain's head"}
            # Rule 6: it links to the chain's last run; a change of the declared set
            # must be sealed by every key of that run's set too.
            if first == self.next_slot and self.keys is not None and run["keys"] != self.keys:
                signed_by = {c["key_id"] for c in run["seal"]["commitments"]}
                absent = [k for k in self.keys if k not in signed_by]
                if absent:
                    return {"verdict": "foreign", "fault": "unauthorized_key_change",
                            "why": f"declares {run['keys']} after {self.keys} without a seal by {absent[0]}"}
        lost = []
        if before is not None and run["prev_seq"] > before:
            lost.append("lost")
        if self.next_slot is not None and first > self.next_slot:
            lost.append("gap")
        self.next_slot = first + len(run["entries"])
        self.prev = run["entries"][-1]["chain_hash"]
        self.keys = run["keys"]
        self.chain_runs.append((seq, run))
        return {"verdict": "chain", "lost": lost}


def verify_log(messages: list[tuple[int, bytes]], process: str, trusted: dict[str, bytes],
               required: list[str], from_slot: int = 0, to: int | None = None) -> dict:
    """A whole verification (chain.md, last paragraphs): from genesis, or from the run
    holding `from_slot` with its place and first prev_hash as given; reads to the end of
    the messages; a gap fault at the end if the chain stops before `to`. Returns the
    verdicts per message, the faults (seq, code) and where the chain ends."""
    if from_slot > 0:
        def holds(data):
            try:
                r = decode_run(data)
            except RecordError:
                return False
            return r["first_slot"] <= from_slot < r["first_slot"] + len(r["entries"])
        start = next((i for i, (_, d) in enumerate(messages) if holds(d)), None)
        if start is None:
            return {"verdicts": [], "faults": [(None, "gap")], "next_slot": None, "verifier": None}
        messages = messages[start:]
    lv = LogVerifier(process, trusted, required, from_genesis=from_slot == 0)
    verdicts, faults = [], []
    for seq, data in messages:
        vd = lv.feed(seq, data)
        verdicts.append((seq, vd))
        if vd["verdict"] == "foreign":
            faults.append((seq, vd["fault"]))
        else:
            faults.extend((seq, c) for c in vd["lost"])
    if to is not None and (lv.next_slot is None or lv.next_slot <= to):
        faults.append((None, "gap"))
    return {"verdicts": verdicts, "faults": faults, "next_slot": lv.next_slot, "verifier": lv}


def verify_receipt(raw_receipt, trusted: dict[str, bytes], required: list[str]) -> None:
    """records.md "A receipt verifies alone"."""
    try:
        r = parse_receipt(raw_receipt)
    except RecordError as e:
        raise VerifyError(raw_receipt.get("slot") if isinstance(raw_receipt, dict) else None,
                          f"receipt refused: {e}")
    slot = r["slot"]
    if slot == 0 and r["prev_hash"] != genesis(r["process"]):
        raise VerifyError(slot, "slot 0 but prev_hash is not the genesis hash")
    ch = chain_hash(r["prev_hash"], canonical_bh(r["process"], slot, r["message_id"],
                                                 r["timestamp_ms"], r["headers"], r["body_hash"]))
    if ch != r["chain_hash"]:
        raise VerifyError(slot, "chain hash mismatch: the receipt was altered")
    index = slot - r["run_first_slot"]
    root = root_from_path(index, r["run_count"], leaf(ch), r["merkle_path"])
    if root is None:
        raise VerifyError(slot, f"merkle path invalid for index {index} of {r['run_count']}")
    digest = H(run_statement(r["process"], r["run_prev_seq"], r["run_first_slot"],
                             r["run_count"], root, r["run_keys"]))
    verify_seal(r["seal"], digest, trusted, (r["run_keys"] or []) + list(required), slot)


def decoded_of(decoded: list, process: str) -> list:
    return [d for d in decoded if d[1]["process"] == process]


def build_receipt(run: dict, i: int) -> dict:
    """Receipt for entry i of a decoded Run (records.md Receipt, fields in order)."""
    e = run["entries"][i]
    chain = [x["chain_hash"] for x in run["entries"]]
    out = {
        "v": run["v"],
        "process": run["process"],
        "slot": e["slot"],
        "message_id": e["message_id"],
        "timestamp_ms": e["timestamp_ms"],
        "headers": [list(h) for h in e["headers"]],
        "body_hash": H(e["body"]),
        "prev_hash": e["prev_hash"],
        "chain_hash": e["chain_hash"],
        "durable": True,
        "duplicate": False,
        "run_prev_seq": run["prev_seq"],
        "run_first_slot": run["first_slot"],
        "run_count": len(run["entries"]),
        "run_keys": run["keys"],
        "merkle_path": audit_path(i, chain),
        "seal": run["seal"],
    }
    if run["keys"] is None:          # a version 2 run's receipt has no run_keys
        del out["run_keys"]
    return out


# --------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------

def processes_of(v: dict) -> list[dict]:
    """Normalise the two process blocks of vectors.json."""
    procs = [{"process": v["process"], "genesis": v["genesis"], "assignments": v["assignments"]}]
    op = v["other_process"]
    procs.append({"process": op["process"], "genesis": op["genesis"],
                  "assignments": op["assignments"] if "assignments" in op else [op["assignment"]]})
    return procs


def check_process(p: dict) -> list[bytes]:
    """Genesis, body hash, canonical encoding, prev and chain hash of every assignment."""
    process = p["process"]
    g = genesis(process)
    check_eq(g.hex(), p["genesis"], f"{process}: genesis hash")
    prev, chain = g, []
    assigns = p["assignments"]
    check(len(assigns) > 0, f"{process}: has assignments")
    for i, a in enumerate(assigns):
        slot = a["slot"]
        tag = f"{process} slot {slot}"
        check_eq(slot, i, f"{tag}: slots consecutive from 0")
        body = unhex(a["body_hex"], f"{tag} body_hex")
        bh = H(body)
        check("body_hash" in a, f"{tag}: vector gives body_hash")
        check_eq(bh.hex(), a["body_hash"], f"{tag}: body hash = BLAKE3(body)")
        canon = canonical(process, slot, a["message_id"], a["timestamp_ms"], a["headers"], body)
        check_eq(canon.hex(), a["canonical_hex"], f"{tag}: canonical encoding")
        check_eq(canon[-32:], bh, f"{tag}: canonical encoding ends with H(body)")
        check("prev_hash" in a, f"{tag}: vector gives prev_hash")
        check_eq(a["prev_hash"], prev.hex(),
                 f"{tag}: prev hash = " + ("genesis" if slot == 0 else "previous chain hash"))
        check(headers_sorted(a["headers"]), f"{tag}: headers sorted by (name bytes, value bytes)")
        for name, _ in a["headers"]:
            check(not name.lower().startswith(("nats-", "ts-")),
                  f"{tag}: stored header {name!r} is not a control header (subjects.md)")
        check(0 < len(a["message_id"].encode("utf-8")) <= 256
              and not any(ord(c) < 0x20 or ord(c) == 0x7f for c in a["message_id"]),
              f"{tag}: message id is 1-256 bytes without control characters (subjects.md)")
        ch = chain_hash(prev, canon)
        check_eq(ch.hex(), a["chain_hash"], f"{tag}: chain hash")
        if i:
            check(a["timestamp_ms"] >= assigns[i - 1]["timestamp_ms"], f"{tag}: timestamp never decreases")
        chain.append(ch)
        prev = ch
    return chain


def run_checks(v: dict) -> dict:
    # --- key -------------------------------------------------------------
    seed = unhex(v["key"]["secret_seed"], "key.secret_seed", 32)
    check_eq(seed, b"\x42" * 32, "secret_seed is 32 x 0x42 (chain.md 'Vectors')")
    sk = nacl.signing.SigningKey(seed)
    pk = bytes(sk.verify_key)
    check_eq(pk.hex(), v["key"]["public_key"], "public_key derived from secret_seed (RFC 8032)")
    kid = key_id(pk)
    check_eq(kid, v["key"]["key_id"], "key_id = hex(BLAKE3(public_key)[:8])")
    check_eq(len(kid), 16, "key_id is 16 hex chars")
    trusted = {kid: pk}

    # --- processes: genesis and chains -------------------------------------
    procs = processes_of(v)
    check_eq(len({p["process"] for p in procs}), len(procs), "process names distinct")
    chains = {p["process"]: check_process(p) for p in procs}
    assigns_of = {p["process"]: p["assignments"] for p in procs}
    def non_ascii(x: str) -> bool:
        return len(x.encode("utf-8")) != len(x)

    for p in procs:
        check(0 < len(p["process"]) <= 200
              and all(c.isascii() and (c.isalnum() or c in "-_") for c in p["process"]),
              f"{p['process']}: valid process token (subjects.md)")
        for a in p["assignments"]:
            if non_ascii(a["message_id"] + "".join(x for h in a["headers"] for x in h)) \
                    or any(b > 127 for b in bytes.fromhex(a["body_hex"])):
                CHECKS.append(f"{p['process']} slot {a['slot']}: non-ASCII content covered")
    ob = v["other_process"]["assignment"]
    check(non_ascii(ob["message_id"]),
          "other_process: message id is non-ASCII (str() length counts UTF-8 bytes)")
    check(any(non_ascii(val) for _, val in ob["headers"]),
          "other_process: a header value is non-ASCII (chain.md 'Vectors')")
    canon_b = bytes.fromhex(ob["canonical_hex"])
    mid = ob["message_id"].encode("utf-8")
    off = 4 + len(v["other_process"]["process"].encode("utf-8")) + 8
    check_eq(canon_b[off:off + 4 + len(mid)], u32be(len(mid)) + mid,
             "other_process: canonical str(message_id) prefix is the UTF-8 byte length")

    # --- runs: Merkle tree, audit paths, statement, digest -----------------
    runs_v = v["runs"]
    check(len(runs_v) > 0, "vectors have runs")
    digests = []
    covered = {p["process"]: [] for p in procs}
    for ri, rv in enumerate(runs_v):
        process = rv["process"]
        tag = f"run {ri} ({process})"
        check(process in chains, f"{tag}: process has assignments in the vectors")
        first, count = rv["first_slot"], rv["count"]
        check(count > 0, f"{tag}: run not empty")
        check(first + count <= len(chains[process]), f"{tag}: slots {first}..{first + count - 1} exist")
        covered[process].extend(range(first, first + count))
        d = chains[process][first:first + count]
        root = mth(d)
        check_eq(root.hex(), rv["merkle_root"], f"{tag}: Merkle root (MTH over chain hashes)")
        check_eq(len(rv["merkle_paths"]), count, f"{tag}: one audit path per entry")
        for m in range(count):
            path = audit_path(m, d)
            check_eq([p.hex() for p in path], rv["merkle_paths"][m], f"{tag}: audit path of leaf {m}")
            given = [unhex(p, f"{tag} merkle_paths[{m}]", 32) for p in rv["merkle_paths"][m]]
            check(verify_inclusion(m, count, d[m], given, root),
                  f"{tag}: audit path {m} verifies from leaf(chain_hash) (RFC 9162 §2.1.3.2)")
            check(root_from_path(m, count, d[m], given) != root,
                  f"{tag}: audit path {m} does NOT verify from the bare chain_hash")
            check(not verify_inclusion(count, count, d[m], given, root),
                  f"{tag}: leaf_index >= tree_size rejected (leaf {m})")
            if count > 1:
                check(not verify_inclusion(m, count, d[(m + 1) % count], given, root),
                      f"{tag}: audit path {m} rejects another leaf")
            if given:
                bad = [bytes([given[0][0] ^ 1]) + given[0][1:]] + given[1:]
                check(not verify_inclusion(m, count, d[m], bad, root),
                      f"{tag}: audit path {m} with a flipped byte rejected")
                check(not verify_inclusion(m, count, d[m], given + [given[0]], root),
                      f"{tag}: audit path {m} with an extra element rejected")
        prev_seq = rv["prev_seq"]
        check(_is_uint(prev_seq), f"{tag}: prev_seq is a uint")
        # chain.md "Vectors": proc-A's run is written after nothing (0), proc-B's after 7.
        check_eq(prev_seq, {v["process"]: 0, v["other_process"]["process"]: 7}[process],
                 f"{tag}: prev_seq as chain.md 'Vectors' gives it")
        keys = rv["keys"]
        check(isinstance(keys, list) and all(isinstance(k, str) for k in keys),
              f"{tag}: the run declares a key set (record version 3)")
        stmt = run_statement(process, prev_seq, first, count, root, keys)
        check_eq(stmt.hex(), rv["statement_hex"], f"{tag}: run statement")
        check_eq(stmt[:16], b"turnstile/run/v3", f"{tag}: statement tag turnstile/run/v3")
        pb = len(b"turnstile/run/v3") + 4 + len(process.encode("utf-8"))
        check_eq(stmt[pb:pb + 8], u64be(prev_seq), f"{tag}: statement has u64be(prev_seq) after str(process)")
        check_eq(stmt[pb + 24 + 32:], u32be(len(keys)) + b"".join(s(k) for k in keys),
                 f"{tag}: statement ends with the declared keys (count, then str(id) each)")
        check(run_statement(process, prev_seq + 1, first, count, root, keys) != stmt,
              f"{tag}: statement changes with prev_seq")
        check(run_statement(process, prev_seq, first, count, root, keys + ["zz"]) != stmt,
              f"{tag}: statement changes with the declared keys")
        check(run_statement(process, prev_seq, first, count, root, None) != stmt,
              f"{tag}: a version 2 statement differs")
        digest = H(stmt)
        check_eq(digest.hex(), rv["run_digest"], f"{tag}: run digest = H(statement)")
        digests.append(digest)
    for p in procs:
        check_eq(sorted(covered[p["process"]]), list(range(len(p["assignments"]))),
                 f"{p['process']}: runs cover each assignment exactly once")

    # --- batch: root, paths, statement, signature --------------------------
    bv = v["batch"]
    n = len(runs_v)
    check_eq(bv["size"], n, "batch size = number of runs")
    order = sorted(range(n), key=lambda i: runs_v[i]["batch_index"])
    check_eq([runs_v[i]["batch_index"] for i in order], list(range(n)),
             "batch indices are 0..size-1, each once")
    leaves = [digests[i] for i in order]          # D[batch_index] = run_digest
    broot = mth(leaves)
    check_eq(broot.hex(), bv["root"], "batch root = MTH(run digests in batch_index order)")
    for ri, rv in enumerate(runs_v):
        idx = rv["batch_index"]
        tag = f"run {ri} ({rv['process']})"
        check_eq([p.hex() for p in audit_path(idx, leaves)], rv["batch_path"],
                 f"{tag}: batch path recomputed (index {idx})")
        given = [unhex(p, f"{tag} batch_path", 32) for p in rv["batch_path"]]
        check(verify_inclusion(idx, n, digests[ri], given, broot),
              f"{tag}: batch path verifies from leaf(run_digest) to the batch root")
        for other in range(n):
            if other != idx:
                check(not verify_inclusion(other, n, digests[ri], given, broot),
                      f"{tag}: batch path rejected at moved index {other}")
        if given:
            bad = given[:-1] + [bytes([given[-1][0] ^ 0x80]) + given[-1][1:]]
            check(not verify_inclusion(idx, n, digests[ri], bad, broot),
                  f"{tag}: altered batch path element rejected")
    bstmt = batch_statement(n, broot)
    check_eq(bstmt.hex(), bv["statement_hex"], "batch statement")
    sig = sk.sign(bstmt).signature
    check_eq(sig.hex(), bv["signature"], "ed25519 signature recomputed from secret_seed (deterministic)")
    vk = nacl.signing.VerifyKey(unhex(v["key"]["public_key"], "key.public_key", 32))
    try:
        vk.verify(bstmt, unhex(bv["signature"], "batch.signature", 64))
        ok = True
    except nacl.exceptions.BadSignatureError:
        ok = False
    check(ok, "ed25519 signature verifies with public_key")
    bad_sig = bytearray(sig); bad_sig[10] ^= 1
    try:
        vk.verify(bstmt, bytes(bad_sig)); ok = True
    except nacl.exceptions.BadSignatureError:
        ok = False
    check(not ok, "tampered signature does not verify")

    # --- Run records (MessagePack) -------------------------------------------
    decoded = []                 # (raw map, parsed run) per vector run
    for ri, rv in enumerate(runs_v):
        process = rv["process"]
        tag = f"run {ri} ({process}) record"
        raw = unhex(rv["record_msgpack_hex"], f"{tag} hex")
        rec = decode(raw)
        check(isinstance(rec, dict), f"{tag}: a MessagePack map")
        check_eq(list(rec.keys()), RUN_FIELDS, f"{tag}: Run fields in records.md order")
        try:
            run = parse_run(rec)
        except RecordError as e:
            raise CheckFailed(f"{tag}: refused by the records.md rules: {e}")
        check_eq(run["process"], process, f"{tag}: process")
        check_eq(run["prev_seq"], rv["prev_seq"], f"{tag}: prev_seq")
        check_eq(run["first_slot"], rv["first_slot"], f"{tag}: first_slot")
        check_eq(len(run["entries"]), rv["count"], f"{tag}: entry count")
        for k, (e_raw, e) in enumerate(zip(rec["entries"], run["entries"])):
            a = assigns_of[process][rv["first_slot"] + k]
            et = f"{tag} entry {k}"
            check_eq(list(e_raw.keys()), ENTRY_FIELDS, f"{et}: Entry fields in records.md order")
            check_eq(e["slot"], a["slot"], f"{et}: slot")
            check_eq(e["slot"], run["first_slot"] + k, f"{et}: slot = first_slot + index")
            check_eq(e["message_id"], a["message_id"], f"{et}: message_id")
            check_eq(e["timestamp_ms"], a["timestamp_ms"], f"{et}: timestamp_ms")
            check_eq([list(h) for h in e["headers"]], [list(h) for h in a["headers"]], f"{et}: headers")
            check(headers_sorted(e["headers"]),
                  f"{et}: stored headers sorted by (name bytes, value bytes) (records.md Entry)")
            check_eq(e["body"].hex(), a["body_hex"], f"{et}: body")
            want_prev = chains[process][e["slot"] - 1] if e["slot"] else genesis(process)
            check_eq(e["prev_hash"], want_prev, f"{et}: prev_hash")
            check_eq(e["prev_hash"].hex(), a["prev_hash"], f"{et}: prev_hash = vector")
            check_eq(e["chain_hash"].hex(), a["chain_hash"], f"{et}: chain_hash")
        # seal
        seal_raw, seal = rec["seal"], run["seal"]
        check_eq(list(seal_raw.keys()), SEAL_FIELDS, f"{tag}: Seal fields in records.md order")
        check_eq(seal["batch_size"], bv["size"], f"{tag}: seal.batch_size")
        check_eq(seal["batch_index"], rv["batch_index"], f"{tag}: seal.batch_index")
        check_eq([p.hex() for p in seal["batch_path"]], rv["batch_path"], f"{tag}: seal.batch_path")
        check_eq(len(seal["commitments"]), 1, f"{tag}: seal has one commitment")
        c_raw, c = seal_raw["commitments"][0], seal["commitments"][0]
        check_eq(list(c_raw.keys()), COMMITMENT_FIELDS, f"{tag}: Commitment fields in records.md order")
        check_eq(c["key_id"], kid, f"{tag}: commitment key_id")
        check_eq(c["key_id"], key_id(c["public_key"]), f"{tag}: key_id is the id of public_key")
        check_eq(c["public_key"], pk, f"{tag}: commitment public_key")
        check_eq(c["signature"], sig, f"{tag}: commitment signature = batch signature")
        # Re-encode from the vector inputs (fields in table order, compact ints, bin/str).
        rebuilt = encode({
            "v": RECORD_VERSION, "process": process, "prev_seq": rv["prev_seq"],
            "first_slot": rv["first_slot"], "keys": rv["keys"],
            "entries": [{
                "slot": a["slot"], "message_id": a["message_id"], "timestamp_ms": a["timestamp_ms"],
                "headers": a["headers"], "body": bytes.fromhex(a["body_hex"]),
                "prev_hash": want_p, "chain_hash": bytes.fromhex(a["chain_hash"]),
            } for a, want_p in (
                (assigns_of[process][sl],
                 chains[process][sl - 1] if sl else genesis(process))
                for sl in range(rv["first_slot"], rv["first_slot"] + rv["count"]))],
            "seal": {"batch_size": n, "batch_index": rv["batch_index"],
                     "batch_path": audit_path(rv["batch_index"], leaves),
                     "commitments": [{"key_id": kid, "public_key": pk, "signature": sig}]},
        })
        check_eq(rebuilt.hex(), rv["record_msgpack_hex"], f"{tag}: re-encoded from the inputs byte-identically")
        # unknown fields are ignored, a missing one refused (records.md)
        extra = dict(rec); extra["future_field"] = [1, 2]
        extra["seal"] = dict(rec["seal"]); extra["seal"]["x"] = b"y"
        check(parse_run(decode(encode(extra)))["entries"] == run["entries"], f"{tag}: unknown fields ignored")
        for fld in RUN_FIELDS:
            miss = {k: x for k, x in rec.items() if k != fld}
            try:
                parse_run(miss); refused = False
            except RecordError:
                refused = True
            check(refused, f"{tag}: refused without field {fld!r}")
        decoded.append((rec, run))

    # --- Verifying a log (chain.md), per process ---------------------------
    # Each vector run stands on its subject where it was written: right after stream
    # sequence prev_seq. Whatever came before it there is foreign (here: garbage).
    for p in procs:
        process = p["process"]
        msgs = []
        for ri, (rec, run) in sorted(((ri, d) for ri, d in enumerate(decoded)
                                      if d[1]["process"] == process),
                                     key=lambda x: x[1][1]["first_slot"]):
            if run["prev_seq"] > (msgs[-1][0] if msgs else 0):
                msgs.append((run["prev_seq"], b"\xc1 a foreign message"))
            msgs.append((run["prev_seq"] + 1, unhex(runs_v[ri]["record_msgpack_hex"], "record")))
        last_slot = len(p["assignments"]) - 1
        for req in ([], [kid]):
            res = verify_log(msgs, process, trusted, req, 0, last_slot)
            check_eq([vd for _, vd in res["verdicts"] if vd["verdict"] == "chain"],
                     [{"verdict": "chain", "lost": []}] * len(decoded_of(decoded, process)),
                     f"{process}: every vector run continues the chain (required ids {req})")
            check_eq([f for f in res["faults"] if f[1] != "undecodable"], [],
                     f"{process}: the log verifies to slot {last_slot} (required ids {req})")
            check_eq(res["next_slot"], last_slot + 1, f"{process}: the chain ends after slot {last_slot}")
        for frm in range(1, last_slot + 1):
            res = verify_log(msgs, process, trusted, [kid], frm, last_slot)
            check_eq(res["faults"], [], f"{process}: verifies from slot {frm} (the run holding it "
                                        f"taken in its place, its first prev_hash as given)")
        res = verify_log(msgs, process, trusted, [kid], 0, last_slot + 1)
        check_eq(res["faults"][-1], (None, "gap"),
                 f"{process}: a requested `to` after the head ends with a gap fault")
        # Without the foreign messages before it, a run written after prev_seq > 0 says
        # the message it was written after is gone (lost), and still continues the chain.
        only = [m for m in msgs if m[1][:1] != b"\xc1"]
        if only[0][0] > 1:
            res = verify_log(only, process, trusted, [kid])
            check_eq(res["verdicts"][0][1]["lost"], ["lost"],
                     f"{process}: run written after {only[0][0] - 1}, first on the subject: lost")

    # --- Receipts (records.md "A receipt verifies alone") -----------------
    receipts = []
    for ri, (rec, run) in enumerate(decoded):
        rv = runs_v[ri]
        for i, e in enumerate(run["entries"]):
            tag = f"receipt {run['process']} slot {e['slot']}"
            rc = build_receipt(run, i)
            check_eq([p.hex() for p in rc["merkle_path"]], rv["merkle_paths"][i],
                     f"{tag}: merkle_path = vector audit path")
            a = assigns_of[run["process"]][e["slot"]]
            check_eq(rc["body_hash"].hex(), a["body_hash"], f"{tag}: body_hash = vector")
            wire = encode(rc)
            back = decode(wire)
            check_eq(list(back.keys()), RECEIPT_FIELDS, f"{tag}: Receipt fields in records.md order")
            verify_receipt(back, trusted, [kid])
            verify_receipt(back, trusted, [])
            CHECKS.append(f"{tag}: verifies alone (chain hash, run root, digest, seal)")
            receipts.append(back)

    # --- The Receipt vector (records.md Receipt / Seal / Commitment) ---------
    vraw, vrec = check_vector_receipt(v, decoded, trusted, kid, pk, sig, assigns_of, chains)

    negative_checks(v, decoded, receipts, trusted, kid, procs)
    negative_receipt_vector(vraw, vrec, trusted, kid)
    logs = check_log_scenarios(v, kid, pk)
    return {"procs": procs, "runs": len(runs_v), "batch": n, "receipts": len(receipts), "logs": logs}


def check_log_scenarios(v: dict, kid: str, pk: bytes) -> list[str]:
    """vectors.json "logs": each scenario's messages fed, in stream order, to this
    file's LogVerifier (chain.md "Verifying a log: chain and foreign messages"); each
    verdict must be the expected one, and the chain must end where the vectors say.
    Returns one summary line per scenario."""
    scenarios = v["logs"]
    check(isinstance(scenarios, list) and len(scenarios) > 0, "logs: scenarios present")
    check_eq(len({sc["name"] for sc in scenarios}), len(scenarios), "logs: scenario names distinct")
    lines, seen = [], set()
    for sc in scenarios:
        name, process = sc["name"], sc["process"]
        tag = f"log {name}"
        trusted = {}
        for h in sc["trusted_public_keys"]:
            k = unhex(h, f"{tag} trusted key", 32)
            trusted[key_id(k)] = k
        check(pk in trusted.values(), f"{tag}: the vector key is trusted")
        required = sc["required_key_ids"]
        check(all(r in trusted for r in required), f"{tag}: every required key id is a trusted key's")
        lv = LogVerifier(process, trusted, required)
        got_all = []
        for m in sc["messages"]:
            seq = m["seq"]
            check(_is_uint(seq) and seq > 0, f"{tag}: seq {seq} is a stream sequence")
            vd = lv.feed(seq, unhex(m["record_hex"], f"{tag} seq {seq} record_hex"))
            want = m["expected"]
            got = {k: x for k, x in vd.items() if k != "why"}
            if got != want:
                raise CheckFailed(f"{tag}: message at stream sequence {seq}: this checker (from "
                                  f"chain.md) says {got} ({vd.get('why', '')}), the vectors {want}")
            CHECKS.append(f"{tag}: seq {seq}: {got}")
            if VERBOSE:
                print(f"  {tag} seq {seq}: {got} {vd.get('why', '')}")
            got_all.append(got)
            if got["verdict"] == "foreign":
                seen.add(got["fault"])
                check(got["fault"] in FAULT_CODES, f"{tag}: {got['fault']} is a fault of chain.md")
            else:
                seen.update(got["lost"])
                check(all(c in LOSS_CODES for c in got["lost"]), f"{tag}: loss codes of chain.md")
        end = sc["end"]
        check_eq(lv.next_slot, end["next_slot"], f"{tag}: the chain ends before slot {end['next_slot']}")
        check_eq(lv.prev.hex(), end["chain_head"], f"{tag}: the chain head")
        check_eq(lv.last_seq, end["last_seq"], f"{tag}: the next write expects the subject's last message")
        check_eq(lv.keys, end["keys"], f"{tag}: the key set the chain's last run declares")
        # The chain itself: consecutive slots from 0 (less reported gaps), timestamps
        # never decrease (chain.md: a verifier may check it too).
        ts = [e["timestamp_ms"] for _, r in lv.chain_runs for e in r["entries"]]
        check(ts == sorted(ts), f"{tag}: timestamp_ms never decreases along the chain")
        summary = ", ".join(
            (f"{g['verdict']}" + (f" ({'+'.join(g['lost'])})" if g["lost"] else ""))
            if g["verdict"] == "chain" else f"foreign {g['fault']}" for g in got_all)
        lines.append(f"{name}: {len(got_all)} messages: {summary}; head: slot "
                     f"{lv.next_slot - 1}, seq {lv.last_seq} - as expected")
    check_eq(sorted(seen), sorted(FAULT_CODES + LOSS_CODES), "logs: the scenarios cover every fault code")
    return lines


def check_vector_receipt(v, decoded, trusted, kid, pk, sig, assigns_of, chains):
    """Decode receipt.msgpack_hex, verify it alone, compare it field by field with the
    receipt built from the decoded proc-A run and with the vectors, re-encode it."""
    rv_all = v["runs"]
    tag = "receipt vector"
    raw = unhex(v["receipt"]["msgpack_hex"], f"{tag} msgpack_hex")
    rec = decode(raw)
    check(isinstance(rec, dict), f"{tag}: a MessagePack map")
    check_eq(list(rec.keys()), RECEIPT_FIELDS, f"{tag}: Receipt fields in records.md order")
    try:
        r = parse_receipt(rec)
    except RecordError as e:
        raise CheckFailed(f"{tag}: refused by the records.md rules: {e}")
    check_eq(list(rec["seal"].keys()), SEAL_FIELDS, f"{tag}: Seal fields in records.md order")
    for i, c in enumerate(rec["seal"]["commitments"]):
        check_eq(list(c.keys()), COMMITMENT_FIELDS, f"{tag}: commitment {i} fields in records.md order")
    # chain.md "Vectors": one Receipt (proc-A, slot 1); durable, not a duplicate.
    process = v["process"]
    check_eq(r["process"], process, f"{tag}: process is {process} (chain.md 'Vectors')")
    check_eq(r["slot"], 1, f"{tag}: slot 1 (chain.md 'Vectors')")
    check_eq(r["durable"], True, f"{tag}: durable = true")
    check_eq(r["duplicate"], False, f"{tag}: duplicate = false")

    # records.md "A receipt verifies alone" (before any comparison with the runs).
    verify_receipt(rec, trusted, [kid])
    verify_receipt(rec, trusted, [])
    CHECKS.append(f"{tag}: verifies alone (chain hash, run root from merkle_path, digest, seal)")

    # The receipt this checker builds from the decoded run holding proc-A slot 1.
    ri, (rrec, run) = next((j, d) for j, d in enumerate(decoded)
                           if d[1]["process"] == process
                           and d[1]["first_slot"] <= r["slot"] < d[1]["first_slot"] + len(d[1]["entries"]))
    built = build_receipt(run, r["slot"] - run["first_slot"])
    for f in RECEIPT_FIELDS:
        if f == "seal":
            continue
        check_eq(r[f], built[f], f"{tag}: {f} = built from the decoded {process} run")
    for f in SEAL_FIELDS:
        if f == "commitments":
            continue
        check_eq(r["seal"][f], built["seal"][f], f"{tag}: seal.{f} = the run's seal")
    check_eq(len(r["seal"]["commitments"]), len(built["seal"]["commitments"]),
             f"{tag}: seal commitment count = the run's")
    for i, (c, bc) in enumerate(zip(r["seal"]["commitments"], built["seal"]["commitments"])):
        for f in COMMITMENT_FIELDS:
            check_eq(c[f], bc[f], f"{tag}: seal.commitments[{i}].{f} = the run's")

    # ... and directly with the vectors (independently of the Run record).
    rv = rv_all[ri]
    a = assigns_of[process][r["slot"]]
    check_eq(r["message_id"], a["message_id"], f"{tag}: message_id = vector")
    check_eq(r["timestamp_ms"], a["timestamp_ms"], f"{tag}: timestamp_ms = vector")
    check_eq([list(h) for h in r["headers"]], [list(h) for h in a["headers"]], f"{tag}: headers = vector")
    check(headers_sorted(r["headers"]), f"{tag}: headers sorted (as in Entry)")
    check_eq(r["body_hash"].hex(), a["body_hash"], f"{tag}: body_hash = vector")
    check_eq(r["body_hash"], H(bytes.fromhex(a["body_hex"])), f"{tag}: body_hash = BLAKE3(body)")
    check_eq(r["prev_hash"].hex(), a["prev_hash"], f"{tag}: prev_hash = vector")
    check_eq(r["prev_hash"], chains[process][r["slot"] - 1] if r["slot"] else genesis(process),
             f"{tag}: prev_hash = recomputed previous chain hash")
    check_eq(r["chain_hash"].hex(), a["chain_hash"], f"{tag}: chain_hash = vector")
    check_eq(r["run_prev_seq"], rv["prev_seq"], f"{tag}: run_prev_seq = vector run prev_seq")
    check_eq(r["run_first_slot"], rv["first_slot"], f"{tag}: run_first_slot = vector run")
    check_eq(r["run_count"], rv["count"], f"{tag}: run_count = vector run")
    check_eq([p.hex() for p in r["merkle_path"]], rv["merkle_paths"][r["slot"] - rv["first_slot"]],
             f"{tag}: merkle_path = vector audit path")
    check_eq(r["seal"]["batch_size"], v["batch"]["size"], f"{tag}: seal.batch_size = vector batch")
    check_eq(r["seal"]["batch_index"], rv["batch_index"], f"{tag}: seal.batch_index = vector run")
    check_eq([p.hex() for p in r["seal"]["batch_path"]], rv["batch_path"],
             f"{tag}: seal.batch_path = vector run")
    check_eq(r["seal"]["commitments"], [{"key_id": kid, "public_key": pk, "signature": sig}],
             f"{tag}: one commitment = (key_id, public_key, batch signature)")
    check_eq(key_id(r["seal"]["commitments"][0]["public_key"]), r["seal"]["commitments"][0]["key_id"],
             f"{tag}: key_id is the id of public_key")

    # Byte-identical re-encoding (records.md: fields in table order, smallest ints,
    # str as str, bin as bin, bool as bool) - of the built receipt and of the decoded map.
    check_eq(encode(built).hex(), raw.hex(), f"{tag}: built receipt encodes byte-identically")
    check_eq(encode(rec).hex(), raw.hex(), f"{tag}: decoded receipt re-encodes byte-identically")
    check_eq(raw[raw.index(b"\xactimestamp_ms") + 13], 0xCF,
             f"{tag}: timestamp_ms {r['timestamp_ms']} as uint 64 (smallest that holds it)")

    # Readers ignore unknown fields and refuse a missing one or v != 2.
    extra = dict(rec); extra["future_field"] = {"x": 1}
    extra["seal"] = dict(rec["seal"]); extra["seal"]["later"] = True
    check_eq(parse_receipt(decode(encode(extra)))["chain_hash"], r["chain_hash"],
             f"{tag}: unknown fields ignored")
    verify_receipt(decode(encode(extra)), trusted, [kid])
    CHECKS.append(f"{tag}: with unknown fields still verifies")
    for fld in RECEIPT_FIELDS:
        try:
            parse_receipt({k: x for k, x in rec.items() if k != fld}); refused = False
        except RecordError:
            refused = True
        check(refused, f"{tag}: refused without field {fld!r}")
    for fld in SEAL_FIELDS:
        t = dict(rec); t["seal"] = {k: x for k, x in rec["seal"].items() if k != fld}
        try:
            parse_receipt(t); refused = False
        except RecordError:
            refused = True
        check(refused, f"{tag}: refused without seal field {fld!r}")

    # durable / duplicate are reply flags: the verification of records.md never reads
    # them, so they are not covered by the seal.
    for f in ("durable", "duplicate"):
        t = copy.deepcopy(rec); t[f] = not t[f]
        verify_receipt(t, trusted, [kid])
        CHECKS.append(f"{tag}: {f} flipped still verifies (not covered by the seal)")
    return raw, rec


def negative_receipt_vector(raw: bytes, rc: dict, trusted, kid) -> None:
    """Alterations of the decoded receipt vector: each must fail, naming its slot."""
    def expect_fail(r, what, slot="own", trusted_=trusted, required=(kid,)):
        want = r.get("slot") if slot == "own" else slot
        try:
            verify_receipt(r, trusted_, list(required))
        except VerifyError as err:
            if err.slot != want:
                raise CheckFailed(f"NEG receipt vector {what}: failed at slot {err.slot}, "
                                  f"expected {want} ({err})")
            CHECKS.append(f"NEG receipt vector {what} -> rejected ({err})")
            if VERBOSE:
                print(f"  rejected as expected: receipt vector {what}: {err}")
            return
        raise CheckFailed(f"NEG receipt vector {what}: verification unexpectedly succeeded")

    def flip(b: bytes, i: int = 0, bit: int = 1) -> bytes:
        x = bytearray(b); x[i] ^= bit
        return bytes(x)

    def alt(**kw):
        t = copy.deepcopy(rc); t.update(kw)
        return t

    def rechain(t):
        t["chain_hash"] = chain_hash(t["prev_hash"], canonical_bh(
            t["process"], t["slot"], t["message_id"], t["timestamp_ms"], t["headers"], t["body_hash"]))
        return t

    if VERBOSE:
        print("negative checks on the receipt vector:")
    slot = rc["slot"]
    # slot
    expect_fail(alt(slot=slot + 1), "slot altered")
    expect_fail(alt(slot=0), "slot altered to 0 (prev_hash is not genesis)")
    expect_fail(rechain(alt(slot=slot + 1)), "slot altered, chain_hash recomputed (Merkle index moves)")
    expect_fail(rechain(alt(slot=slot + 1, run_first_slot=rc["run_first_slot"] + 1)),
                "slot and run_first_slot shifted, chain_hash recomputed (run statement changes)")
    # merkle_path
    for i in range(len(rc["merkle_path"])):
        t = copy.deepcopy(rc); t["merkle_path"][i] = flip(t["merkle_path"][i], 31, 0x80)
        expect_fail(t, f"merkle_path[{i}] altered")
        t = copy.deepcopy(rc); del t["merkle_path"][i]
        expect_fail(t, f"merkle_path[{i}] dropped")
    if len(rc["merkle_path"]) > 1:
        expect_fail(alt(merkle_path=rc["merkle_path"][::-1]), "merkle_path reversed")
    expect_fail(alt(merkle_path=rc["merkle_path"] + [rc["merkle_path"][0]]), "merkle_path extra element")
    expect_fail(alt(merkle_path=[]), "merkle_path emptied")
    # run position
    expect_fail(alt(run_count=rc["run_count"] + 1), "run_count + 1")
    expect_fail(alt(run_count=rc["run_count"] - 1), "run_count - 1")
    expect_fail(alt(run_first_slot=rc["run_first_slot"] + 1), "run_first_slot moved past the slot")
    # assignment fields
    expect_fail(alt(message_id=rc["message_id"] + "x"), "message_id altered")
    expect_fail(alt(timestamp_ms=rc["timestamp_ms"] + 1), "timestamp_ms altered")
    expect_fail(alt(headers=rc["headers"] + [["x", "y"]]), "header added")
    expect_fail(alt(body_hash=flip(rc["body_hash"])), "body_hash altered")
    expect_fail(alt(prev_hash=flip(rc["prev_hash"])), "prev_hash altered")
    expect_fail(rechain(alt(prev_hash=flip(rc["prev_hash"]))), "prev_hash altered, chain_hash recomputed")
    expect_fail(alt(chain_hash=flip(rc["chain_hash"])), "chain_hash altered")
    expect_fail(rechain(alt(process="proc-Z")), "process relabelled, chain_hash recomputed")
    # seal
    sl = rc["seal"]
    t = copy.deepcopy(rc); t["seal"]["batch_index"] = (sl["batch_index"] + 1) % sl["batch_size"]
    expect_fail(t, "seal.batch_index moved")
    t = copy.deepcopy(rc); t["seal"]["batch_size"] += 1
    expect_fail(t, "seal.batch_size changed")
    for i in range(len(sl["batch_path"])):
        t = copy.deepcopy(rc); t["seal"]["batch_path"][i] = flip(sl["batch_path"][i], 5)
        expect_fail(t, f"seal.batch_path[{i}] altered")
    t = copy.deepcopy(rc); t["seal"]["batch_path"] = []
    expect_fail(t, "seal.batch_path emptied")
    t = copy.deepcopy(rc); t["seal"]["commitments"] = []
    expect_fail(t, "seal without commitment")
    t = copy.deepcopy(rc)
    t["seal"]["commitments"][0]["signature"] = flip(sl["commitments"][0]["signature"], 63)
    expect_fail(t, "commitment signature altered")
    t = copy.deepcopy(rc)
    t["seal"]["commitments"][0]["public_key"] = flip(sl["commitments"][0]["public_key"], 0)
    expect_fail(t, "commitment public_key altered (key_id no longer its id)")
    other = nacl.signing.SigningKey(b"\x07" * 32)
    opk = bytes(other.verify_key)
    t = copy.deepcopy(rc)
    t["seal"]["commitments"][0] = {"key_id": key_id(opk), "public_key": opk,
                                   "signature": other.sign(b"x").signature}
    expect_fail(t, "commitment by an untrusted key")
    expect_fail(rc, "trusted key set empty", trusted_={})
    expect_fail(rc, "required key absent", required=("ffffffffffffffff",))
    # record rules
    expect_fail(alt(v=1), "v = 1 (record version 1)")
    expect_fail(alt(v=4), "v = 4 (a later version)")
    expect_fail(alt(v=2), "v = 2 (read as a version 2 receipt: run_keys ignored, statement differs)")
    expect_fail(alt(run_keys=[]), "run_keys emptied")
    expect_fail(alt(run_keys=sorted(rc["run_keys"] + ["ffffffffffffffff"])), "run_keys with a key added")
    t = copy.deepcopy(rc); del t["run_keys"]
    expect_fail(t, "run_keys missing")
    t = copy.deepcopy(rc); del t["seal"]
    expect_fail(t, "seal missing")
    # in the MessagePack bytes themselves
    sig = sl["commitments"][0]["signature"]
    pos = raw.index(b"\xc4\x40" + sig) + 2
    for off in (0, 31, 63):
        t = decode(raw[:pos + off] + bytes([raw[pos + off] ^ 0x10]) + raw[pos + off + 1:])
        expect_fail(t, f"signature byte {off} flipped in msgpack_hex")
    mp = rc["merkle_path"][-1]
    pos = raw.index(b"\xc4\x20" + mp) + 2
    t = decode(raw[:pos] + bytes([raw[pos] ^ 0x01]) + raw[pos + 1:])
    expect_fail(t, "merkle_path byte flipped in msgpack_hex")


def negative_checks(v, decoded, receipts, trusted, kid, procs) -> None:
    runs_v = v["runs"]

    def expect_fail(fn, what, slot="any"):
        try:
            fn()
        except VerifyError as err:
            if slot != "any" and err.slot != slot:
                raise CheckFailed(f"NEG {what}: failed at slot {err.slot}, expected {slot} ({err})")
            CHECKS.append(f"NEG {what} -> rejected ({err})")
            if VERBOSE:
                print(f"  rejected as expected: {what}: {err}")
            return
        raise CheckFailed(f"NEG {what}: verification unexpectedly succeeded")

    if VERBOSE:
        print("negative checks:")
    # Work on proc-A's run (the multi-entry one).
    ri = next(i for i, (_, r) in enumerate(decoded) if len(r["entries"]) > 1)
    rec, run = decoded[ri]
    process = run["process"]
    last = len(run["entries"]) - 1 + run["first_slot"]

    seq = run["prev_seq"] + 1          # the run in its place, first on its subject

    def foreign(r, code, what, trusted_=trusted, required=(kid,)):
        """The altered run `r` (a map or the bytes), in its place, must be foreign
        with fault `code` (chain.md "Verifying a log")."""
        data = r if isinstance(r, bytes) else encode(r)
        vd = LogVerifier(process, trusted_, list(required)).feed(seq, data)
        if vd["verdict"] != "foreign":
            raise CheckFailed(f"NEG {what}: the run still continues the chain ({vd})")
        if vd["fault"] != code:
            raise CheckFailed(f"NEG {what}: foreign with {vd['fault']} ({vd['why']}), expected {code}")
        CHECKS.append(f"NEG {what} -> foreign: {code} ({vd['why']})")
        if VERBOSE:
            print(f"  foreign as expected: {what}: {code}: {vd['why']}")

    # 1. flip one byte of a body inside the MessagePack bytes
    raw = bytes.fromhex(runs_v[ri]["record_msgpack_hex"])
    body0 = run["entries"][0]["body"]
    marker = b"\xc4" + bytes([len(body0)]) + body0
    pos = raw.index(marker) + 2
    foreign(raw[:pos] + bytes([raw[pos] ^ 0x01]) + raw[pos + 1:], "bad_chain_hash",
            "one body byte flipped in the record bytes")

    # 2. body altered and the chain recomputed: the seal no longer covers it
    t = copy.deepcopy(rec)
    t["entries"][1]["body"] = b"x"
    p = t["entries"][0]["chain_hash"]
    for e in t["entries"][1:]:
        e["prev_hash"] = p
        e["chain_hash"] = p = chain_hash(p, canonical(process, e["slot"], e["message_id"],
                                                      e["timestamp_ms"], e["headers"], e["body"]))
    foreign(t, "bad_signature", "body altered and chain recomputed (seal no longer covers it)")

    # 3. header altered
    t = copy.deepcopy(rec)
    t["entries"][-1]["headers"] = [["k", "w"]]
    foreign(t, "bad_chain_hash", "header value altered")

    # 4. seal: moved batch_index, altered batch_path element, tampered signature, ...
    t = copy.deepcopy(rec); t["seal"]["batch_index"] = (t["seal"]["batch_index"] + 1) % t["seal"]["batch_size"]
    foreign(t, "bad_signature", "batch_index moved")
    t = copy.deepcopy(rec); t["seal"]["batch_index"] = t["seal"]["batch_size"]
    foreign(t, "bad_signature", "batch_index = batch_size")
    t = copy.deepcopy(rec)
    b = bytearray(t["seal"]["batch_path"][0]); b[31] ^= 0x01; t["seal"]["batch_path"][0] = bytes(b)
    foreign(t, "bad_signature", "batch_path element altered")
    t = copy.deepcopy(rec); t["seal"]["batch_path"].append(t["seal"]["batch_path"][0])
    foreign(t, "bad_signature", "batch_path with an extra element")
    t = copy.deepcopy(rec); t["seal"]["batch_path"] = []
    foreign(t, "bad_signature", "batch_path emptied")
    t = copy.deepcopy(rec); t["seal"]["batch_size"] += 1
    foreign(t, "bad_signature", "batch_size changed")
    t = copy.deepcopy(rec)
    sg = bytearray(t["seal"]["commitments"][0]["signature"]); sg[0] ^= 1
    t["seal"]["commitments"][0]["signature"] = bytes(sg)
    foreign(t, "bad_signature", "signature byte flipped")
    other = next(r for j, (r, _) in enumerate(decoded) if j != ri)
    t = copy.deepcopy(rec); t["seal"] = copy.deepcopy(other["seal"])
    foreign(t, "bad_signature", "seal of another run in the batch")
    t = copy.deepcopy(rec); t["prev_seq"] += 1
    foreign(t, "bad_signature", "prev_seq altered (the statement signs it)")
    t = copy.deepcopy(rec); t["seal"]["commitments"] = []
    foreign(t, "unsigned", "seal without commitment")
    t = copy.deepcopy(rec); t["seal"]["commitments"][0]["key_id"] = "0000000000000000"
    foreign(t, "untrusted_key", "key_id not the id of public_key")
    foreign(rec, "untrusted_key", "key not trusted", trusted_={})
    foreign(rec, "missing_key", "required key missing", required=(kid, "ffffffffffffffff"))
    # the declared key set is signed, and every key of it must seal the run
    t = copy.deepcopy(rec); t["keys"] = sorted(t["keys"] + ["ffffffffffffffff"])
    foreign(t, "bad_signature", "a key added to the declared set (the statement signs it)")
    t = copy.deepcopy(rec); t["keys"] = []
    foreign(t, "bad_signature", "the declared set emptied")
    if rec["keys"]:
        other_kid = "0" * 16 if rec["keys"][0] != "0" * 16 else "1" * 16
        t = copy.deepcopy(rec); t["keys"] = sorted(rec["keys"] + [other_kid])
        digest = H(run_statement(process, t["prev_seq"], t["first_slot"], len(t["entries"]),
                                 mth([e["chain_hash"] for e in t["entries"]]), t["keys"]))
        t["seal"] = {"batch_size": 1, "batch_index": 0, "batch_path": [],
                     "commitments": [{"key_id": kid, "public_key": trusted[kid],
                                      "signature": nacl.signing.SigningKey(bytes.fromhex(v["key"]["secret_seed"])).sign(batch_statement(1, leaf(digest))).signature}]}
        foreign(t, "missing_key", "a key it declares did not seal it (re-sealed by the vector key)")
        t2 = copy.deepcopy(t); t2["keys"] = list(reversed(t["keys"]))
        foreign(t2, "undecodable", "declared keys not sorted")
        t2 = copy.deepcopy(t); t2["keys"] = [t["keys"][0]] * 2
        foreign(t2, "undecodable", "declared keys repeated")

    # 5. record / log structure
    t = copy.deepcopy(rec); t["v"] = 1
    foreign(t, "undecodable", "record v = 1 (not a version read)")
    t = copy.deepcopy(rec); t["v"] = 4
    foreign(t, "undecodable", "record v = 4 (a later version)")
    t = copy.deepcopy(rec); t["v"] = 2
    foreign(t, "bad_signature", "record relabelled v = 2 (keys ignored, the v2 statement is not what was signed)")
    t = copy.deepcopy(rec); del t["keys"]
    foreign(t, "undecodable", "version 3 record without keys")
    t = copy.deepcopy(rec); del t["seal"]
    foreign(t, "undecodable", "record without seal")
    t = copy.deepcopy(rec); del t["prev_seq"]
    foreign(t, "undecodable", "record without prev_seq (a version 1 layout)")
    foreign(encode([rec[f] for f in RUN_FIELDS]), "undecodable", "record as an array, not a map")
    foreign(raw + b"\x00", "undecodable", "record followed by a stray byte")
    foreign(raw[:-1], "undecodable", "record truncated")
    res = verify_log([(seq, raw)], process, trusted, [kid], 0, last + 1)
    check_eq(res["faults"], [(None, "gap")], "NEG log does not reach requested `to`: ends with a gap fault")
    t = copy.deepcopy(rec); t["first_slot"] += 1
    foreign(t, "broken_link", "first_slot moved (entries not consecutive from it)")
    t = copy.deepcopy(rec)
    t["entries"][0], t["entries"][1] = t["entries"][1], t["entries"][0]
    foreign(t, "broken_link", "entries out of order")
    t = copy.deepcopy(rec); t["entries"] = []
    foreign(t, "undecodable", "empty run (records.md: entries never empty)")
    t = copy.deepcopy(rec); t["process"] = "proc-Z"
    foreign(t, "wrong_process", "run of another process")
    t = copy.deepcopy(rec); t["entries"][0]["prev_hash"] = b"\x00" * 32
    foreign(t, "broken_link", "slot 0 prev_hash is not genesis")
    t = copy.deepcopy(rec); t["entries"][1]["prev_hash"] = b"\x00" * 32
    foreign(t, "broken_link", "slot 1 prev_hash does not link to slot 0")
    t = copy.deepcopy(rec); t["entries"].pop()
    foreign(t, "bad_signature", "last entry dropped (run digest changes)")
    # the genuine run out of its place, and a foreign message before it
    lv = LogVerifier(process, trusted, [kid])
    check_eq(lv.feed(seq + 1, b"")["fault"], "undecodable", "NEG an empty message is undecodable")
    check_eq(lv.feed(seq + 2, raw)["fault"], "replayed",
             "NEG the genuine run after a message later than its prev_seq: replayed")

    # 6. receipts
    rc = next(r for r in receipts if r["process"] == process and r["slot"] == last)

    def rcpt(r):
        return lambda: verify_receipt(r, trusted, [kid])

    t = copy.deepcopy(rc); b = bytearray(t["body_hash"]); b[0] ^= 1; t["body_hash"] = bytes(b)
    expect_fail(rcpt(t), "receipt body_hash flipped", slot=last)
    t = copy.deepcopy(rc); t["seal"]["batch_index"] = (t["seal"]["batch_index"] + 1) % t["seal"]["batch_size"]
    expect_fail(rcpt(t), "receipt batch_index moved", slot=last)
    t = copy.deepcopy(rc)
    b = bytearray(t["seal"]["batch_path"][0]); b[0] ^= 1; t["seal"]["batch_path"][0] = bytes(b)
    expect_fail(rcpt(t), "receipt batch_path element altered", slot=last)
    t = copy.deepcopy(rc)
    sg = bytearray(t["seal"]["commitments"][0]["signature"]); sg[63] ^= 1
    t["seal"]["commitments"][0]["signature"] = bytes(sg)
    expect_fail(rcpt(t), "receipt signature tampered", slot=last)
    t = copy.deepcopy(rc); t["merkle_path"][0] = bytes(32)
    expect_fail(rcpt(t), "receipt merkle_path altered", slot=last)
    t = copy.deepcopy(rc); t["run_count"] += 1
    expect_fail(rcpt(t), "receipt run_count changed", slot=last)
    t = copy.deepcopy(rc); t["run_first_slot"] += 1
    expect_fail(rcpt(t), "receipt run_first_slot moved", slot=last)
    t = copy.deepcopy(rc); t["timestamp_ms"] += 1
    expect_fail(rcpt(t), "receipt timestamp altered", slot=last)
    t = copy.deepcopy(rc); del t["merkle_path"]
    expect_fail(rcpt(t), "receipt without merkle_path")
    rc0 = next(r for r in receipts if r["slot"] == 0 and r["process"] == process)
    t = copy.deepcopy(rc0); t["prev_hash"] = bytes(32)
    t["chain_hash"] = chain_hash(t["prev_hash"], canonical_bh(
        t["process"], 0, t["message_id"], t["timestamp_ms"], t["headers"], t["body_hash"]))
    expect_fail(rcpt(t), "receipt at slot 0 with a non-genesis prev_hash", slot=0)
    # a receipt of one process must not pass for another
    rb = next(r for r in receipts if r["process"] != process)
    t = copy.deepcopy(rb); t["process"] = process
    expect_fail(rcpt(t), "receipt relabelled to another process", slot=t["slot"])


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
        info = run_checks(vectors)
    except CheckFailed as e:
        print(f"FAIL: {e}", file=sys.stderr)
        print(f"({len(CHECKS)} checks passed before the failure)", file=sys.stderr)
        return 1
    except VerifyError as e:
        print(f"FAIL: verification of the vector records failed at {e}", file=sys.stderr)
        return 1
    except RecordError as e:
        print(f"FAIL: record refused: {e}", file=sys.stderr)
        return 1
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, StopIteration) as e:
        print(f"FAIL: vectors file malformed or unexpected shape: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    neg = sum(1 for c in CHECKS if c.startswith("NEG"))
    procs = ", ".join(f"{p['process']} ({len(p['assignments'])})" for p in info["procs"])
    print(f"OK: {path}")
    print(f"  key: public_key and key_id from secret_seed")
    print(f"  processes (assignments): {procs}: genesis, body hash, canonical, prev/chain hash")
    print(f"  {info['runs']} runs: Merkle root, audit paths recomputed and verified, statement, digest")
    print(f"  batch of {info['batch']}: root, per-run index and path verified, statement,")
    print(f"      ed25519 signature recomputed from seed and verified with public key")
    print(f"  Run records: decoded, all fields incl. seal match, re-encode byte-identically,")
    print(f"      continue the chain in their place (chain.md 'Verifying a log')")
    print(f"  {info['receipts']} receipts built from the decoded runs verify alone")
    print(f"  receipt vector: decoded, verifies alone, equals the receipt built from the run")
    print(f"      field by field and the vectors, re-encodes byte-identically")
    print(f"  {neg} negative checks rejected as expected")
    print(f"  {len(info['logs'])} log scenarios (chain.md 'Verifying a log: chain and foreign messages'):")
    for line in info["logs"]:
        print(f"    {line}")
    print(f"  {len(CHECKS)} checks in total, all passed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
