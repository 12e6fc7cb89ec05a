"""Property tests: no input, random or mutated from real captures, makes the parser or the core raise."""
import random

from conftest import CAPTURES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mplb_nfq.lab.packets import ACK, PSH, SYN, tcp

from mplb_nfq.core.balancer import Backend, Balancer, Service
from mplb_nfq.core.marks import JOIN, LEARNED, PROVISIONAL, REJECT
from mplb_nfq.core.packet import Malformed, Segment, parse_ip
from mplb_nfq.core.verdicts import Kind, Verdict
from mplb_nfq.inspect import read_packets

REAL = [ip for pcap in sorted(CAPTURES.glob("*.pcap")) for _, ip in read_packets(str(pcap)) if ip]
# every endpoint of the captures and of the generated packets is a VIP, so that every packet
# reaches the scheduler and the token logic, not just the parser
ENDPOINTS = {(s.dst, s.dport) for s in map(parse_ip, REAL) if isinstance(s, Segment)} | {
    (s.src, s.sport) for s in map(parse_ip, REAL) if isinstance(s, Segment)}
VIPS = tuple({vip for vip, _ in ENDPOINTS}) + (bytes([10, 0, 100, 1]), bytes.fromhex("20010db8" + "0" * 23 + "1"))
PORTS = tuple({port for _, port in ENDPOINTS} | {80})


def balancer(rng=None) -> Balancer:
    backends = [Backend("b1", ("10.0.9.11",), 0x101, 101), Backend("b2", ("10.0.9.12",), 0x102, 102)]
    return Balancer([Service("all", VIPS, PORTS, backends)], rng=rng)


# the marks a queued packet can arrive with: none, a backend's (restored from conntrack), with the
# flag bits, and a foreign one
MARKS = (0, 0x101, 0x102 | JOIN, 0x101 | LEARNED, 0x9999, 0xFFFFFFFF)


def check(packet: bytes, lb: Balancer, mark: int = 0) -> None:
    result = parse_ip(packet)
    assert result is None or isinstance(result, (Segment, Malformed))
    verdict = lb.decide(result, mark, 0.0)
    assert isinstance(verdict, Verdict) and isinstance(verdict.kind, Kind)
    assert 0 <= verdict.mark <= 0xFFFFFFFF
    if isinstance(result, Malformed):
        assert result.reason
        if result.linux is None:  # its IP or TCP header is broken: Linux would drop it, so do we
            assert not verdict.accept
    if verdict.accept and not (result is None or isinstance(result, Malformed) and result.linux is None):
        taken = result.linux if isinstance(result, Malformed) else result
        assert taken.is_syn or verdict.mark & LEARNED or verdict.mark & REJECT  # no flow is queued forever
    if verdict.token is not None:
        assert lb.backend_of(verdict.mark) is not None  # a token is only ever learned for a backend


@given(st.binary(max_size=120), st.sampled_from(MARKS))
def test_random_bytes(packet, mark):
    check(packet, balancer(), mark)


@given(st.binary(max_size=40), st.sampled_from([4, 6]), st.integers(0, 255), st.sampled_from(MARKS))
def test_random_tcp_options_behind_a_valid_header(options, family, flags, mark):
    src, dst = ("10.0.1.2", "10.0.100.1") if family == 4 else ("2001:db8::2", "2001:db8::1")
    check(tcp(src, dst, flags=flags, options=options), balancer(), mark)


@given(st.integers(0, 255), st.integers(0, 40), st.binary(max_size=40), st.sampled_from([SYN, 0x10, 0x18]),
       st.sampled_from(MARKS))
def test_kind_30_with_any_subtype_and_length(subtype_byte, length, body, flags, mark):
    option = bytes([30, length, subtype_byte]) + body
    check(tcp("10.0.1.2", "10.0.100.1", flags=flags, options=option[:40]), balancer(), mark)


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=300)
@given(st.sampled_from(range(len(REAL))), st.lists(st.tuples(st.integers(0, 1499), st.integers(0, 255)),
                                                    max_size=8), st.integers(0, 1500), st.sampled_from(MARKS))
def test_mutated_real_packets(index, flips, cut, mark):
    check(mutated(index, flips, cut), balancer(), mark)


def mutated(index: int, flips: list[tuple[int, int]], cut: int) -> bytes:
    """A real packet with bytes changed (position, new value) and cut short."""
    packet = bytearray(REAL[index])
    for position, value in flips:
        if position < len(packet):
            packet[position] = value
    return bytes(packet[:cut])


def test_every_truncation_of_every_real_packet():
    lb = balancer(random.Random(1))
    for number, packet in enumerate(REAL):
        for cut in range(len(packet) + 1):
            check(packet[:cut], lb, MARKS[(number + cut) % len(MARKS)])


def learned_both_ways(packet: bytes, mark: int) -> None:
    """The learning path's shortcut (packet.capable_copy, Balancer.learn_copy) reaches the verdict,
    the counts and the tables decide() reaches, wherever it takes the packet."""
    from mplb_nfq.core.packet import capable_copy

    copy = capable_copy(packet)
    if copy is None:
        return
    general, short = balancer(random.Random(1)), balancer(random.Random(1))
    for lb in (general, short):  # a token known already: the shortcut meets the same tables
        lb.tokens.add(0x01020304, 0x102, 0.0)
    assert short.learn_copy(copy, mark, 0.0) == general.decide(parse_ip(packet), mark, 0.0)
    assert short.counts == general.counts and short.newly_known == general.newly_known
    assert list(short.tokens.items(1.0)) == list(general.tokens.items(1.0))
    assert list(short.provisional.items(1.0)) == list(general.provisional.items(1.0))


BACKEND_MARKS = (0x101, 0x102 | JOIN, 0x101 | LEARNED, 0x101 | PROVISIONAL, 0x9999)  # the last: no such backend


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=400)
@given(st.sampled_from(range(len(REAL))), st.lists(st.tuples(st.integers(0, 1499), st.integers(0, 255)),
                                                    max_size=6), st.integers(0, 1500), st.sampled_from(BACKEND_MARKS))
def test_the_learning_shortcut_decides_as_the_general_path_on_mutated_real_packets(index, flips, cut, mark):
    learned_both_ways(mutated(index, flips, cut), mark)


@settings(max_examples=400)
@given(st.sampled_from([4, 6]), st.sampled_from([SYN | ACK, ACK, ACK | PSH, SYN]), st.integers(0, 1),
       st.sampled_from([4, 12, 20, 22, 24]), st.binary(min_size=0, max_size=16), st.binary(max_size=12),
       st.sampled_from(BACKEND_MARKS))
def test_the_learning_shortcut_decides_as_the_general_path_on_made_up_handshakes(
        family, flags, version, length, keys, other_options, mark):
    src, dst = ("10.0.1.2", "10.0.100.1") if family == 4 else ("2001:db8::2", "2001:db8::1")
    option = bytes([30, length, version, 0x81]) + (keys + bytes(24))[:max(0, length - 4)]
    learned_both_ways(tcp(src, dst, flags=flags, options=(other_options + option)[:40]), mark)
