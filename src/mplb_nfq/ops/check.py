"""`mplb-nfq check`: what this kernel and machine support, probed without lasting side effects."""
from __future__ import annotations

import shutil
from pathlib import Path

from ..core.marks import CLOSING_LABEL


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _tunnel_support() -> dict[str, str | None]:
    """Create and delete a device of each tunnel kind: None where it works, else the error."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    found = {}
    with IPRoute() as ipr:
        for kind, extra in (("vxlan", {"vxlan_id": 4242, "vxlan_port": 4789}), ("ipip", {})):
            try:
                ipr.link("add", ifname="mplbprobe0", kind=kind, **extra)
                found[kind] = None
            except NetlinkError as e:
                found[kind] = f"not in this kernel ({e.args[1] if len(e.args) > 1 else e})"
            finally:
                for index in ipr.link_lookup(ifname="mplbprobe0"):
                    ipr.link("del", index=index)
    return found


def kernel_report() -> dict:
    features: dict[str, dict] = {}

    def feature(name: str, ok: bool, detail: str) -> None:
        features[name] = {"ok": ok, "detail": detail}

    try:
        from ..kernel.nft import Nft, native_queue_supported

        nft = Nft()
        feature("libnftables", True, "loaded through the nftables binding")
        native = native_queue_supported(nft)
        feature("nft queue statement", native,
                "native nft_queue" if native else "absent (CONFIG_NFT_QUEUE): the xtables fallback is used")
        tokens = nft.try_run("add table inet mplb_probe_map; add map inet mplb_probe_map t "
                             "{ typeof tcp option @30,32,32 : meta mark; flags timeout; }")
        nft.try_run("delete table inet mplb_probe_map")
        feature("nft token map", tokens, "map on tcp option @30,32,32 with timeouts")
        labels = nft.try_run("add table inet mplb_probe_ct; add chain inet mplb_probe_ct c; "
                             f"add rule inet mplb_probe_ct c ct event set new,destroy,label ct label set {CLOSING_LABEL}")
        nft.try_run("delete table inet mplb_probe_ct")
        feature("conntrack events and labels", labels,
                "ct event set, ct label set (a connection's close is its label's event)")
        dsr = nft.try_run("add table inet mplb_probe_raw; add chain inet mplb_probe_raw c; "
                          "add rule inet mplb_probe_raw c tcp flags & (syn | ack) == syn notrack")
        nft.try_run("delete table inet mplb_probe_raw")
        loose = _read("/proc/sys/net/netfilter/nf_conntrack_tcp_loose")
        feature("direct server return", dsr and loose == "1",
                f"notrack {'works' if dsr else 'refused'}; nf_conntrack_tcp_loose = {loose}")
    except (OSError, ImportError) as e:
        native = False
        feature("libnftables", False, f"cannot load: {e} (apt install libnftables1)")
    xt = next((b for b in ("iptables-nft", "iptables", "iptables-legacy") if shutil.which(b)), None)
    feature("xtables NFQUEUE", xt is not None, xt or "no iptables binary (apt install iptables)")
    ip6xt = next((b for b in ("ip6tables-nft", "ip6tables") if shutil.which(b)), None)
    feature("IPv6", Path("/proc/net/if_inet6").exists() and (native or ip6xt is not None),
            f"IPv6 stack {'on' if Path('/proc/net/if_inet6').exists() else 'off'}; queue rule via "
            f"{'nft' if native else ip6xt or 'nothing (apt install iptables)'}")
    for kind, detail in _tunnel_support().items():
        feature(f"tunnel {kind}", detail is None, detail or "can create the device")
    mptcp = _read("/proc/sys/net/mptcp/enabled")
    feature("MPTCP", mptcp == "1", f"net.mptcp.enabled = {mptcp}")
    feature("conntrack", Path("/proc/sys/net/netfilter/nf_conntrack_max").exists(),
            f"nf_conntrack_max = {_read('/proc/sys/net/netfilter/nf_conntrack_max')}")
    forward = _read("/proc/sys/net/ipv4/ip_forward")
    feature("IPv4 forwarding", forward == "1", f"net.ipv4.ip_forward = {forward} (the LB routes the VIP)")
    try:
        import netfilterqueue  # noqa: F401

        feature("NetfilterQueue binding", True, "importable")
    except ImportError as e:
        feature("NetfilterQueue binding", False, str(e))
    needed = ("libnftables", "nft token map", "conntrack events and labels", "NetfilterQueue binding")
    usable = all(features.get(k, {}).get("ok") for k in needed) and (native or xt is not None)
    mode = "native nft queue" if native else ("xtables NFQUEUE on mark bit" if xt else "none")
    return {"features": features, "queue_mode": mode, "usable": usable}


def cluster_report(cluster) -> dict[str, dict]:
    """A balancer of a cluster: can it announce, and does Redis answer with these credentials?
    Redis being away is no reason not to start (the balancer then balances alone)."""
    from .link import connect

    tun = Path("/dev/net/tun").exists()
    features = {"announcement device": {
        "ok": tun or cluster.announce_device is None,
        "detail": "none asked for" if cluster.announce_device is None else
        f"{cluster.announce_device}: /dev/net/tun {'present' if tun else 'missing (modprobe tun)'}"}}
    try:
        connect(cluster).close()
        features["cluster Redis"] = {"ok": True, "detail": f"{cluster.redis} answers as {cluster.username or 'default'}"}
    except Exception as e:
        features["cluster Redis"] = {"ok": False, "detail": f"{cluster.redis}: {e} (the balancer would balance alone)"}
    return features


def backend_report() -> dict:
    """On a backend: is it set up for joins = "announced-port" (deploy/backend-setup.sh --join-port)?
    MPTCP on, the C flag (no joins to the address the client connected to), and the VIP . port
    endpoints it announces to its clients."""
    import subprocess

    features: dict[str, dict] = {}
    mptcp = _read("/proc/sys/net/mptcp/enabled")
    features["MPTCP"] = {"ok": mptcp == "1", "detail": f"net.mptcp.enabled = {mptcp}"}
    initial = _read("/proc/sys/net/mptcp/allow_join_initial_addr_port")
    features["C flag"] = {"ok": initial == "0", "detail": f"net.mptcp.allow_join_initial_addr_port = {initial}"
                          + ("" if initial == "0" else " (clients may join the VIP's own port: set it to 0)")}
    shown = subprocess.run(["ip", "mptcp", "endpoint", "show"], capture_output=True, text=True).stdout.splitlines()
    announced = [(f"[{words[0]}]" if ":" in words[0] else words[0]) + f":{words[2]}"
                 for words in (line.split() for line in shown)
                 if len(words) > 2 and words[1] == "port" and "signal" in words]
    features["announced join ports"] = {"ok": bool(announced), "detail": ", ".join(announced) or
                                        "none (ip mptcp endpoint add VIP port PORT signal)"}
    return {"features": features, "usable": all(f["ok"] for f in features.values())}
