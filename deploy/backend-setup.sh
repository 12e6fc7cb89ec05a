#!/bin/sh
# Prepare a backend for mplb-nfq: hold the VIP(s) on lo without answering ARP/ND for them
# (as for IPVS direct routing), and let MPTCP accept the clients' extra subflows.
#   backend-setup.sh VIP [VIP ...]        e.g. backend-setup.sh 10.0.100.1 fd00:100::1
# Run as root on each backend. Undo: ip addr del VIP dev lo.
set -eu
[ $# -ge 1 ] || { echo "usage: $0 VIP [VIP ...]" >&2; exit 2; }

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

echo "backend ready: VIP(s) $* on lo, arp_ignore=1, arp_announce=2, MPTCP subflows 4"
