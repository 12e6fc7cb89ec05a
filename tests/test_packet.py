import pytest
from cryptography.hazmat.primitives import hashes
from mplb_nfq.lab.packets import ACK, CLIENT_KEY, PSH, SERVER_KEY, SYN, mp_capable, mp_join_syn, tcp

from mplb_nfq.core.packet import (
    CAP_FLAG_A,
    CAP_FLAG_C,
    CAP_FLAG_H,
    MP_CAPABLE,
    MP_JOIN,
    Malformed,
    Segment,
    parse_ip,
    token_of_key,
)


def oracle_token(key: bytes, algorithm) -> int:
    digest = hashes.Hash(algorithm)
    digest.update(key)
    return int.from_bytes(digest.finalize()[:4], "big")


def test_v0_token_is_sha1_of_key_as_in_rfc6824_capture():
    assert token_of_key(bytes.fromhex("967d2770b6960552"), 0) == 0xE47F0142


@pytest.mark.parametrize("key", [CLIENT_KEY, SERVER_KEY, bytes(8), b"\xff" * 8])
def test_tokens_match_an_independent_hash_implementation(key):
    assert token_of_key(key, 1) == oracle_token(key, hashes.SHA256())
    assert token_of_key(key, 0) == oracle_token(key, hashes.SHA1())


@pytest.mark.parametrize("src,dst", [("10.0.1.2", "10.0.100.1"), ("2001:db8::2", "2001:db8:100::1")])
def test_plain_syn(src, dst):
    seg = parse_ip(tcp(src, dst, 40000, 80, SYN, b"\x02\x04\x05\xb4"))
    assert isinstance(seg, Segment)
    assert (seg.version, seg.sport, seg.dport, seg.is_syn) == (4 if "." in src else 6, 40000, 80, True)
    assert seg.option_list == ((2, b"\x02\x04\x05\xb4"),)
    assert seg.mptcp_subtype is None and seg.capable is None and seg.join is None


def test_v1_mp_capable_every_length():
    syn = parse_ip(tcp("10.0.1.2", "10.0.100.1", options=mp_capable(1, CAP_FLAG_H)))
    assert syn.capable.sender_key is None and syn.capable.hmac_sha and syn.mptcp_subtype == MP_CAPABLE
    synack = parse_ip(tcp("10.0.100.1", "10.0.1.2", flags=SYN | ACK, options=mp_capable(1, CAP_FLAG_H, SERVER_KEY)))
    assert synack.capable.sender_key == SERVER_KEY and synack.capable.receiver_key is None
    ack = parse_ip(tcp("10.0.1.2", "10.0.100.1", flags=ACK, options=mp_capable(1, CAP_FLAG_H, CLIENT_KEY, SERVER_KEY)))
    assert (ack.capable.sender_key, ack.capable.receiver_key) == (CLIENT_KEY, SERVER_KEY)
    assert token_of_key(ack.capable.receiver_key, 1) == token_of_key(SERVER_KEY, 1)
    data = parse_ip(tcp("10.0.1.2", "10.0.100.1", flags=ACK | PSH, payload=b"x" * 16,
                        options=mp_capable(1, CAP_FLAG_H, CLIENT_KEY, SERVER_KEY, data_len=16)))
    assert data.capable.data_len == 16 and data.payload_len == 16
    assert data.capable.receiver_key == ack.capable.receiver_key
    with_csum = parse_ip(tcp("10.0.1.2", "10.0.100.1", flags=ACK, options=mp_capable(
        1, CAP_FLAG_A | CAP_FLAG_H, CLIENT_KEY, SERVER_KEY, data_len=16, checksum=0xBEEF)))
    assert with_csum.capable.checksum_required and with_csum.capable.data_len == 16


def test_v0_mp_capable_and_flag_bits():
    syn = parse_ip(tcp("10.0.1.2", "10.0.100.1", options=mp_capable(0, CAP_FLAG_A | CAP_FLAG_H, CLIENT_KEY)))
    assert syn.capable.version == 0 and syn.capable.sender_key == CLIENT_KEY and syn.capable.checksum_required
    ack = parse_ip(tcp("10.0.1.2", "10.0.100.1", flags=ACK,
                       options=mp_capable(0, CAP_FLAG_C | CAP_FLAG_H, CLIENT_KEY, SERVER_KEY)))
    assert ack.capable.no_subflows_to_source and not ack.capable.checksum_required
    assert ack.capable.receiver_key == SERVER_KEY and ack.capable.version == 0


def test_mp_join_syn_fields():
    seg = parse_ip(tcp("10.0.2.2", "10.0.100.1", options=mp_join_syn(0xDEADBEEF, 0x01020304, 7, True)))
    assert seg.mptcp_subtype == MP_JOIN
    assert (seg.join.token, seg.join.nonce, seg.join.address_id, seg.join.backup) == (0xDEADBEEF, 0x01020304, 7, True)


def test_a_syn_with_both_mp_join_and_mp_capable_has_no_reading_every_kernel_shares():
    for options in (mp_join_syn(0x1234) + mp_capable(1, CAP_FLAG_H), mp_capable(1, CAP_FLAG_H) + mp_join_syn(0x1234)):
        result = parse_ip(tcp("10.0.2.2", "10.0.100.1", options=options))
        assert isinstance(result, Malformed) and "both MP_CAPABLE and MP_JOIN" in result.reason
        assert result.linux is None  # plain TCP to some kernels, a join to others: dropped


def test_linux_reads_no_option_past_an_end_of_options_and_neither_do_we():
    seg = parse_ip(tcp("10.0.2.2", "10.0.100.1", options=b"\x00\x01\x01\x01" + mp_join_syn(0x1234)))
    assert isinstance(seg, Segment) and seg.join is None and seg.mptcp_subtype is None


def test_of_two_mp_capable_options_the_last_counts_as_in_linux():
    options = mp_capable(1, CAP_FLAG_H, CLIENT_KEY, SERVER_KEY) + mp_capable(1, CAP_FLAG_H, SERVER_KEY, CLIENT_KEY)
    seg = parse_ip(tcp("10.0.1.2", "10.0.100.1", flags=ACK, options=options))
    assert seg.capable.sender_key == SERVER_KEY and seg.capable.receiver_key == CLIENT_KEY


def test_a_broken_option_leaves_the_segment_linux_would_see():
    bad_length = with_options(mp_capable(1, CAP_FLAG_H) + bytes([30, 8, 0x01, 0x81, 1, 2, 3, 4]))
    result = parse_ip(bad_length)  # a v1 MP_CAPABLE of length 8: Linux ignores it, keeps the first
    assert isinstance(result, Malformed) and result.linux.capable is not None and result.linux.sport == 40000
    overrun = parse_ip(with_options(mp_capable(1, CAP_FLAG_H) + b"\x02\x08\x00\x00"))
    assert isinstance(overrun, Malformed) and overrun.linux.capable is not None  # read up to the broken one
    assert parse_ip(GOOD[:32] + bytes([0x40]) + GOOD[33:]).linux is None  # a broken TCP header: none


def test_ipv6_extension_headers_are_walked_to_the_tcp_header():
    plain = tcp("2001:db8::2", "2001:db8::1", options=mp_join_syn(0xABCD))
    hop_by_hop = bytes([6, 0, 1, 4, 0, 0, 0, 0])  # next: TCP; a PadN option
    fragment_first = bytes([0, 0, 0, 0, 0, 0, 0, 7])  # next: hop-by-hop; offset 0, more fragments
    header = bytearray(plain[:40])
    header[6] = 44  # fragment, then hop-by-hop, then TCP
    header[4:6] = (len(plain) - 40 + 16).to_bytes(2, "big")
    seg = parse_ip(bytes(header) + fragment_first + hop_by_hop + plain[40:])
    assert isinstance(seg, Segment) and seg.join.token == 0xABCD and seg.sport == 40000
    later = bytes(header) + bytes([0, 0, 0, 0x08, 0, 0, 0, 7]) + hop_by_hop + plain[40:]  # offset 1: no TCP header
    assert parse_ip(later) is None


def test_non_tcp_and_fragments_are_not_ours():
    udp = bytearray(tcp("10.0.1.2", "10.0.100.1"))
    udp[9] = 17
    assert parse_ip(bytes(udp)) is None
    fragment = bytearray(tcp("10.0.1.2", "10.0.100.1"))
    fragment[6:8] = (0x0010).to_bytes(2, "big")
    assert parse_ip(bytes(fragment)) is None


GOOD = tcp("10.0.1.2", "10.0.100.1", options=mp_capable(1, CAP_FLAG_H))


def with_options(options: bytes) -> bytes:
    return tcp("10.0.1.2", "10.0.100.1", options=options)


@pytest.mark.parametrize("packet,reason", [
    (b"", "empty"),
    (GOOD[:19], "truncated IPv4"),
    (bytes([0x44]) + GOOD[1:], "header length 16"),
    (GOOD[:20] + GOOD[20:35], "truncated TCP"),
    (bytes([0x70]) + GOOD[1:], "IP version 7"),
    (tcp("2001:db8::1", "2001:db8::2")[:39], "truncated IPv6"),
    (GOOD[:32] + bytes([0x40]) + GOOD[33:], "data offset 16"),
    (GOOD[:32] + bytes([0xF0]) + GOOD[33:], "beyond the packet"),
    (with_options(b"\x02\x00\x00\x00"), "length 0"),
    (with_options(b"\x02\x01\x00\x00"), "length 1"),
    (with_options(b"\x02\x08\x00\x00"), "overruns"),
    (with_options(b"\x01\x01\x01\x02"), "without length"),
    (with_options(b"\x1e\x02"), "MPTCP option length 2"),
    (with_options(bytes([30, 8, 0x01, 0x81, 1, 2, 3, 4])), "MP_CAPABLE v1 length 8"),
    (with_options(bytes([30, 12, 0x05, 0x81]) + bytes(8)), "MP_CAPABLE version 5"),
    (with_options(bytes([30, 4, 0x00, 0x81])), "MP_CAPABLE v0 length 4"),
    (with_options(bytes([30, 16, 0x10, 1]) + bytes(12)), "MP_JOIN SYN length 16"),
    (with_options(bytes([30, 13, 0x10, 1]) + bytes(9)), "MP_JOIN length 13"),
    (with_options(bytes([30, 3, 0x20])), "DSS length 3"),
    (with_options(bytes([30, 8, 0x20, 0x05]) + bytes(4)), "does not match its flags"),
    (with_options(bytes([30, 9, 0x30]) + bytes(6)), "ADD_ADDR length 9"),
    (with_options(bytes([30, 5, 0x80, 0, 0])), "subtype 8 length 5"),
])
def test_malformed_input_gives_a_reason_never_an_exception(packet, reason):
    result = parse_ip(packet)
    assert isinstance(result, Malformed), result
    assert reason in result.reason


@pytest.mark.parametrize("options", [
    bytes([30, 8, 0x20, 0x01]) + bytes(4),  # DSS, 4-byte data ACK
    bytes([30, 20, 0x20, 0x05]) + bytes(16),  # DSS, data ACK + 4-byte DSN + csum
    bytes([30, 3, 0xF0]),  # experimental subtype: ignored, not malformed
    bytes([30, 6, 0xE0, 0, 0, 0]),  # unknown subtype 14: ignored
    bytes([30, 4, 0x80, 0x00]),  # MP_TCPRST
])
def test_other_mptcp_subtypes_of_valid_length(options):
    assert isinstance(parse_ip(with_options(options)), Segment)


def test_a_third_ack_behind_ipv6_extension_headers_fits_the_copy_the_worker_learns_from():
    from mplb_nfq.kernel.ruleset import COPY_SNAPLEN

    plain = tcp("2001:db8::2", "2001:db8::1", 40000, 80, ACK, mp_capable(1, 0x01, CLIENT_KEY, SERVER_KEY))
    destination_options = bytes([60, 9, 1, 76]) + bytes(76)  # next: destination options again; 80 bytes
    last = bytes([6, 0, 1, 4, 0, 0, 0, 0])  # next: TCP
    header = bytearray(plain[:40])
    header[6] = 60
    header[4:6] = (len(plain) - 40 + len(destination_options) + len(last)).to_bytes(2, "big")
    packet = bytes(header) + destination_options + last + plain[40:]
    seg = parse_ip(packet[:COPY_SNAPLEN])  # what nflog hands the worker
    assert isinstance(seg, Segment) and seg.capable.receiver_key == SERVER_KEY
