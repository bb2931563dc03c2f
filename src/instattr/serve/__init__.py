"""``instattr serve``: explore a run in the browser (FastAPI + uvicorn, the ``serve`` extra).

>>> from instattr.serve import create_app       # an ASGI app over one run directory
>>> app = create_app("runs/sst2", **guarded("127.0.0.1"))

The pages and the JSON API under ``/api`` (documented at ``/docs``) read the run directory and
rank through :class:`instattr.ranking.Ranker`; live explanations (new texts, and stored rows
whose scores are not stored) compute, with attributors fitted once at start-up. Nothing here
reaches outside the machine: every asset ships in this package. :func:`serve` and
:func:`running` apply the access rules of :func:`guarded` (token, Host names); an app made with
:func:`create_app` alone has only those it is given.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Sequence

from ..errors import InstattrError


def _needs_extra(e: ImportError) -> InstattrError:
    return InstattrError(f"instattr serve needs FastAPI, uvicorn and Jinja2 ({e.name} is missing): "
                         "pip install 'instattr[serve]'")


def create_app(run_dir, **options):
    """The FastAPI app over the run at ``run_dir`` (see :func:`instattr.serve.app.create_app`)."""
    try:
        from .app import create_app as make
    except ImportError as e:
        raise _needs_extra(e) from None
    return make(run_dir, **options)


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free port); a one-line error when the
    address is taken or not this machine's."""
    if not 0 <= port <= 65535:
        raise InstattrError(f"--port must lie in 0..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise InstattrError(f"--host {host!r}: cannot resolve ({e.strerror})") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise InstattrError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"


def server(run_dir, sock: socket.socket, on_ready: Optional[Callable[[], None]] = None, log_level: str = "warning",
           **options):
    """A ``uvicorn.Server`` for the app over ``run_dir``, to run on the listening ``sock``
    (``server.run(sockets=[sock])``; ``server.should_exit = True`` stops it)."""
    try:
        import uvicorn
    except ImportError as e:
        raise _needs_extra(e) from None
    app = create_app(run_dir, on_ready=on_ready, **options)
    return uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on"))


def guarded(host: str, token: Optional[str] = None, allow_hosts: Sequence[str] = ()) -> dict:
    """The access options of a server bound to ``host`` (:mod:`.security`): off loopback a token
    always (``token``, else ``$INSTATTR_TOKEN``, else a new one); on loopback the Host header must
    name this machine or one of ``allow_hosts`` (a proxy's name), and a token only when one is given."""
    from .security import LOOPBACK_NAMES, check_token, is_loopback, new_token
    token = token or os.environ.get("INSTATTR_TOKEN") or None
    if token is not None:
        check_token(token)
    if is_loopback(host):
        return {"token": token, "hosts": [*LOOPBACK_NAMES, host, *allow_hosts]}     # Guard normalises them
    return {"token": token or new_token(), "hosts": None}


def printed_url(url: str, token: Optional[str]) -> str:
    return url + (f"?token={token}" if token else "")


def serve(run_dir, host: str = "127.0.0.1", port: int = 8000, log: Callable[[str], None] = print,
          token: Optional[str] = None, allow_hosts: Sequence[str] = (), **options) -> None:
    """Serve the run until interrupted; prints the URL (with its token, when it needs one) once the
    app is ready (opens nothing)."""
    access = guarded(host, token, allow_hosts)
    sock = listen(host, port)
    url = url_of(sock)
    try:
        log(f"instattr serve: {run_dir}: loading the model and fitting the live attributors ...")
        srv = server(run_dir, sock, on_ready=lambda: log(f"instattr serve: open {printed_url(url, access['token'])}"
                                                         "  (Ctrl+C stops it)"), **access, **options)
        srv.run(sockets=[sock])
    finally:
        sock.close()


@contextmanager
def running(run_dir, host: str = "127.0.0.1", port: int = 0, timeout: float = 60.0, token: Optional[str] = None,
            **options) -> Iterator[str]:
    """Serve the run from a background thread of this process (tests, notebooks); yields the base
    URL once the server accepts connections and stops it on exit. The same access rules as
    :func:`serve` (give ``token`` to know it)."""
    access = guarded(host, token)
    sock = listen(host, port)
    try:
        srv = server(run_dir, sock, **access, **options)      # the run is read and the attributors fitted here
    except BaseException:
        sock.close()
        raise
    failed = []

    def target():
        try:
            srv.run(sockets=[sock])
        except BaseException as e:  # noqa: BLE001 - reported to the caller below
            failed.append(e)

    thread = threading.Thread(target=target, name="instattr-serve", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not srv.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not srv.started:
            raise InstattrError(f"instattr serve did not start within {timeout:g} s"
                                + (f": {failed[0]!r}" if failed else ""))
        yield url_of(sock)
    finally:
        srv.should_exit = True
        thread.join(timeout=30)
        sock.close()
