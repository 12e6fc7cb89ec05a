#!/bin/sh
# Prepare a backend for mplb-nfq: hold the VIP(s) on lo without answering ARP/ND for them
# (as for IPVS direct routing), and let MPTCP accept the clients' extra subflows.
#   backend-setup.sh [--join-port PORT] VIP [VIP ...]   e.g. backend-setup.sh 10.0.100.1 fd00:100::1
# --join-port (a service with joins = "announced-port"; PORT is this backend's, `mplb-nfq status`
# shows it): set the C flag (clients open no subflow to the VIP's own port) and announce VIP:PORT,
# where the balancer sends every join to this backend without learning anything.
# Run as root on each backend; running it again changes nothing. Undo: ip addr del VIP dev lo
# (and ip mptcp endpoint flush; sysctl net.mptcp.allow_join_initial_addr_port=1).
set -eu
join_port=""
if [ "${1:-}" = "--join-port" ]; then
    join_port=${2:?--join-port needs a port}
    shift 2
fi
[ $# -ge 1 ] || { echo "usage: $0 [--join-port PORT] VIP [VIP ...]" >&2; exit 2; }

for vip in "$@"; do
    case "$vip" in
        *:*) ip -6 addr replace "$vip/128" dev lo ;;
        *) ip addr replace "$vip/32" dev lo ;;
    esac
done

# Do not answer ARP for the VIP on the real interfaces, and source ARP from the real address.
sysctl -q -w net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2
sysctl -q -w net.ipv4.conf.lo.arp_ignore=1 net.ipv4.conf.lo.arp_announce=2

# Loose reverse-path filtering: with a tunnel from the LB (or direct server return), packets
# arrive on one interface from sources routed through another.
sysctl -q -w net.ipv4.conf.all.rp_filter=2

# MPTCP on, and room for the subflows a client adds (and the addresses it announces).
sysctl -q -w net.mptcp.enabled=1
ip mptcp limits set subflows 4 add_addr_accepted 4

if [ -n "$join_port" ]; then
    sysctl -q -w net.mptcp.allow_join_initial_addr_port=0
    for vip in "$@"; do
        ip mptcp endpoint show | grep -q "^$vip port $join_port " \
            || ip mptcp endpoint add "$vip" port "$join_port" signal
    done
    echo "joins: C flag set, VIP(s) $* announced with port $join_port"
fi

echo "backend ready: VIP(s) $* on lo, arp_ignore=1, arp_announce=2, MPTCP subflows 4"
