"""The kernel token map (token -> backend mark), the services' scheduler maps (slot -> backend
mark), and the table's counters, over nfnetlink: one socket for every operation.

A batch of 1, 10 or 100 installs costs 20-30, 35 or 200 µs here, against libnftables' 170, 240
or 1,000 µs (it parses text and fetches its cache for each call). The message builders are pure
and tested byte for byte; `TokenMap` sends them, in the process and network namespace that uses it.
"""
from __future__ import annotations

import errno
import os
import socket
import struct
import sys
from array import array
from typing import Mapping, NamedTuple

from .nfnetlink import (
    ATTRIBUTE,
    NETLINK_CAP_ACK,
    NETLINK_NETFILTER,
    NFGEN_HEADER_SIZE,
    NLA_F_NESTED,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    SOL_NETLINK,
    attribute,
    attributes,
    message,
    messages,
    walk,
)
from .nft import KernelError

NFNL_SUBSYS_NFTABLES, NFPROTO_INET, NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 10, 1, 16, 17
NFT_MSG_NEWSETELEM, NFT_MSG_GETSETELEM, NFT_MSG_DELSETELEM, NFT_MSG_NEWOBJ, NFT_MSG_GETOBJ = 12, 13, 14, 18, 19
OBJ_TABLE, OBJ_NAME, OBJ_TYPE, OBJ_DATA, OBJECT_COUNTER, COUNTER_PACKETS = 1, 2, 3, 4, 1, 2
SET_ELEM_LIST_TABLE, SET_ELEM_LIST_SET, SET_ELEM_LIST_ELEMENTS, LIST_ELEM = 1, 2, 3, 1
SET_ELEM_KEY, SET_ELEM_DATA, SET_ELEM_TIMEOUT, SET_ELEM_EXPIRATION, SET_ELEM_USERDATA, DATA_VALUE = 1, 2, 4, 5, 6, 1
UDATA_COMMENT = 0  # libnftnl's user data: type, length, value; nft prints it as the element's comment
MAP_NAME = "tokens"


def _set_elements(table: str, elements: bytes = b"", name: str = MAP_NAME) -> bytes:
    body = attribute(SET_ELEM_LIST_TABLE, table.encode(), b"\0") + attribute(SET_ELEM_LIST_SET, name.encode(), b"\0")
    return body + ATTRIBUTE.pack(4 + len(elements), SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED) + elements if elements \
        else body


# One element of the token map as NFT_MSG_NEWSETELEM carries it, 40 bytes, packed in one go (the
# generic attribute helpers took 20 µs a token): a list element nesting the key (the token's four
# bytes, as on the wire), the data (the mark, host order) and the timeout (ms, big endian); then
# the comment naming the connection, if any: the user data attribute's header, then libnftnl's
# own (type, length) before the text.
SET_ELEMENT = struct.Struct("=HHHHHH4sHHHHIHH8s")
COMMENT_HEADER = struct.Struct("=HHBB")


def _comment(text: str | None) -> bytes:
    if not text:
        return b""
    value = text.encode()[:126] + b"\0"
    size = COMMENT_HEADER.size + len(value)
    return COMMENT_HEADER.pack(size, SET_ELEM_USERDATA, UDATA_COMMENT, len(value)) + value + bytes(-size % 4)


def _with_marks(tokens: list[tuple[int, int]], timeout: int, comments: Mapping[int, str] | None = None) -> bytes:
    expires, pack, comment_of = struct.pack("!Q", timeout * 1000), SET_ELEMENT.pack, comments or {}
    parts = []
    for token, mark in tokens:
        comment = _comment(comment_of.get(token))
        parts.append(pack(40 + len(comment), LIST_ELEM | NLA_F_NESTED, 12, SET_ELEM_KEY | NLA_F_NESTED, 8,
                          DATA_VALUE, token.to_bytes(4, "big"), 12, SET_ELEM_DATA | NLA_F_NESTED, 8,
                          DATA_VALUE, mark, 12, SET_ELEM_TIMEOUT, expires))
        parts.append(comment)
    return b"".join(parts)


def _keys(tokens: list[int]) -> bytes:
    return b"".join(attribute(LIST_ELEM | NLA_F_NESTED, attribute(
        SET_ELEM_KEY | NLA_F_NESTED, attribute(DATA_VALUE, token.to_bytes(4, "big")))) for token in tokens)


# A scheduler map's element, 7 words: a list element nesting the key (the slot numgen and jhash
# give, host order) and the data (the backend's mark); a key alone to delete one, 4 words. Built as
# arrays of words, the slots and marks put in by slice: 20,000 elements in a few ms.
def _words(*halves: int) -> int:
    return int.from_bytes(struct.pack("=" + "H" * len(halves), *halves), sys.byteorder)


SLOT_HEADERS = (_words(28, LIST_ELEM | NLA_F_NESTED), _words(12, SET_ELEM_KEY | NLA_F_NESTED), _words(8, DATA_VALUE),
                _words(12, SET_ELEM_DATA | NLA_F_NESTED), _words(8, DATA_VALUE))
KEY_HEADERS = (_words(16, LIST_ELEM | NLA_F_NESTED), _words(12, SET_ELEM_KEY | NLA_F_NESTED), _words(8, DATA_VALUE))
SLOTS_PER_MESSAGE = 2000  # an element list is one attribute: 65,535 bytes at most


def _slot_elements(slots: array, marks: array | None) -> bytes:
    """The elements (marks given) or the keys alone of these slots."""
    headers = KEY_HEADERS if marks is None else SLOT_HEADERS
    width, count = len(headers) + (1 if marks is None else 2), len(slots)
    words = array("I", bytes(4 * width * count))
    for position, header in zip((0, 1, 2) if marks is None else (0, 1, 2, 4, 5), headers):
        words[position::width] = array("I", [header]) * count
    words[3::width] = slots
    if marks is not None:
        words[6::width] = marks
    return words.tobytes()


def slot_batch(table: str, maps: Mapping[str, list[tuple[int, int]]], seq: int) -> tuple[bytes, int]:
    """One transaction that gives each slot of these maps (name -> changes) its new value
    (delete, then add: a map element's value cannot be changed in place); and the count of its
    messages."""
    messages = []
    for name, changes in maps.items():
        for start in range(0, len(changes), SLOTS_PER_MESSAGE):
            chunk = changes[start:start + SLOTS_PER_MESSAGE]
            slots, marks = array("I", [slot for slot, _ in chunk]), array("I", [mark for _, mark in chunk])
            messages += [(NFT_MSG_DELSETELEM, _set_elements(table, _slot_elements(slots, None), name)),
                         (NFT_MSG_NEWSETELEM, _set_elements(table, _slot_elements(slots, marks), name))]
    return transaction(seq, messages), len(messages)


def transaction(seq: int, messages: list[tuple[int, bytes]]) -> bytes:
    """One nf_tables transaction: begin (seq), the messages (seq + 1, ...; each asks for an
    acknowledgement), end. All of it applies, or none."""
    parts = [message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, seq, 0, res_id=NFNL_SUBSYS_NFTABLES)]
    for offset, (kind, body) in enumerate(messages, 1):
        flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE if kind == NFT_MSG_NEWSETELEM else 0)
        parts.append(message(NFNL_SUBSYS_NFTABLES << 8 | kind, flags, seq + offset, NFPROTO_INET, body))
    parts.append(message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, seq + len(messages) + 1, 0,
                            res_id=NFNL_SUBSYS_NFTABLES))
    return b"".join(parts)


def token_batch(table: str, tokens: list[tuple[int, int]], timeout: int, seq: int,
                comments: Mapping[int, str] | None = None) -> bytes:
    """The transaction adding token -> mark (messages seq to seq + 2)."""
    return transaction(seq, [(NFT_MSG_NEWSETELEM, _set_elements(table, _with_marks(tokens, timeout, comments)))])


def replace_batch(table: str, tokens: list[tuple[int, int]], timeout: int, seq: int, delete_first: bool,
                  comments: Mapping[int, str] | None = None) -> bytes:
    """The transaction that replaces tokens' elements with their marks: the delete fails the whole
    transaction when an element is not there, hence `delete_first`."""
    messages = [(NFT_MSG_DELSETELEM, _set_elements(table, _keys([t for t, _ in tokens])))] if delete_first else []
    return transaction(seq, messages + [(NFT_MSG_NEWSETELEM, _set_elements(table, _with_marks(tokens, timeout,
                                                                                              comments)))])


def delete_batch(table: str, tokens: list[int], seq: int) -> bytes:
    return transaction(seq, [(NFT_MSG_DELSETELEM, _set_elements(table, _keys(tokens)))])


def parse_elements(message_body: bytes) -> list[tuple[int, int, float, str | None]]:
    """(token, mark, seconds left, comment) of each element of a NFT_MSG_NEWSETELEM body (after nfgenmsg)."""
    listing = attributes(message_body, NFGEN_HEADER_SIZE).get(SET_ELEM_LIST_ELEMENTS, b"")
    found = []
    for _, element in walk(listing):
        attrs = attributes(element)
        key = attributes(attrs.get(SET_ELEM_KEY, b"")).get(DATA_VALUE)
        data = attributes(attrs.get(SET_ELEM_DATA, b"")).get(DATA_VALUE)
        if key is None or data is None or len(key) != 4 or len(data) != 4:
            continue
        left_ms = attrs.get(SET_ELEM_EXPIRATION) or attrs.get(SET_ELEM_TIMEOUT) or bytes(8)
        found.append((int.from_bytes(key, "big"), struct.unpack("=I", data)[0], struct.unpack("!Q", left_ms)[0] / 1000,
                      _comment_of(attrs.get(SET_ELEM_USERDATA, b""))))
    return found


def _comment_of(userdata: bytes) -> str | None:
    offset = 0
    while offset + 2 <= len(userdata):
        kind, length = userdata[offset], userdata[offset + 1]
        if kind == UDATA_COMMENT:
            return userdata[offset + 2:offset + 2 + length].rstrip(b"\0").decode(errors="replace")
        offset += 2 + length
    return None


def counters_request(table: str, seq: int) -> bytes:
    """A dump of the table's named counters (NFT_MSG_GETOBJ, counters only)."""
    body = attribute(OBJ_TABLE, table.encode(), b"\0") + attribute(OBJ_TYPE, struct.pack("!I", OBJECT_COUNTER))
    return message(NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETOBJ, NLM_F_REQUEST | NLM_F_DUMP, seq, NFPROTO_INET, body)


def parse_counter(message_body: bytes) -> tuple[str, int] | None:
    """(name, packets) of one counter of a NFT_MSG_NEWOBJ body (after nfgenmsg)."""
    attrs = attributes(message_body, NFGEN_HEADER_SIZE)
    packets = attributes(attrs.get(OBJ_DATA, b"")).get(COUNTER_PACKETS)
    if OBJ_NAME not in attrs or packets is None or len(packets) != 8:
        return None
    return attrs[OBJ_NAME].rstrip(b"\0").decode(errors="replace"), struct.unpack("!Q", packets)[0]


class Nfnetlink:
    """One nfnetlink socket of nf_tables, in the process and network namespace that opened it."""

    def __init__(self, table: str):
        self.table = table
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)  # an error quotes the header only, not the batch
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)  # a dump's answers come in a burst
        self.sock.bind((0, 0))
        self.sock.settimeout(5.0)
        self.seq = 0

    def _transaction(self, batch: bytes, acknowledged: list[int]) -> int:
        """Send a transaction; the first error the kernel answered any of its messages with (0: done)."""
        self.sock.send(batch)
        errors = {}
        while len(errors) < len(acknowledged):
            for _, _, error, seq in self._messages():
                if seq in acknowledged and error is not None:
                    errors[seq] = error
            if any(errors.values()):  # the kernel aborts the transaction at the first error
                break
        return next((e for e in errors.values() if e), 0)

    def _answers(self, seq: int):
        """(type, body, errno or None) of the answers to request seq, up to its end."""
        while True:
            for kind, body, error, answered in self._messages():
                if answered != seq:
                    continue
                yield kind, body, error
                if kind in (NLMSG_ERROR, NLMSG_DONE):
                    return

    def _messages(self):
        for kind, _, seq, body, error in messages(self.sock.recv(1 << 16)):
            yield kind, body, error, seq

    def close(self) -> None:
        self.sock.close()


NFT_MSG_GETTABLE, NFT_MSG_NEWTABLE, NFT_MSG_GETCHAIN, NFT_MSG_NEWCHAIN, NFT_MSG_GETSET, NFT_MSG_NEWSET = 1, 0, 4, 3, 10, 9
TABLE_NAME, TABLE_HANDLE, TABLE_USERDATA, CHAIN_TABLE, CHAIN_NAME, SET_TABLE, SET_NAME, SET_FLAGS = 1, 4, 6, 1, 3, 1, 2, 3
SET_IS_MAP = 0x8  # NFT_SET_MAP


class Outline(NamedTuple):
    """A table's comment, chains and sets (name -> "set" or "map"), and its handle (another table
    of the same name, made since, has another): what adopting it needs to know. libnftables
    fetches every element of every set for any listing of a table (5 s for a token map of
    200,000, growing faster than the map), so it is read here, elements left out."""
    comment: str
    chains: frozenset[str]
    sets: dict[str, str]
    handle: int = 0


def outline_requests(table: str, seq: int) -> list[tuple[int, bytes]]:
    """(seq, message) of the three requests: the table; a dump of its chains; of its sets."""
    name = table.encode()
    return [(seq, message(NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETTABLE, NLM_F_REQUEST | NLM_F_ACK, seq, NFPROTO_INET,
                          attribute(TABLE_NAME, name, b"\0"))),
            (seq + 1, message(NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETCHAIN, NLM_F_REQUEST | NLM_F_DUMP, seq + 1,
                              NFPROTO_INET, attribute(CHAIN_TABLE, name, b"\0"))),
            (seq + 2, message(NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETSET, NLM_F_REQUEST | NLM_F_DUMP, seq + 2,
                              NFPROTO_INET, attribute(SET_TABLE, name, b"\0")))]


def _text(value: bytes | None) -> str:
    return (value or b"").split(b"\0")[0].decode(errors="replace")


class TableReader(Nfnetlink):
    def outline(self) -> Outline | None:
        """The table's outline, or None when there is no such table."""
        comment, chains, sets, handle = "", set(), {}, 0
        requests = outline_requests(self.table, self.seq + 1)
        self.seq += len(requests)
        for seq, request in requests:
            self.sock.send(request)
            for kind, body, error in self._answers(seq):
                attrs = attributes(body, NFGEN_HEADER_SIZE) if error is None else {}
                if kind == NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWTABLE:
                    comment = _comment_of(attrs.get(TABLE_USERDATA, b"")) or ""
                    handle = struct.unpack("!Q", attrs.get(TABLE_HANDLE, bytes(8)))[0]
                elif kind == NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWCHAIN and _text(attrs.get(CHAIN_TABLE)) == self.table:
                    chains.add(_text(attrs.get(CHAIN_NAME)))
                elif kind == NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWSET and _text(attrs.get(SET_TABLE)) == self.table:
                    flags = struct.unpack("!I", attrs.get(SET_FLAGS, bytes(4)))[0]
                    sets[_text(attrs.get(SET_NAME))] = "map" if flags & SET_IS_MAP else "set"
                elif error == errno.ENOENT and seq == requests[0][0]:
                    return None
                elif error:
                    raise KernelError(f"reading table {self.table}: {os.strerror(error)}")
        return Outline(comment, frozenset(chains), sets, handle)


class SchedulerMaps(Nfnetlink):
    """The services' scheduler maps (sched_NAME, via_NAME), slots rewritten in place."""

    def __init__(self, table: str):
        super().__init__(table)
        self.sock.setsockopt(socket.SOL_SOCKET, 32, 8 << 20)  # SO_SNDBUFFORCE: a whole table in one send

    def write(self, maps: Mapping[str, list[tuple[int, int]]]) -> None:
        """Give the slots of these maps (name -> changes) their values, all in one transaction (a
        SYN sees the old tables or the new)."""
        maps = {name: changes for name, changes in maps.items() if changes}
        if not maps:
            return
        batch, count = slot_batch(self.table, maps, self.seq + 1)
        error = self._transaction(batch, list(range(self.seq + 2, self.seq + 2 + count)))
        self.seq += count + 2
        if error:
            raise KernelError(f"writing {sum(map(len, maps.values()))} slots of maps {', '.join(maps)}: "
                              f"{os.strerror(error)}")


class Counters(Nfnetlink):
    """The table's named counters. libnftables fetches every element of every map to list them
    (0.5 s with a Maglev table of 65,537 slots): a scrape would outlast its interval."""

    def read(self) -> dict[str, int]:
        self.seq += 1
        self.sock.send(counters_request(self.table, self.seq))
        found = {}
        for kind, body, error in self._answers(self.seq):
            if kind == NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWOBJ:
                counter = parse_counter(body)
                if counter:
                    found[counter[0]] = counter[1]
            elif error:
                raise KernelError(f"reading the counters of table {self.table}: {os.strerror(error)}")
        return found


class TokenMap(Nfnetlink):
    """The table's token map: add, look up, reject, read, all over one nfnetlink socket."""

    # Tokens per transaction: their list is one netlink attribute, of at most 65,535 bytes, and an
    # element with the longest comment takes 176.
    CHUNK = 360

    def add(self, tokens: list[tuple[int, int]], timeout: int, comments: Mapping[int, str] | None = None) -> list[int]:
        """Add token -> mark; the tokens the map holds already with another mark are refused, and
        returned. Each chunk is one transaction, all of it added or none: when one is refused, the
        chunk's tokens are added again one by one, so that the others still go in."""
        refused = []
        for start in range(0, len(tokens), self.CHUNK):
            chunk = tokens[start:start + self.CHUNK]
            if self._add(chunk, timeout, comments) == errno.EEXIST:
                refused += [token for token, mark in chunk
                            if self._add([(token, mark)], timeout, comments) == errno.EEXIST]
        return refused

    def _add(self, tokens: list[tuple[int, int]], timeout: int, comments: Mapping[int, str] | None) -> int:
        """0, or EEXIST (a token held with another mark); any other error raises KernelError."""
        self.seq += 3
        error = self._transaction(token_batch(self.table, tokens, timeout, self.seq, comments), [self.seq + 1])
        if error not in (0, errno.EEXIST):
            raise KernelError(f"adding {len(tokens)} tokens to the map: {os.strerror(error)}")
        return error

    def replace(self, tokens: list[tuple[int, int]], timeout: int, comments: Mapping[int, str] | None = None) -> None:
        """Give each token its mark in place of whatever the map held for it."""
        for token, mark in tokens:
            self._replace([(token, mark)], timeout, comments)

    def renew(self, tokens: list[tuple[int, int]], timeout: int, comments: Mapping[int, str] | None = None) -> None:
        """Elements again, whole, with a new timeout (a kernel before 6.10 keeps an element's old
        timeout when it is added again): a chunk in one transaction, one by one if one is gone."""
        for start in range(0, len(tokens), self.CHUNK):
            chunk = tokens[start:start + self.CHUNK]
            self.seq += 4
            error = self._transaction(replace_batch(self.table, chunk, timeout, self.seq, True, comments),
                                      [self.seq + 1, self.seq + 2])
            if error == errno.ENOENT:
                self.replace(chunk, timeout, comments)
            elif error:
                raise KernelError(f"renewing {len(chunk)} tokens in the map: {os.strerror(error)}")

    def _replace(self, tokens: list[tuple[int, int]], timeout: int, comments: Mapping[int, str] | None) -> None:
        self.seq += 4
        error = self._transaction(replace_batch(self.table, tokens, timeout, self.seq, True, comments),
                                  [self.seq + 1, self.seq + 2])
        if error == errno.ENOENT:  # not there (learned in the same batch, or gone)
            self.seq += 3
            error = self._transaction(replace_batch(self.table, tokens, timeout, self.seq, False, comments),
                                      [self.seq + 1])
        if error:
            raise KernelError(f"replacing token 0x{tokens[0][0]:08x} in the map: {os.strerror(error)}")

    def delete(self, tokens: list[int]) -> None:
        """Remove the tokens the map holds (those it does not are no error)."""
        for start in range(0, len(tokens), self.CHUNK):
            chunk = tokens[start:start + self.CHUNK]
            self.seq += 3
            if self._transaction(delete_batch(self.table, chunk, self.seq), [self.seq + 1]) == errno.ENOENT:
                for token in chunk:
                    self.seq += 3
                    error = self._transaction(delete_batch(self.table, [token], self.seq), [self.seq + 1])
                    if error not in (0, errno.ENOENT):
                        raise KernelError(f"deleting token 0x{token:08x} from the map: {os.strerror(error)}")

    def lookup(self, token: int) -> int | None:
        """The mark the map holds for a token, or None."""
        found = self.element(token)
        return None if found is None else found[0]

    def element(self, token: int) -> tuple[int, float] | None:
        """(mark, seconds left) of a token's element, or None."""
        self.seq += 1
        self.sock.send(message(NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETSETELEM, NLM_F_REQUEST | NLM_F_ACK,
                                  self.seq, NFPROTO_INET, _set_elements(self.table, _keys([token]))))
        found = None
        for kind, body, error in self._answers(self.seq):
            if kind == NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWSETELEM:
                found = next(((mark, left) for t, mark, left, _ in parse_elements(body) if t == token), found)
            elif error is not None:
                if error not in (0, errno.ENOENT):
                    raise KernelError(f"looking token 0x{token:08x} up in the map: {os.strerror(error)}")
                return found
        return found

    def read(self) -> list[tuple[int, int, float, str | None]]:
        """(token, mark, seconds left, comment) of every element of the map."""
        self.seq += 1
        self.sock.send(message(NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETSETELEM, NLM_F_REQUEST | NLM_F_DUMP,
                                  self.seq, NFPROTO_INET, _set_elements(self.table)))
        found = []
        for kind, body, error in self._answers(self.seq):
            if kind == NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWSETELEM:
                found += parse_elements(body)
            elif error:
                raise KernelError(f"reading the token map: {os.strerror(error)}")
        return found
