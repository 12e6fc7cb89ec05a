"""mplb-nfq: a Multipath-TCP-aware load balancer (nftables, NFQUEUE, policy routing)."""

__version__ = "0.1.0"
