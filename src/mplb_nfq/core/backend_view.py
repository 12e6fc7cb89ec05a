"""The cluster's one view of its backends' health, from every live balancer's own checks.

The rule: a backend is down when more than half of the balancers that vote see it down; a tie
keeps it up, so that one balancer's trouble reaching a backend (its own link, its own firewall)
does not take the backend out of every table. The voters are this balancer and each peer whose
heartbeat is in Redis and whose config decides as this one's. A balancer whose checks have not
run `fall` rounds yet, or that runs none, abstains: it would call every backend up. Every
balancer computes the view from the same votes, so their tables agree once the votes have
reached them all."""
from __future__ import annotations

from typing import Collection, Iterable, Sequence


def shared_view(backends: Iterable[str], votes: Sequence[Collection[str]]) -> dict[str, bool]:
    """backend -> up, as the cluster sees it; votes: for each voting balancer (this one among
    them, unless it abstains), the backends its checks see down. No vote: every backend up."""
    return {name: 2 * sum(name in down for down in votes) <= len(votes) for name in backends}
