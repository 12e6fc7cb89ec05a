"""What the core answers for one packet: accept or drop, the mark to give it, and what it was."""
from __future__ import annotations

from enum import StrEnum
from typing import NamedTuple


class Kind(StrEnum):
    """What a packet was, as the counters and metrics name it."""
    NOT_TCP = "not_tcp"
    MALFORMED = "malformed"
    NO_SERVICE = "no_service"
    SYN = "syn"
    MP_CAPABLE_SYN = "mp_capable_syn"
    SYN_RETRANSMIT = "syn_retransmit"
    NO_BACKEND = "no_backend"
    JOIN_HIT = "join_hit"
    JOIN_MISS = "join_miss"
    JOIN_HELD = "join_held"  # may wait for another worker to put its token in the kernel map
    JOIN_COLLISION = "join_collision"
    JOIN_UNAWARE = "join_unaware"
    SYN_ACK = "syn_ack"
    SYN_ACK_REPEAT = "syn_ack_repeat"
    THIRD_ACK = "third_ack"
    THIRD_ACK_REPEAT = "third_ack_repeat"
    TOKEN_COLLISION = "token_collision"
    TOKEN_COLLISION_REPEAT = "token_collision_repeat"
    SYN_ACK_OVER_CLIENT = "syn_ack_over_client"  # a server's token replaces one a client taught
    TOKEN_REFUSED = "token_refused"  # a client taught a token that another connection holds: ignored
    TOKEN_TABLE_FULL = "token_table_full"  # no room for a new token: the old ones are kept
    TOKEN_PROVEN = "token_proven"  # a client-taught token's connection sent its next MPTCP packet
    PROOF_WITHOUT_TOKEN = "proof_without_token"  # ... but no provisional token waited for it (pushed out)
    CAPABLE_WITHOUT_FLOW = "capable_without_flow"
    FIRST_PACKET = "first_packet"
    FIRST_WITHOUT_FLOW = "first_without_flow"
    OTHER = "other"


class Verdict(NamedTuple):
    accept: bool
    mark: int
    kind: Kind
    token: int | None = None  # learned: install token -> mark in the kernel map (a collision: reject it)
    flow: tuple | None = None  # the connection (client -> VIP) that taught the token: it lives as long
