"""The cluster's one view of its backends' health, from every live balancer's own checks.

The rule: a backend is down when more than half of the balancers that vote see it down; a tie
keeps it up, so that one balancer's trouble reaching a backend (its own link, its own firewall)
does not take the backend out of every table. The voters are this balancer and each peer whose
heartbeat is in Redis and whose config decides as this one's. Every balancer computes the view
from the same votes, so their tables agree once the votes have reached them all."""
from __future__ import annotations

from typing import Collection, Mapping, Sequence


def shared_view(own: Mapping[str, bool], peers_down: Sequence[Collection[str]]) -> dict[str, bool]:
    """backend -> up, as the cluster sees it. own: this balancer's checks (backend -> up);
    peers_down: for each voting peer, the backends its checks see down."""
    voters = 1 + len(peers_down)
    return {name: 2 * ((not up) + sum(name in down for down in peers_down)) <= voters for name, up in own.items()}
