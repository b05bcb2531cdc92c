"""``meshrelay``: run a DERP relay. Accepts derper's flags (see ``meshrelay -h``).

SIGHUP re-reads ``-allow-file`` and ``-rate-config`` (a bad file keeps the old settings).

``-workers N`` (N > 1) turns this process into the supervisor of N relay processes
(:mod:`relay._workers`); with ``-workers 1`` the relay serves right here.

Exit status: 0 after a clean shutdown (SIGINT/SIGTERM) or ``-h``/``-version``; 2 for a bad command
line or configuration, with a one-line message saying what is wrong.
"""

from __future__ import annotations

import logging
import math
import signal
import ssl
import sys
from collections.abc import Sequence

import trio

from natlib.keys import NodePrivateKey

from . import __version__
from ._admission import AdmissionPolicy, AllowListError
from ._config import ConfigError, RelayConfig, build_flagset, config_from_args, load_or_create_key
from ._flags import FlagError, HelpRequested
from ._mesh import MeshPeer
from ._metrics import build_registry, serve_metrics
from ._ratelimit import RateConfigError, RateLimits, load_rate_config
from ._server import RelayServer
from ._stun_server import StunStats, serve_stun
from ._workers import Supervisor, WorkerSpec, WorkerSpecError, read_worker_spec, serve_worker

log = logging.getLogger("relay")


def _make_ssl_context(cfg: RelayConfig, key: NodePrivateKey) -> ssl.SSLContext:
    from ._tls import server_context_for_manual_mode

    return server_context_for_manual_mode(cfg.certdir, cfg.hostname, key.public.raw, log=log)


def _admission_and_limits(cfg: RelayConfig) -> tuple[AdmissionPolicy, RateLimits | None]:
    """Load the allow file and the rate config named by ``cfg``; ConfigError if one is bad."""
    try:
        admission = AdmissionPolicy(
            allow_file=cfg.allow_file,
            verify_url=cfg.verify_client_url,
            fail_open=cfg.verify_client_url_fail_open,
        )
    except AllowListError as e:
        raise ConfigError(f"-allow-file {e}") from None
    except ValueError as e:
        raise ConfigError(f"-verify-client-url {e}") from None
    limits = None
    if cfg.rate_config:
        try:
            limits = load_rate_config(cfg.rate_config)
        except RateConfigError as e:
            raise ConfigError(f"-rate-config {e}") from None
    return admission, limits


async def run(cfg: RelayConfig, key: NodePrivateKey, worker: WorkerSpec | None = None) -> None:
    """Serve until SIGINT or SIGTERM, then stop accepting, close every client and return.

    SIGHUP reloads the allow file and the rate config. ``worker``: serve as a worker of a
    ``-workers`` supervisor, on the sockets it handed over; also return when it goes away.
    """
    admission, limits = _admission_and_limits(cfg)
    if admission.allowed is not None:
        log.info("admission: allow file %s with %d node keys", cfg.allow_file, len(admission.allowed))
    if cfg.verify_client_url:
        log.info(
            "admission: asking %s (fail %s)",
            cfg.verify_client_url,
            "open" if cfg.verify_client_url_fail_open else "closed",
        )
    if limits is not None:
        log.info("rate limit: %g bytes/s per client, burst %g bytes", limits.bytes_per_sec, limits.burst)
    if cfg.accept_connection_limit != math.inf and not cfg.tls:
        log.warning("-accept-connection-limit applies to the TLS listener only; this relay has none")
    server = RelayServer(
        key,
        mesh_key=cfg.mesh_key,
        hostname=cfg.hostname,
        write_timeout=cfg.write_timeout,
        derp_enabled=cfg.derp,
        home=cfg.home,
        admission=admission,
        rate_limits=limits,
        rate_config_path=cfg.rate_config,
        accept_connection_limit=cfg.accept_connection_limit,
        accept_connection_burst=cfg.accept_connection_burst,
        sibling_secret=worker.link_secret if worker is not None else None,
        idle_spin=cfg.idle_spin,
    )
    ssl_context = _make_ssl_context(cfg, key) if cfg.tls else None
    stun_stats = StunStats()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            if worker is not None:
                await serve_worker(
                    nursery,
                    server,
                    worker,
                    ssl_context=ssl_context,
                    stun_stats=stun_stats,
                    on_supervisor_gone=nursery.cancel_scope,
                )
            else:
                await _serve(nursery, server, cfg, key, ssl_context, stun_stats)
            mesh_ssl = ssl.create_default_context() if cfg.tls else None
            for target in cfg.mesh_with:
                peer = MeshPeer(server, target, tls=cfg.tls, ssl_context=mesh_ssl)
                nursery.start_soon(peer.run, name=f"mesh {target}")
            async for signum in signals:
                if signum == signal.SIGHUP:
                    log.info("received SIGHUP: reloading the allow file and the rate config")
                    server.reload()
                    continue
                if signum == signal.SIGTERM and cfg.shutdown_grace > 0:
                    await _drain(server, cfg)
                else:
                    log.info("received %s: shutting down", signal.Signals(signum).name)
                server.close_all_connections()
                nursery.cancel_scope.cancel()
                break


async def _serve(
    nursery: trio.Nursery,
    server: RelayServer,
    cfg: RelayConfig,
    key: NodePrivateKey,
    ssl_context: ssl.SSLContext | None,
    stun_stats: StunStats,
) -> None:
    """Open the listeners of a single-process relay in ``nursery`` and log where they are."""
    bound = await nursery.start(
        lambda task_status: server.serve_tcp(
            cfg.listen_host, cfg.listen_port, ssl_context=ssl_context, task_status=task_status
        )
    )
    scheme = "https" if cfg.tls else "http"
    for host, port in bound:
        log.info("serving DERP on %s://%s/derp", scheme, _fmt_addr(host, port))
    log.info("server key nodekey:%s", key.public.hex())
    if cfg.tls and cfg.http_port >= 0:
        side = await nursery.start(
            lambda task_status: server.serve_tcp(
                cfg.listen_host, cfg.http_port, http_side_listener=True, task_status=task_status
            )
        )
        for host, port in side:
            log.info("serving plain HTTP (generate_204, redirects) on %s", _fmt_addr(host, port))
    if cfg.stun:
        # (the STUN server logs the addresses it listens on)
        await nursery.start(serve_stun, cfg.listen_host or None, cfg.stun_port, stun_stats)
    if cfg.metrics_addr is not None:
        registry = build_registry(server, stun_stats)
        metrics_bound = await nursery.start(serve_metrics, *cfg.metrics_addr, registry)
        for host, port in metrics_bound:
            log.info("serving metrics on http://%s/metrics", _fmt_addr(host, port))


async def _drain(server: RelayServer, cfg: RelayConfig) -> None:
    """Graceful restart: tell clients when to come back, stop accepting, let them leave."""
    told = server.announce_restart(cfg.restart_reconnect_in, cfg.restart_try_for)
    server.stop_accepting()
    log.info(
        "received SIGTERM: told %d connections to reconnect in %gs (trying for %gs); "
        "no longer accepting; draining for up to %gs",
        told,
        cfg.restart_reconnect_in,
        cfg.restart_try_for,
        cfg.shutdown_grace,
    )
    with trio.move_on_after(cfg.shutdown_grace):
        await server.table.wait_empty()
    left = server.stats.current_connections
    log.info("drained: %d connections left, closing them", left)


def _only_os_error(e: BaseException) -> OSError | None:
    """The OSError behind ``e`` if that is all there is (nurseries wrap errors in groups)."""
    while isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:
        e = e.exceptions[0]
    return e if isinstance(e, OSError) else None


def _setup_logging(cfg: RelayConfig, tag: str) -> None:
    logging.basicConfig(
        level=cfg.log_level.upper(),
        format=f"%(asctime)s %(levelname)s {tag}%(name)s: %(message)s",
        stream=sys.stderr,
    )


def _fmt_addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    flags = build_flagset()
    try:
        values, given = flags.parse(args)
    except HelpRequested:
        sys.stdout.write(flags.usage())
        return 0
    except FlagError as e:
        sys.stderr.write(f"{e}\n{flags.usage()}")
        return 2
    if values["version"]:
        print(f"meshrelay {__version__} (DERP protocol version 2)")
        return 0
    try:
        cfg = config_from_args(values, given)
        if cfg.internal_worker:
            spec = read_worker_spec()
            _setup_logging(cfg, f"[worker {spec.index}] ")
            trio.run(run, cfg, spec.private_key, spec)
            return 0
        _setup_logging(cfg, "[supervisor] " if cfg.workers > 1 else "")
        key = load_or_create_key(cfg.key_path) if cfg.key_path else NodePrivateKey.generate()
        if cfg.workers > 1:
            # Everything a worker would trip over is checked here, once, before any starts.
            _admission_and_limits(cfg)
            if cfg.tls:
                _make_ssl_context(cfg, key)  # also creates a missing self-signed certificate, once
            return trio.run(Supervisor(cfg, key, args).run)
        trio.run(run, cfg, key)
    except WorkerSpecError as e:
        sys.stderr.write(f"meshrelay: {e}\n")
        return 2
    except ConfigError as e:
        sys.stderr.write(f"meshrelay: {e}\n")
        return 2
    except KeyboardInterrupt:
        return 0
    except (OSError, BaseExceptionGroup) as e:
        # Typically a listen address in use or not permitted: one line, not a traceback.
        cause = _only_os_error(e)
        if cause is None:
            raise
        sys.stderr.write(f"meshrelay: cannot start: {cause}\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
