"""`mplb-nfq status`: the running worker's state, laid out like `ipvsadm -Ln`."""
from __future__ import annotations


def render_status(status: dict) -> str:
    drops = status["queue_drops"]
    lines = [f"mplb-nfq: handshakes {status['handshakes']}, queue {status['queue']} ({status['queue_mode']}), "
             f"table {status['table_owner']}'s, up {status['uptime_s']:.0f} s",
             f"tokens tracked {status['tokens_tracked']}, flows tracked {status['flows_tracked']}, "
             f"queue drops {drops['queue_full']} (queue full) + {drops['socket_full']} (socket full), "
             f"waiting {drops['waiting']}",
             "Prot VIP:Port                    Scheduler  Flags",
             "  -> Backend        Address                State     Weight  Conns  Subflows"]
    for s in status["services"]:
        flags = [f"SYNs {s['syns_decided_by']}"] + ([f"persistent {s['persistence']}s"] if s["persistence"] else [])
        flags.append(f"unknown-join {s['unknown_join']}")
        if s["join_ports"]:
            flags.append("join ports " + " ".join(f"{name}:{port}" for name, port in s["join_ports"].items()))
        if not s["mptcp_aware"]:
            flags.append("MPTCP-unaware")
        for vip in s["vips"]:
            endpoint = f"[{vip}]" if ":" in vip else vip
            ports = ",".join(str(p) for p in s["ports"])
            lines.append(f"TCP  {endpoint + ':' + ports:28} {s['scheduler']:10} {' '.join(flags)}   ({s['name']})")
        for b in s["backends"]:
            lines.append(_backend_line(b))
    if status["retired"]:
        lines.append("Retired (removed from the config, kept for their connections):")
        lines += [_backend_line(b) for b in status["retired"]]
    return "\n".join(lines)


def _backend_line(b: dict) -> str:
    return (f"  -> {b['name']:14} {', '.join(b['addresses']):22} {b['state']:9} {b['weight']:6}  "
            f"{b['connections']:5}  {b['subflows']:8}")
