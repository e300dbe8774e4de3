"""``ringd``: the composition root. Settings -> cores + adapters, in one task group.

Order of a node's life:
  logging -> state dir (node id, boot epoch, lock) -> cluster key -> model files -> ports
  (peer UDP+TCP, HTTP API) -> membership + agreement -> discovery -> serve ->
  on SIGTERM: refuse new requests, announce leave, drain, close. A second signal forces exit.

The rooms it wires: :class:`ringd.control.RingControl` (membership <-> agreement pump),
:class:`ringd.shard.ShardLoader` (this node's layers and the fingerprint proof),
:class:`ringd.runner.Runner` (the request path), :mod:`ringd.report` (status), the
transport, discovery and the HTTP API.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import signal
import time
import zlib
from typing import Any, AsyncIterator, Callable

from ringd.config import Settings
from ringd.core import seal, wire
from ringd.core.requests import FinishEvent, GenerationRequest, TokenEvent
from ringd.errors import ConfigError, ModelError, RingdError, UsageError
from ringd.faults import Fault, Faults
from ringd.net.loop import import_off_loop
from ringd.net.peers import default_advertise, parse_peer, resolve_peer
from ringd.status import Status
from ringd.units import format_size

log = logging.getLogger("ringd.daemon")

Addr = tuple[str, int]
#: Imported off the event loop at start (MLX, mlx-lm and transformers take seconds).
HEAVY_MODULES = ("ringd.control", "ringd.net.api", "ringd.net.transport")


class Daemon:
    """One ringd node: makes the parts, wires them, runs until stopped."""

    def __init__(self, settings: Settings, state: Any, faults: Faults = Faults()) -> None:
        self.settings = settings
        self.state = state  # ringd.state.NodeState
        self.node_id: str = state.node_id
        self.faults = faults
        self._stopping = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._accepting = False  # peer messages are handled once setup is complete

    # ------------------------------------------------------------------ start-up
    async def setup(self) -> None:
        from ringd.compute.memory import usable_memory
        from ringd.compute.mlx_thread import mlx_executor
        from ringd.control import RingControl
        from ringd.core.pipeline import Pipeline
        from ringd.keys import load_or_create_key
        from ringd.core.paths import advertised_addresses
        from ringd.models import ModelLibrary
        from ringd.net.api import ApiServer
        from ringd.net.links import LinkProber, local_interfaces
        from ringd.net.transport import Transport
        from ringd.net.udp import Impairment
        from ringd.provision import Provisioner
        from ringd.runner import Runner, pipeline_config, schedule_config
        from ringd.shard import ShardLoader
        from ringd.weights import Fetcher, WeightServer

        s = self.settings
        key, created = load_or_create_key(s.key_path)
        if created:
            log.warning("created a new cluster key in %s: copy it (mode 0600) to every node of "
                        "this ring", s.key_path)
        self.cluster_id = seal.cluster_id(key)
        self.library = library = ModelLibrary(s.model_store)
        held = await asyncio.to_thread(library.scan)  # hashes new weight files once
        usable, total = usable_memory(s.memory_reserve)
        if s.memory_budget is not None:
            usable = s.memory_budget
        executor = mlx_executor()

        impair = None
        if self.faults.fault is Fault.LOSSY:  # test hook: a bad network, seeded per node
            impair = Impairment(loss=0.02, dup=0.02, reorder=0.02,
                                seed=zlib.crc32(s.node_name.encode()))
        self.transport = Transport(s, node_id=self.node_id, key=key, on_message=self._on_message,
                                   impair=impair)
        self.port = (await self.transport.start())[1]
        host = s.advertise_host or default_advertise(s.bind_host)
        self.addr: Addr = (host, s.advertise_port or self.port)
        self.runner = Runner(Pipeline(self.node_id, pipeline_config(s)), executor=executor,
                             send=self._send,
                             not_ready_reason=lambda: self.control.not_ready_reason(),
                             active_model=lambda: self.control.view.model
                             if self.control.view else None,
                             max_queued=s.max_queued, queue_timeout=s.queue_timeout,
                             schedule=schedule_config(s),
                             on_busy=lambda: asyncio.get_running_loop().call_soon(
                                 lambda: self.control.pump(time.monotonic())))
        self.loader = ShardLoader(s, executor, self.faults.fault)
        local = await asyncio.to_thread(local_interfaces)  # macOS: asks networksetup
        addresses = advertised_addresses(local, bind_host=s.bind_host, advertise_host=host)
        slow = 0.2 if self.faults.fault is Fault.SLOW_SERVE else 0.0
        self.weights = WeightServer(self._send_bulk, library.source_for,
                                    backlog=self._backlog, read_delay=slow)
        self.fetcher = Fetcher(self._send_bulk)
        provisioner = Provisioner(library, self.fetcher,
                                  holders=lambda i: self.control.holders(i), spawn=self._spawn,
                                  on_change=lambda: self.control.pump(time.monotonic()),
                                  names=lambda: self.control.names())
        self.api = ApiServer(NodeBackend(self), host=s.http_host, port=s.http_port,
                             api_key=s.api_key, on_shutdown=self.request_stop)
        self.http_port = await self.api.start()
        self.loader.observe = self.api.metrics.observe_compute
        self.links = LinkProber(lambda addr, msg: self.transport.send(addr, msg, bulk=True),
                                self._link_peers, local=local, pinned=s.data_interface,
                                interval=s.link_probe_interval or 1.0,
                                throughput_interval=s.throughput_probe_interval,
                                quiet=self._quiet, observe=self.api.metrics.observe_link)
        self.control = RingControl(s, self.node_id, self.addr, usable=usable, total=total,
                                   http_port=self.http_port, state=self.state,
                                   transport=self.transport, library=library,
                                   provisioner=provisioner, loader=self.loader,
                                   runner=self.runner, spawn=self._spawn,
                                   fault=self.faults.fault, addresses=addresses)
        self.discovery = None
        if s.mdns:
            from ringd.net.discovery import Discovery

            self.discovery = Discovery(self.node_id, self.cluster_id, self.addr[1], self.http_port,
                                       list(s.mdns_interfaces) or None, on_peer=self._on_peer,
                                       advertise=[s.advertise_host] if s.advertise_host else None)
        self._accepting = True
        log.info("node %s (%s) on %s:%d, HTTP API on %s:%d, offering %s of %s; store %s holds %s",
                 self.node_id, s.node_name, host, self.port, s.http_host, self.http_port,
                 format_size(usable), format_size(total), s.model_store,
                 ", ".join(f"{m.name} ({'whole' if m.whole else 'part'})" for m in held)
                 or "no model (it will be fetched from a peer)")

    # ------------------------------------------------------------------ main loop
    async def run(self) -> None:
        from ringd.service.sdnotify import notify, watchdog_interval
        from ringd.service.watchdog import StallDetector, systemd_watchdog

        s = self.settings
        async with asyncio.TaskGroup() as tg:
            if s.stall_timeout > 0:
                self._keep(tg.create_task(StallDetector(s.stall_timeout).run()))
            interval = watchdog_interval()
            if interval is not None:
                self._keep(tg.create_task(systemd_watchdog(interval)))
            notify(status="starting")
            if not await import_off_loop(HEAVY_MODULES, self._stopping):
                log.info("stopped while starting")
                notify(stopping=True, status="stopped while starting")
                self._cancel_all()
                return
            await self.setup()
            if self.discovery is not None:
                await self.discovery.start()
            self.control.timeline["started"] = time.monotonic() - self.control.started
            seeds = await asyncio.gather(*(asyncio.to_thread(resolve_peer, p) for p in s.peers))
            self.control.join([a for a in seeds if a is not None], time.monotonic())
            notify(status="waiting for peers")
            main = tg.create_task(self._timer_loop())
            if s.link_probe_interval > 0:
                self._keep(tg.create_task(self.links.run()))
            if self.faults.stall_after is not None:
                self._keep(tg.create_task(self._stall(self.faults.stall_after)))
            await self._stopping.wait()
            await self._shutdown()
            main.cancel()
            self._cancel_all()

    async def _stall(self, after: float) -> None:
        """Test hook: block the event loop for good ``after`` seconds once the ring is ready,
        as a hung call would; the stall detector must end the process."""
        await self.control.ready.wait()
        await asyncio.sleep(after)
        log.warning("%s is set: blocking the event loop (test hook)", "RINGD_TEST_STALL_AFTER")
        while True:
            time.sleep(1.0)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._keep(task)
        return task

    def _keep(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _cancel_all(self) -> None:
        for t in list(self._tasks):
            t.cancel()

    async def _timer_loop(self) -> None:
        control = self.control
        while True:
            at = control.get_timer()
            delay = max(0.0, at - time.monotonic()) if at is not None else 1.0
            control.wake.clear()
            try:
                await asyncio.wait_for(control.wake.wait(), timeout=min(delay, 1.0))
            except asyncio.TimeoutError:
                pass
            control.handle_timer(time.monotonic())

    # ------------------------------------------------------------------ inputs
    def _on_message(self, sender: str, addr: Addr, msg: wire.Message) -> None:
        if not self._accepting:
            return  # a fast peer's first gossip can arrive while this node is still starting
        if isinstance(msg, wire.Gossip):
            self.control.receive_gossip(msg.payload, addr, time.monotonic())
        elif isinstance(msg, wire.FetchRequest):
            self.weights.receive(msg, sender)
        elif isinstance(msg, wire.FetchReply):
            self.fetcher.receive(msg, sender)
        elif isinstance(msg, (wire.LinkProbe, wire.LinkEcho)):
            self.links.receive(msg, sender, addr, time.monotonic())
        else:
            self.runner.receive(msg, sender)

    def _on_peer(self, peer: Any) -> None:
        if self._accepting:
            for a in peer.addresses:
                self.control.add_peer_address((a, peer.port), time.monotonic())

    def data_address(self, node_id: str, *, bulk: bool = False) -> Addr | None:
        """Where frames to ``node_id`` go: bulk ones (TCP) by the path the link measurements
        chose; the others by its membership address (the UDP endpoint numbers packets per
        address, so a peer must hear this node's UDP frames by one address)."""
        if bulk:
            chosen = self.links.address_for(node_id)
            if chosen is not None:
                return chosen
        return self.control.address_of(node_id)

    def _link_peers(self) -> list[Any]:
        """The live peers and the addresses they advertise, for the link prober."""
        from ringd.net.links import Peer

        metas = self.control.metas()
        return [Peer(m.node_id, m.name, m.addr,
                     metas[m.node_id].addresses if m.node_id in metas else ())
                for m in self.control.membership.live_members() if m.node_id != self.node_id]

    def _quiet(self) -> bool:
        """No request runs here (as entry or stage): paths may change, throughput be probed."""
        runner = self.runner
        return runner.idle.is_set() and not getattr(runner.pipeline, "active_stages", 0)

    def _send(self, node_id: str, msg: wire.Message, *, bulk: bool = False) -> None:
        """Data plane out: to a member by its address (``bulk``: weights, always TCP)."""
        addr = self.data_address(node_id, bulk=bulk)
        if addr is None:
            log.warning("no address for node %s; dropping %s", node_id[:8], type(msg).__name__)
            return
        self.transport.send(addr, msg, bulk=bulk)

    def _send_bulk(self, node_id: str, msg: wire.Message) -> None:
        self._send(node_id, msg, bulk=True)

    def _backlog(self, node_id: str) -> int:
        """Bytes queued on the TCP connection to ``node_id`` (a peer that does not read)."""
        addr = self.data_address(node_id, bulk=True)
        return self.transport.queued_bytes(addr) if addr is not None else 0

    def request_stop(self) -> None:
        self._stopping.set()

    # ------------------------------------------------------------------ shutdown
    async def _shutdown(self) -> None:
        from ringd.service.sdnotify import notify

        s = self.settings
        notify(stopping=True, status="leaving the ring")
        log.info("leaving the ring")
        self.runner.pipeline.leaving = True
        try:
            await asyncio.wait_for(self.runner.idle.wait(), s.shutdown_timeout)
        except asyncio.TimeoutError:
            log.warning("requests still running after %g s (shutdown_timeout): failing them",
                        s.shutdown_timeout)
            self.runner.stop_serving(
                f"node {s.node_name} is shutting down and ended the requests still running "
                f"after shutdown_timeout ({s.shutdown_timeout:g} s)", code="leaving")
        control = self.control
        control.leave(time.monotonic())
        self._accepting = False  # from here on only the leave gossip goes out
        t_end = time.monotonic() + min(2.0, s.shutdown_timeout)
        while not control.membership.leave_complete and time.monotonic() < t_end:
            at = control.get_timer()  # gossip rounds carry the leave
            await asyncio.sleep(max(0.0, min(t_end, at or t_end) - time.monotonic()))
            control.handle_timer(time.monotonic())
        await self.runner.close()
        self.weights.close()
        self.library.close()
        await self.api.close()
        if self.discovery is not None:
            await self.discovery.close()
        await self.transport.close()
        log.info("stopped")


class NodeBackend:
    """The Backend the HTTP API sees: generation from the runner, status from the node."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    async def trace(self, prompt: str, steps: int) -> dict[str, Any]:
        """Greedy tokens with their logits and the route taken (``POST /ringd/verify``)."""
        return await self.daemon.runner.trace(prompt, steps)

    def served_models(self) -> list[str]:
        return self.daemon.runner.served_models()

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent | FinishEvent]:
        return self.daemon.runner.generate(request)

    def status(self) -> Status:
        from ringd.report import node_status

        return node_status(self.daemon)

    def use_model(self, name: str) -> dict[str, Any]:
        """``POST /ringd/model/use``: make ``name`` the ring's model."""
        version = self.daemon.control.use_model(name, time.monotonic())
        return {"model": name, "version": version}


# ---------------------------------------------------------------------- entry point
async def _amain(settings: Settings, state: Any, faults: Faults) -> None:
    daemon = Daemon(settings, state, faults)
    loop = asyncio.get_running_loop()
    signals_seen = 0

    def on_signal(signame: str) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen > 1:
            log.warning("second %s: exiting now", signame)
            os._exit(1)
        log.info("%s received: stopping", signame)
        daemon.request_stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)
    await daemon.run()


def _ringd_errors(exc: BaseException) -> list[RingdError]:
    """The RingdErrors in ``exc`` (the task group wraps them); [] if anything else is in it."""
    if isinstance(exc, RingdError):
        return [exc]
    if isinstance(exc, BaseExceptionGroup):
        found = [_ringd_errors(e) for e in exc.exceptions]
        return [e for sub in found for e in sub] if all(found) else []
    return []


def run_node(settings: Settings, *, echo: Callable[[str], None]) -> int:
    """Run a node until it is stopped; returns the exit code. ``echo`` shows a fatal error to
    whoever started it (the CLI writes it to stderr)."""
    from ringd.logs import configure_logging, set_node_id
    from ringd.state import NodeState

    configure_logging(settings.log_level, settings.log_json, None)
    if settings.log_level.lower() != "debug":  # ringctl status polls; one line per call is noise
        logging.getLogger("ringd.net.api.access").setLevel(logging.WARNING)
    faulthandler.enable()
    try:
        faults = Faults.from_env(os.environ, settings.node_name)
        state = NodeState.open(settings.state_dir)
    except RingdError as e:
        echo(f"ringd: {e}")
        return 2
    set_node_id(state.node_id)
    try:
        from ringd.net.loop import run as run_loop

        for peer in settings.peers:
            parse_peer(peer)  # a typo fails the start, with the peer named
        run_loop(_amain(settings, state, faults))
    except (RingdError, ExceptionGroup) as exc:
        errors = _ringd_errors(exc)
        if not errors:
            raise
        for e in errors:
            log.error("%s", e)
            echo(f"ringd: {e}")
        return 2 if all(isinstance(e, (ConfigError, UsageError, ModelError)) for e in errors) else 1
    finally:
        state.close()
    return 0

