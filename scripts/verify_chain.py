#!/usr/bin/env python3
"""Recompute the hash chain of an alarm-ledger export, independently of the server.

Usage: verify_chain.py [--prev-hash HEX] EXPORT.ndjson      (or - for standard input)
       verify_chain.py --security-log LEDGER_ID SECURITY_LOG.ndjson

The second form checks the security log (`GET /api/v1/security-log`, admin) instead: entries
`seq` 1, 2, 3, ... chained the same way, the first one from SHA-256 of
"security:" + the ledger id (lowercase hyphenated). It prints `ok <count> entries, head <seq>
<hash>`.

An export (`GET /api/v1/events`, `alarm-ledger export`) has one event per line, each with its
`ledger_id` and `hash`. For every line this script recomputes

    hash = SHA-256( previous hash as 32 raw bytes || canonical JSON of the line without `hash` )

where canonical JSON is `json.dumps(obj, sort_keys=True, separators=(",", ":"),
ensure_ascii=False)` encoded as UTF-8 (schemas/README.md gives the full recipe), and the
predecessor of offset 1 is SHA-256 of the ledger id's lowercase hyphenated text.

Checks: every line is a JSON object with an integer `offset`, a `ledger_id` and a `hash`; all
lines share one `ledger_id`; offsets are contiguous from the first line's; every hash matches.
An export that starts after offset 1 is verified from `--prev-hash` (the hash of the event just
before its first line) when given; otherwise its first line's stored hash is taken on trust and
only the links after it are checked (a note on standard error says so).

Prints `ok <count> events, head <offset> <hash>` and exits 0, or `FAIL offset <n>: <what>` and
exits 1 (offset 0 when the failing line's offset is unknown); exits 2 on a usage error. Reads
line by line: memory use does not grow with the export. Python 3 standard library only.
"""

import argparse
import hashlib
import json
import re
import sys
import uuid

HEX64 = re.compile(r"[0-9a-f]{64}")


class Fail(Exception):
    def __init__(self, offset, what):
        super().__init__(what)
        self.offset = offset
        self.what = what


def _no_duplicates(pairs):
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError("duplicate key %r" % key)
        obj[key] = value
    return obj


def _no_float(text):
    raise ValueError("non-integer number %s (events hold no floats)" % text)


def _no_constant(text):
    raise ValueError("invalid JSON constant %s" % text)


def parse_line(raw):
    return json.loads(
        raw,
        object_pairs_hook=_no_duplicates,
        parse_float=_no_float,
        parse_constant=_no_constant,
    )


def canonical(obj):
    """The exact bytes the server hashes (serde_json's escaping = json.dumps(ensure_ascii=False))."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def genesis(ledger_id):
    return hashlib.sha256(ledger_id.encode("ascii")).digest()


def is_int(v):
    return type(v) is int  # bool is a subclass of int: not an offset


def verify(stream, prev_hash_hex=None):
    """Returns (count, head_offset, head_hash_hex, note) or raises Fail."""
    ledger_id = None
    expected = None  # offset the next line must have
    prev = None  # 32 raw bytes: the predecessor of the next line
    count = 0
    head_hash = None
    note = None
    for lineno, raw in enumerate(stream, start=1):
        at = expected if expected is not None else 0
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise Fail(at, "line %d is not UTF-8: %s" % (lineno, e))
        text = text.rstrip("\r\n")
        if not text.strip():
            continue  # a blank line (e.g. at the end of the file) carries nothing
        try:
            event = parse_line(text)
        except ValueError as e:
            raise Fail(at, "line %d is not valid JSON: %s" % (lineno, e))
        if not isinstance(event, dict):
            raise Fail(at, "line %d is not a JSON object" % lineno)

        offset = event.get("offset")
        if not is_int(offset) or offset < 1:
            raise Fail(at, "line %d has no valid `offset` (a positive integer)" % lineno)
        if expected is not None and offset != expected:
            raise Fail(expected, "line %d has offset %d: offsets must be contiguous" % (lineno, offset))

        lid = event.get("ledger_id")
        if not isinstance(lid, str):
            raise Fail(offset, "no `ledger_id` (an export line must carry it)")
        if ledger_id is None:
            try:
                canonical_id = str(uuid.UUID(lid))
            except ValueError:
                raise Fail(offset, "`ledger_id` %r is not a UUID" % lid)
            if canonical_id != lid:
                raise Fail(offset, "`ledger_id` %r is not lowercase hyphenated" % lid)
            ledger_id = lid
        elif lid != ledger_id:
            raise Fail(offset, "`ledger_id` %s differs from the first line's %s" % (lid, ledger_id))

        stored = event.pop("hash", None)
        if not isinstance(stored, str) or not HEX64.fullmatch(stored):
            raise Fail(offset, "no valid `hash` (64 lowercase hex digits)")
        # The wire `type` is never part of the hashed form.
        event.pop("type", None)

        if prev is None:
            if offset == 1:
                prev = genesis(ledger_id)
                if prev_hash_hex is not None and bytes.fromhex(prev_hash_hex) != prev:
                    raise Fail(1, "--prev-hash is not the genesis hash of ledger %s" % ledger_id)
            elif prev_hash_hex is not None:
                prev = bytes.fromhex(prev_hash_hex)
            else:
                note = (
                    "note: the export starts at offset %d and no --prev-hash was given: "
                    "the hash of offset %d is taken as stored, links are checked from there on"
                    % (offset, offset)
                )
                prev = bytes.fromhex(stored)

        if note is None or count > 0:
            try:
                body = canonical(event)
            except (ValueError, UnicodeEncodeError) as e:
                raise Fail(offset, "cannot form the canonical JSON: %s" % e)
            computed = hashlib.sha256(prev + body).hexdigest()
            if computed != stored:
                raise Fail(offset, "hash mismatch: stored %s, computed %s" % (stored, computed))
        prev = bytes.fromhex(stored)
        head_hash = stored
        expected = offset + 1
        count += 1
    if count == 0:
        raise Fail(0, "no events in the export: nothing to verify")
    return count, expected - 1, head_hash, note


def verify_security_log(stream, ledger_id):
    """Returns (count, head_seq, head_hash_hex) or raises Fail (its `offset` is the seq)."""
    prev = hashlib.sha256(("security:" + ledger_id).encode("ascii")).digest()
    expected = 1
    head_hash = None
    for lineno, raw in enumerate(stream, start=1):
        text = raw.decode("utf-8", errors="strict").rstrip("\r\n")
        if not text.strip():
            continue
        try:
            entry = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
        except ValueError as e:
            raise Fail(expected, "line %d is not valid JSON: %s" % (lineno, e))
        if not isinstance(entry, dict):
            raise Fail(expected, "line %d is not a JSON object" % lineno)
        seq = entry.get("seq")
        if not is_int(seq) or seq != expected:
            raise Fail(expected, "line %d has seq %r: entries must be contiguous from 1" % (lineno, seq))
        stored = entry.pop("hash", None)
        if not isinstance(stored, str) or not HEX64.fullmatch(stored):
            raise Fail(seq, "no valid `hash` (64 lowercase hex digits)")
        computed = hashlib.sha256(prev + canonical(entry)).hexdigest()
        if computed != stored:
            raise Fail(seq, "hash mismatch: stored %s, computed %s" % (stored, computed))
        prev = bytes.fromhex(stored)
        head_hash = stored
        expected += 1
    if head_hash is None:
        raise Fail(0, "no entries: nothing to verify")
    return expected - 1, expected - 1, head_hash


def main(argv):
    parser = argparse.ArgumentParser(
        description="Recompute the hash chain of an alarm-ledger NDJSON export."
    )
    parser.add_argument("export", help="the export file, or - for standard input")
    parser.add_argument(
        "--prev-hash",
        metavar="HEX",
        help="hash of the event just before the export's first line (for a partial export)",
    )
    parser.add_argument(
        "--security-log",
        metavar="LEDGER_ID",
        help="the file is a security log (GET /api/v1/security-log) of this ledger",
    )
    args = parser.parse_args(argv)
    if args.security_log is not None:
        try:
            lid = str(uuid.UUID(args.security_log))
        except ValueError:
            parser.error("--security-log needs the ledger id (a UUID)")
        try:
            if args.export == "-":
                count, head, head_hash = verify_security_log(sys.stdin.buffer, lid)
            else:
                with open(args.export, "rb") as f:
                    count, head, head_hash = verify_security_log(f, lid)
        except OSError as e:
            print("cannot read %s: %s" % (args.export, e), file=sys.stderr)
            return 2
        except (Fail, UnicodeDecodeError) as e:
            seq, what = (e.offset, e.what) if isinstance(e, Fail) else (0, str(e))
            print("FAIL seq %d: %s" % (seq, what))
            return 1
        print("ok %d entries, head %d %s" % (count, head, head_hash))
        return 0
    prev = args.prev_hash
    if prev is not None:
        prev = prev.lower()
        if not HEX64.fullmatch(prev):
            parser.error("--prev-hash must be 64 hex digits")
    try:
        if args.export == "-":
            result = verify(sys.stdin.buffer, prev)
        else:
            with open(args.export, "rb") as f:
                result = verify(f, prev)
    except OSError as e:
        print("cannot read %s: %s" % (args.export, e), file=sys.stderr)
        return 2
    except Fail as e:
        print("FAIL offset %d: %s" % (e.offset, e.what))
        return 1
    count, head, head_hash, note = result
    if note:
        print(note, file=sys.stderr)
    print("ok %d events, head %d %s" % (count, head, head_hash))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
