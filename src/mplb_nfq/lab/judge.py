"""The exact judge of joins: what the backends themselves saw, not what a counter suggests.

On each backend a watcher (`python -m mplb_nfq.lab.judge`, in the backend's namespace) copies,
through a table of its own (nflog), the SYN-ACKs and resets the backend sends and the SYNs it
receives. From them: the tokens the backend issued (the key of each MP_CAPABLE SYN-ACK), and
every MP_JOIN SYN that reached it with the backend's answer (an MP_JOIN SYN-ACK, or a reset).

A join is
- **misrouted** when it reached a backend that never issued its token while another one did;
- **foreign** when no backend issued its token (hostile, or garbage);
- **late** when it reached the backend that issued its token and its first answer there was a
  reset (its connection had ended there);
- otherwise it reached its connection's backend and was taken (or is still unanswered). A join
  the backend first takes and resets later (over the connection's subflow limit, say) counts
  as taken.

A backend's `MPJoinNoTokenFound` counts misrouted, foreign and late joins alike.

The watcher answers each `sync` line on its stdin only after it has read every copy the kernel
had made by then (nflog copies a packet as it passes the backend's hook), so a reading counts
every join that had reached a backend when it was taken: no sleep, no estimate. A join still on
its way is not counted yet.
"""
from __future__ import annotations

import json
import select
import subprocess
import sys
import time
from dataclasses import dataclass, field

from ..core.packet import MP_JOIN, TCP_ACK, TCP_RST, TCP_SYN, Malformed, Segment, endpoint, parse_ip, token_of_key
from ..kernel.copies import CopyReader

GROUP = 7  # an nflog group of the backend's namespace: nothing else there reads one
TABLE = "mplb_judge"
RULESET = f"""table inet {TABLE} {{
    chain received {{
        type filter hook input priority -400; policy accept;
        tcp flags & (syn | ack) == syn log group {GROUP} snaplen 256
    }}
    chain sent {{
        type filter hook output priority 400; policy accept;
        tcp flags & (syn | ack) == syn | ack log group {GROUP} snaplen 256
        tcp flags & rst == rst log group {GROUP} snaplen 256
    }}
}}
"""
VERDICTS = ("joins", "misrouted", "foreign", "late")
SYNC_SECONDS = 30  # a watcher that does not answer by then is stuck: the reading fails


def observe(segment: Segment, events: dict, at: float = 0.0) -> None:
    """File one copied packet (parsed; read at monotonic time `at`) under the backend's events."""
    if segment.flags & (TCP_SYN | TCP_ACK) == TCP_SYN:
        if segment.join is not None:
            events["joins"].append([_flow(segment.flow), segment.join.token, at])
        return
    answer_to = _flow((segment.dst, segment.dport, segment.src, segment.sport))
    if segment.flags & TCP_SYN:  # a SYN-ACK
        if segment.capable is not None and segment.capable.sender_key is not None:
            events["issued"].append(token_of_key(segment.capable.sender_key, segment.capable.version))
        elif segment.mptcp_subtype == MP_JOIN:
            events["answers"].append([answer_to, "taken"])
    elif segment.flags & TCP_RST:
        events["answers"].append([answer_to, "refused"])


def _flow(flow: tuple[bytes, int, bytes, int]) -> str:
    return f"{endpoint(flow[0], flow[1])}>{endpoint(flow[2], flow[3])}"


def new_events() -> dict:
    return {"issued": [], "joins": [], "answers": [], "lost": 0}


@dataclass
class Join:
    token: int
    at: float  # when it arrived (time.monotonic, shared by every process of the machine)
    answer: str | None = None  # "taken", "refused", or None while unanswered


@dataclass
class Ledger:
    """Everything the watchers reported, by backend; `verdicts` judges it. Pure."""
    issued: dict[str, set[int]] = field(default_factory=dict)
    joins: dict[str, list[Join]] = field(default_factory=dict)  # backend -> every join it received
    latest: dict[str, dict[str, Join]] = field(default_factory=dict)  # backend -> flow -> its latest join

    def add(self, backend: str, events: dict) -> None:
        issued = self.issued.setdefault(backend, set())
        joins, latest = self.joins.setdefault(backend, []), self.latest.setdefault(backend, {})
        issued.update(events["issued"])
        for flow, token, at in events["joins"]:
            known = latest.get(flow)
            if known is None or known.answer is not None or known.token != token:
                # a new join (a later connection may use the same ports); an unanswered SYN
                # again with the same token is its retransmission
                latest[flow] = Join(token, at)
                joins.append(latest[flow])
        if events["lost"]:
            raise RuntimeError(f"the judge's watcher on {backend} lost copies: its counts would not be exact")
        for flow, answer in events["answers"]:
            join = latest.get(flow)
            if join is not None and join.answer is None:  # the first answer; later resets end the subflow
                join.answer = answer

    def verdict(self, backend: str, join: Join) -> str | None:
        """misrouted, foreign, late, or None: it reached its connection's backend, which took it (or has not answered)."""
        if join.token in self.issued[backend]:
            return "late" if join.answer == "refused" else None
        if any(join.token in tokens for other, tokens in self.issued.items() if other != backend):
            return "misrouted"
        return "foreign"

    def verdicts(self) -> dict[str, dict[str, int]]:
        """Per backend: joins received, and how many of them were misrouted, foreign or late."""
        found = {}
        for backend, joins in self.joins.items():
            counts = dict.fromkeys(VERDICTS, 0)
            for join in joins:
                counts["joins"] += 1
                verdict = self.verdict(backend, join)
                if verdict:
                    counts[verdict] += 1
            found[backend] = counts
        return found

    def wrong(self) -> list[tuple[str, float]]:
        """(verdict, arrival) of every join that was misrouted, foreign or late."""
        return [(verdict, join.at) for backend, joins in self.joins.items() for join in joins
                if (verdict := self.verdict(backend, join))]


def total(verdicts: dict[str, dict[str, int]]) -> dict[str, int]:
    return {key: sum(v[key] for v in verdicts.values()) for key in VERDICTS}


def difference(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {key: after[key] - before[key] for key in VERDICTS}


class Judge:
    """Watchers on the backends of a topology (anything with `backend_names` and `python`)."""

    def __init__(self, topo):
        self.ledger = Ledger()
        self.watchers = {}
        try:
            for name in topo.backend_names:
                self.watchers[name] = topo.python(name, __name__, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                  text=True, bufsize=1)
            for name, watcher in self.watchers.items():
                line = watcher.stdout.readline()
                if line.strip() != "ready":
                    raise RuntimeError(f"the judge's watcher on {name} did not start: {line.strip()!r}")
                self.ledger.add(name, new_events())
        except BaseException:
            self.close()
            raise

    def sync(self) -> Ledger:
        """The ledger, with every packet the backends had seen when this was called."""
        for watcher in self.watchers.values():
            watcher.stdin.write("sync\n")
        for name, watcher in self.watchers.items():
            if not select.select([watcher.stdout], [], [], SYNC_SECONDS)[0]:
                raise RuntimeError(f"the judge's watcher on {name} did not answer in {SYNC_SECONDS} s")
            line = watcher.stdout.readline()
            if not line:
                raise RuntimeError(f"the judge's watcher on {name} is gone")
            self.ledger.add(name, json.loads(line))
        return self.ledger

    def verdicts(self) -> dict[str, dict[str, int]]:
        """Per backend, every join the backends received until now."""
        return self.sync().verdicts()

    def total(self) -> dict[str, int]:
        return total(self.verdicts())

    def close(self) -> None:
        for watcher in self.watchers.values():
            if watcher.poll() is None:
                watcher.stdin.close()  # end of input: the watcher removes its table and leaves
        for watcher in self.watchers.values():
            try:
                watcher.wait(timeout=5)
            except subprocess.TimeoutExpired:
                watcher.kill()
                watcher.wait()
            watcher.stdout.close()

    def __enter__(self) -> "Judge":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def watch() -> None:
    """The watcher, inside a backend's namespace: events go out on each `sync` line of stdin."""
    reader = None
    events = new_events()

    def drain():
        while copies := reader.read(1024):
            for packet, _ in copies:
                segment = parse_ip(packet)
                if isinstance(segment, Malformed):
                    segment = segment.linux
                if isinstance(segment, Segment):
                    observe(segment, events, time.monotonic())

    try:
        subprocess.run(["nft", "-f", "-"], input=RULESET, text=True, check=True)
        reader = CopyReader(GROUP, 256)
        print("ready", flush=True)
        while True:
            readable, _, _ = select.select([reader, sys.stdin], [], [])
            drain()
            if sys.stdin in readable:
                if not sys.stdin.readline():
                    return
                drain()
                events["lost"] = reader.lost
                print(json.dumps(events), flush=True)
                events = new_events()
    finally:
        if reader is not None:
            reader.close()
        subprocess.run(["nft", "delete", "table", "inet", TABLE], capture_output=True)


if __name__ == "__main__":
    watch()
