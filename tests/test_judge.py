"""The judge's verdicts on joins, from events as its watchers report them (the watchers
themselves run in every kernel test's backends: `netlab.counters`)."""
import pytest
from mplb_nfq.lab.packets import ACK, SERVER_KEY, SYN, mp_capable, mp_join_syn, tcp

from mplb_nfq.core.packet import TCP_RST, parse_ip, token_of_key
from mplb_nfq.lab.judge import Ledger, new_events, observe, total

VIP = "10.0.100.1"
SYN_ACK = SYN | ACK


def events_of(*packets):
    events = new_events()
    for packet in packets:
        observe(parse_ip(packet), events)
    return events


def test_a_backend_issues_the_token_of_the_key_in_its_mp_capable_syn_ack_and_receives_joins_with_theirs():
    token = token_of_key(SERVER_KEY, 1)
    events = events_of(tcp(VIP, "10.0.1.2", 80, 40000, SYN_ACK, mp_capable(1, 0x01, SERVER_KEY)),
                       tcp("10.0.2.2", VIP, 40001, 80, SYN, mp_join_syn(token)),
                       tcp(VIP, "10.0.2.2", 80, 40001, SYN_ACK, bytes([30, 16, 0x10, 1]) + bytes(12)),  # MP_JOIN SYN-ACK
                       tcp(VIP, "10.0.1.2", 80, 40002, TCP_RST | ACK),
                       tcp("10.0.1.2", VIP, 40003, 80, SYN, mp_capable(1, 0x01)))  # a new connection: no join
    assert events["issued"] == [token]
    assert events["joins"] == [["10.0.2.2:40001>10.0.100.1:80", token, 0.0]]
    assert events["answers"] == [["10.0.2.2:40001>10.0.100.1:80", "taken"], ["10.0.1.2:40002>10.0.100.1:80", "refused"]]


def ledger(issued_b1=(), issued_b2=(), joins_b1=(), answers_b1=()):
    found = Ledger()
    found.add("b1", {"issued": list(issued_b1), "joins": [[*j, 1.5] for j in joins_b1],
                     "answers": [list(a) for a in answers_b1], "lost": 0})
    found.add("b2", {**new_events(), "issued": list(issued_b2)})
    return found


@pytest.mark.parametrize("issued_b1, issued_b2, answer, verdict", [
    ((7,), (), "taken", None),  # its connection's backend took it
    ((7,), (), None, None),  # unanswered yet, at its connection's backend
    ((7,), (), "refused", "late"),  # its connection's backend refused it: the connection had ended
    ((), (7,), "refused", "misrouted"),  # another backend issued the token
    ((), (), "refused", "foreign"),  # nobody did
])
def test_a_join_is_judged_by_where_its_token_was_issued_and_how_it_was_answered(issued_b1, issued_b2, answer, verdict):
    answers = [("f", answer)] if answer else []
    found = ledger(issued_b1, issued_b2, [("f", 7)], answers)
    counts = total(found.verdicts())
    expected = {"joins": 1, "misrouted": 0, "foreign": 0, "late": 0}
    if verdict:
        expected[verdict] = 1
    assert counts == expected
    assert found.wrong() == ([(verdict, 1.5)] if verdict else [])


def test_a_retransmitted_join_counts_once_and_its_first_answer_decides():
    found = ledger((7,), (), [("f", 7), ("f", 7)], [("f", "taken"), ("f", "refused")])  # the subflow's end: a reset
    assert found.verdicts()["b1"] == {"joins": 1, "misrouted": 0, "foreign": 0, "late": 0}


def test_an_answer_read_after_its_join_still_judges_it():
    found = ledger((7,), (), [("f", 7)])
    found.add("b1", {**new_events(), "answers": [["f", "refused"]]})
    assert found.verdicts()["b1"]["late"] == 1


def test_a_watcher_that_lost_copies_makes_the_judge_refuse_to_count():
    found = Ledger()
    with pytest.raises(RuntimeError, match="lost copies"):
        found.add("b1", {**new_events(), "lost": 1})


def test_a_later_join_on_the_same_ports_is_another_join():
    """The ledger spans a session: a client port comes round again, and a second connection's
    join on it must be judged too."""
    found = ledger((7,), (), [("f", 7)], [("f", "taken")])
    found.add("b1", {**new_events(), "joins": [["f", 8, 2.0]], "answers": [["f", "refused"]]})
    assert found.verdicts()["b1"] == {"joins": 2, "misrouted": 0, "foreign": 1, "late": 0}
