"""The packet and conntrack mark layout, shared by the core, the ruleset and routing: the low 16
bits name the backend, the high bits are flags."""

BACKEND_MASK = 0x0000FFFF
LEARNED = 0x40000000  # kept in ct mark: this connection's token is known, stop queueing its MP_CAPABLE
REJECT = 0x20000000  # transient: nftables answers the packet with a TCP reset
QUEUE = 0x10000000  # transient: the xtables NFQUEUE rule queues packets carrying it
JOIN = 0x08000000  # kept in ct mark: this flow is an added subflow (MP_JOIN), not a new connection
DISPLACEABLE = 0x04000000  # in the token map: a surer teacher may replace it: a client taught it (a third
#   ACK, not a SYN-ACK: it may be forged), or a peer balancer did (a connection here outranks it)
# kept in ct mark: this connection's token came from its client's third ACK (direct server return)
# and is provisional until the connection's next MPTCP packet (a DSS option) shows it is real
PROVISIONAL = 0x02000000
# A conntrack label, not a mark bit: the connection's (or subflow's) first FIN or RST has passed; it no
# longer counts as live (IPVS's active connections end there too). Setting a label is an event of
# its own (IPCT_LABEL), told whatever the packet did to the TCP state; the highest of the 128 bits,
# out of the way of an operator's connlabel.conf names.
CLOSING_LABEL = 127
