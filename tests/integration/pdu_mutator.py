"""Deterministic mutations of DICOM upper-layer streams for the receiver fuzz test.

A stream is a list of PDUs (bytes). :func:`mutate` applies one to three of the
mutations below, chosen by a ``random.Random`` the caller seeds, and returns the
bytes to send plus the names of what was done (for a reproducible failure
message). The mutations aim at the parser's trust in the peer: bit flips, length
fields that lie (PDU, item and PDV lengths), truncation, PDU type swaps, items
and PDUs in another order, PDUs dropped or repeated, garbage inserted.
"""

from __future__ import annotations

import random
import struct

#: lengths a lying peer declares: empty, tiny, off by a little, huge (256 MiB and 4 GiB)
_LIES = (0, 1, 2, 3, 5, 0x7F, 0xFFFF, 0x10000, 64 << 10, 1 << 20, 16 << 20, 256 << 20, 0x7FFFFFFF, 0xFFFFFFFF)


def _items(body: bytes, start: int) -> list[bytes] | None:
    """The variable items of an A-ASSOCIATE-RQ/AC body (or a user information item) as raw slices."""
    out, pos = [], start
    while pos < len(body):
        if pos + 4 > len(body):
            return None
        length = struct.unpack_from(">H", body, pos + 2)[0]
        out.append(body[pos:pos + 4 + length])
        pos += 4 + length
    return out if pos == len(body) else None


def _bit_flips(pdus: list[bytearray], rng: random.Random) -> str:
    p = rng.randrange(len(pdus))
    for _ in range(rng.randint(1, 8)):
        pos = rng.randrange(len(pdus[p]))
        pdus[p][pos] ^= 1 << rng.randrange(8)
    return f"bitflip[{p}]"


def _pdu_length_lie(pdus: list[bytearray], rng: random.Random) -> str:
    p = rng.randrange(len(pdus))
    true = len(pdus[p]) - 6
    lie = rng.choice(_LIES + (true + 1, max(true - 1, 0), true + rng.randint(2, 4096)))
    pdus[p][2:6] = struct.pack(">I", lie & 0xFFFFFFFF)
    return f"pdu-length[{p}]={lie}"


def _item_length_lie(pdus: list[bytearray], rng: random.Random) -> str:
    """An item (A-ASSOCIATE-RQ) or PDV (P-DATA-TF) length field that does not match its content."""
    p = rng.randrange(len(pdus))
    pdu = pdus[p]
    if pdu[0] == 4 and len(pdu) >= 10:
        lie = rng.choice(_LIES + (len(pdu) - 10 + 2 + 1,))
        pdu[6:10] = struct.pack(">I", lie & 0xFFFFFFFF)
        return f"pdv-length[{p}]={lie}"
    if pdu[0] == 1 and len(pdu) > 78:
        items = _items(bytes(pdu[6:]), 68)
        if items:
            i = rng.randrange(len(items))
            off = 6 + 68 + sum(len(x) for x in items[:i])
            lie = rng.choice((0, 1, 3, 0xFFFF, rng.randrange(0x10000)))
            pdu[off + 2:off + 4] = struct.pack(">H", lie)
            return f"item-length[{p}.{i}]={lie}"
    return _pdu_length_lie(pdus, rng)


def _type_swap(pdus: list[bytearray], rng: random.Random) -> str:
    p = rng.randrange(len(pdus))
    new = rng.choice((0, 1, 2, 3, 4, 5, 6, 7, 8, 0x10, 0xFF))
    pdus[p][0] = new
    return f"type[{p}]={new}"


def _reorder_items(pdus: list[bytearray], rng: random.Random) -> str:
    """Shuffle the variable items of the A-ASSOCIATE-RQ (and the sub-items of its user information)."""
    for p, pdu in enumerate(pdus):
        if pdu[0] != 1 or len(pdu) < 74:
            continue
        items = _items(bytes(pdu[6:]), 68)
        if not items:
            break
        out = []
        for it in items:
            if it[0] == 0x50:
                subs = _items(it, 4)
                if subs:
                    rng.shuffle(subs)
                    it = it[:4] + b"".join(subs)
            out.append(it)
        rng.shuffle(out)
        pdus[p] = bytearray(pdu[:74] + b"".join(out))
        return f"reorder-items[{p}]"
    return _reorder_pdus(pdus, rng)


def _reorder_pdus(pdus: list[bytearray], rng: random.Random) -> str:
    if len(pdus) < 2:
        return _bit_flips(pdus, rng)
    a, b = rng.sample(range(len(pdus)), 2)
    pdus[a], pdus[b] = pdus[b], pdus[a]
    return f"swap-pdus[{a},{b}]"


def _drop_or_repeat(pdus: list[bytearray], rng: random.Random) -> str:
    p = rng.randrange(len(pdus))
    if rng.random() < 0.5 and len(pdus) > 1:
        del pdus[p]
        return f"drop[{p}]"
    pdus.insert(p, bytearray(pdus[p]))
    return f"repeat[{p}]"


def _garbage(pdus: list[bytearray], rng: random.Random) -> str:
    p = rng.randrange(len(pdus))
    pos = rng.randrange(len(pdus[p]) + 1)
    junk = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    pdus[p][pos:pos] = junk
    return f"garbage[{p}@{pos}+{len(junk)}]"


_MUTATIONS = (_bit_flips, _pdu_length_lie, _item_length_lie, _type_swap, _reorder_items, _reorder_pdus,
              _drop_or_repeat, _garbage)


def mutate(pdus: list[bytes], rng: random.Random) -> tuple[bytes, list[str]]:
    """Apply one to three mutations (and sometimes a truncation) to a stream of PDUs."""
    work = [bytearray(p) for p in pdus]
    done = [rng.choice(_MUTATIONS)(work, rng) for _ in range(rng.choice((1, 1, 1, 2, 3)))]
    data = b"".join(work)
    if rng.random() < 0.25:
        cut = rng.randrange(len(data) + 1)
        data = data[:cut]
        done.append(f"truncate@{cut}")
    return data, done
