"""A cluster balancer's share of the worker's loop: the link's pipe watched (the link started
again should it die), this balancer's news flushed every turn, the config's fingerprint sent
after a reload and its own health checks' verdicts when they change, the peers' verdicts taken
into the backends' shared view, and the VIPs announced while a backend is available and the
balancer has caught up from Redis."""
from __future__ import annotations

from ..core.news import Checked
from ..kernel.announce import Announcement
from .controlplane import ControlPlane
from .holding import Holding
from .link import LinkHandle, LinkState, PeerNews
from .loop import Loop
from .peers import Peers


class ClusterTurn:
    def __init__(self, link: LinkHandle, peers: Peers, plane: ControlPlane, held: Holding):
        self.link, self.peers, self.plane, self.held = link, peers, plane, held
        self.loop: Loop | None = None
        self.announcement: Announcement | None = None
        self.fingerprinted = None  # the config the link last heard the fingerprint of
        self.told_down: frozenset[str] | None = None  # this balancer's vote as the link last heard it (None: abstains)

    def start(self, loop: Loop) -> None:
        """In the serving process: a child that held the announcement device would keep the route."""
        self.loop = loop
        self.fingerprinted, self.peers.fingerprint = self.plane.cfg, self.plane.fingerprint()
        self._watch_link()
        device = self.plane.cfg.cluster.announce_device
        self.announcement = Announcement(device) if device else None

    def _watch_link(self) -> None:
        fd = self.link.pipe.fileno()

        def from_link():
            try:
                message = self.link.recv()
            except EOFError:  # started again in a while; meanwhile this balancer balances alone
                self.loop.unwatch(fd)
                message = None
            self.heard(message)

        self.loop.watch(fd, from_link)

    def heard(self, message: LinkState | PeerNews | None) -> None:
        """A message from the link (None: the link is gone)."""
        if message is None or isinstance(message, LinkState):
            self.peers.state = message
            self.plane.set_peer_votes(self.peers.votes())
        else:
            self.peers.news(message)
            self.held.release()  # a join may have waited for this peer's token

    def turn(self) -> None:
        if self.plane.cfg is not self.fingerprinted:  # a reload: peers compare the new one
            self.fingerprinted, self.peers.fingerprint = self.plane.cfg, self.plane.fingerprint()
            self.link.send(self.peers.fingerprint)
            self.plane.set_peer_votes(self.peers.votes())  # a peer's vote counts while its config is this one's
        vote = self.plane.own_vote()
        if vote != self.told_down:
            self.link.send(Checked(vote))
            self.told_down = vote
            self.plane.refresh_view()
        self.peers.flush(self.link)
        if self.link.restart_due():
            self.link.restart(self.peers.fingerprint)
            self.told_down = None
            self._watch_link()
        if self.announcement:
            self.announcement.set(self.plane.any_available() and self.peers.ready_to_announce())
            self.peers.announced = self.announcement.up

    def close(self) -> None:
        if self.announcement:  # first: the router moves this balancer's flows to its peers
            self.announcement.close()
        self.link.stop()
