"""Kernel adapters: they translate the config and the core's decisions into kernel state (nftables,
the token map, routes, the queue, conntrack) and hold no policy."""
