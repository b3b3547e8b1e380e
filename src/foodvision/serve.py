"""foodvision-serve: a local web page and a JSON endpoint for the exported classifier.

    foodvision-serve [--model MODEL.onnx] [--examples PREDICTIONS.json] [--photos DIR] [--host 127.0.0.1]
                     [--port 8000] [--token SECRET] [--timeout 30] [--max-connections 2000]
                     [--upload-memory-mb 128] [--upload-disk-mb 4096]

Inside the project the files default to the stages' outputs named in dvc.yaml (`paths.onnx`,
`paths.predictions_json`, `paths.examples`); outside it, give --model. The application is `web.py`.
It runs ONNX Runtime, Pillow and numpy, never torch (a test checks), so it starts in a fraction of a
second; the extra adds three small packages (`pip install -e '.[serve]'`). The model is loaded once; the
page is one static HTML file with no external resources, so it works offline.
`POST /api/predict` (multipart field `image`) answers `{"class", "probability", "probabilities", "ms"}`,
or HTTP 4xx/503 with a one-line `error`.

Here, the connections are bounded: one that has not sent its request within `--timeout` is closed, and at
most `--max-connections` are open at once, the quietest idle one making room for a newcomer (`_Policy`);
`web.py` bounds what one request can cost, `uploads.py` what all of them hold together.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import socket
import sys
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import quote

from foodvision.core.errors import FoodVisionError
from foodvision.core.params import ParamsError, project_paths, required_project_paths

MEMORY_MB, DISK_MB = 128, 4096  # uploads held at once, all clients together: in memory, then in files
REQUEST_SECONDS = 30  # default --timeout: from connecting (or the last answer) to the whole request received
MAX_CONNECTIONS = 2000  # open at once, idle ones included (file descriptors): past it the quietest idle one goes
TOKEN_ENV = "FOODVISION_TOKEN"


def examples(predictions_json: Path, photos_dir: Path) -> list[dict[str, str]]:
    """The last run's test samples (`predict` stage): one click away on the page.

    Only files the predict stage wrote into `photos_dir` are served, by index: predictions.json is a
    tracked file anyone can edit, and a path in it must not make /etc/passwd an example.
    """
    try:
        results = json.loads(Path(predictions_json).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    folder = Path(photos_dir).resolve()
    found = []
    for r in results if isinstance(results, list) else []:
        if not (isinstance(r, dict) and r.get("true") and isinstance(r.get("path"), str)):
            continue
        path = Path(r["path"]).resolve()
        if path.parent == folder and path.is_file():
            found.append({"name": Path(str(r.get("source", path.name))).name, "true": str(r["true"]),
                          "path": str(path)})
    return found


class _Policy:
    """The connection policy, mixed into uvicorn's h11 protocol (`_protocol`): a connection whose next request
    has not begun within `seconds` is closed (uvicorn times out idle keep-alive connections, but not one that
    sends half a header and waits); past `max_connections`, the connection that has sent nothing for longest and
    is not in a request makes room for the newcomer, so idle or half-open ones never lock honest clients out;
    at shutdown an upload still arriving is dropped at once (cancelled mid-read, each was a traceback)."""

    seconds: float
    max_connections: int
    cycle: Any
    conn: Any
    loop: Any
    transport: Any
    server_state: Any

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._last_data = self.loop.time()
        self._arm()
        if len(self.server_state.connections) > self.max_connections:
            _quietest(self.server_state.connections, self).transport.close()

    def data_received(self, data: bytes) -> None:
        self._last_data = self.loop.time()
        super().data_received(data)  # type: ignore[misc]

    def idle(self) -> bool:
        """No request of its own in progress: keep-alive between requests, or still sending its headers."""
        return self.cycle is None or self.cycle.response_complete

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        self._arm()

    def _arm(self) -> None:
        self._deadline = self.loop.call_later(self.seconds, self._expire, self.cycle)

    def _expire(self, cycle: Any) -> None:
        if self.cycle is cycle and not self.transport.is_closing():  # no request began since
            self.transport.close()

    def shutdown(self) -> None:
        if self.cycle is not None and not self.cycle.response_complete and self.cycle.more_body:
            self.transport.close()  # its request sees a disconnect: answered by nobody, logged by nobody
        else:
            super().shutdown()  # type: ignore[misc]

    def connection_lost(self, exc: Exception | None) -> None:
        self._deadline.cancel()
        super().connection_lost(exc)  # type: ignore[misc]

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes that are not HTTP, in JSON like every answer (uvicorn's is plain text)."""
        import h11

        body = json.dumps({"error": "not an HTTP/1.1 request this server can read"}).encode()
        for event in (h11.Response(status_code=400, headers=[(b"content-type", b"application/json"),
                                                             (b"connection", b"close")]),
                      h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()


def _protocol(seconds: float, max_connections: int) -> type:
    """uvicorn's h11 protocol under `_Policy` (uvicorn is imported only here: it is an extra)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    return type("Protocol", (_Policy, H11Protocol), {"seconds": seconds, "max_connections": max_connections})


def _quietest(connections: Any, newcomer: Any) -> Any:
    """The connection to close for a newcomer: the idle one that has sent nothing for longest, else the newcomer."""
    idle = [c for c in connections if c is not newcomer and c.idle()]
    return min(idle, key=lambda c: c._last_data) if idle else newcomer


def _more_file_descriptors(wanted: int) -> None:
    """Raise the soft limit on open files towards `wanted` (Linux's default soft limit is 1,024): with fewer,
    half-open connections exhaust them and asyncio logs an accept error per attempt."""
    try:
        import resource
    except ImportError:  # Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _at_least(low: float, kind: type = float) -> Any:
    """An argparse type: a number (of `kind`) not under `low`, else one line saying so."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not low <= value < math.inf:  # NaN fails both
            raise argparse.ArgumentTypeError(f"{text!r} is not a number from {low:g} up")
        return value
    return parse


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number from 0 to 65535")
    return int(text)


def _project_defaults(args: argparse.Namespace) -> None:
    """Unset files are the stages' outputs of the project in the current folder; outside one, only the model
    is needed (no examples then). With --model given, a dvc.yaml that is not this project's (or not valid)
    only costs the examples."""
    if args.model and args.examples and args.photos:
        return
    if args.model is None:
        paths = required_project_paths()
    else:
        try:
            paths = project_paths()
        except ParamsError:
            paths = None
    if paths is not None:
        args.model = args.model or Path(paths.onnx)
        args.examples = args.examples or Path(paths.predictions_json)
        args.photos = args.photos or Path(paths.examples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="foodvision-serve", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="the exported model (default: paths.onnx of ./dvc.yaml)")
    parser.add_argument("--examples", type=Path, help="the predict stage's results, whose test samples are the page's "
                        "examples (default: paths.predictions_json)")
    parser.add_argument("--photos", type=Path, help="the folder predict keeps those photos in; nothing else is "
                        "served (default: paths.examples)")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines (then use --token)")
    parser.add_argument("--port", type=_port, default=8000, help="0 picks a free port (the banner names it)")
    parser.add_argument("--timeout", type=_at_least(0.1), default=REQUEST_SECONDS,
                        help="seconds a client has to send its whole request (slow or stalled clients are cut off)")
    parser.add_argument("--max-connections", type=_at_least(1, int), default=MAX_CONNECTIONS, metavar="N",
                        help="open at once; past it the quietest idle one is closed for a newcomer")
    parser.add_argument("--upload-memory-mb", type=_at_least(0), default=MEMORY_MB, metavar="MB",
                        help="uploads held in memory at once, all clients together (then in temporary files)")
    parser.add_argument("--upload-disk-mb", type=_at_least(0), default=DISK_MB, metavar="MB",
                        help="uploads held in temporary files (TMPDIR) at once; past both, stalled uploads are cut off "
                        "for newcomers, else 503 with Retry-After")
    parser.add_argument("--token", default=os.environ.get(TOKEN_ENV),
                        help=f"a secret every request must carry (?token= or Authorization: Bearer); or ${TOKEN_ENV}")
    args = parser.parse_args(argv)
    if not args.host.strip():
        parser.error("--host is empty: give 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)")
    try:
        import uvicorn
        from PIL import Image

        from foodvision.uploads import keep_big_buffers_out_of_the_heap
        from foodvision.web import LOOPBACK, Classifier, app
    except ImportError:
        print("error: the web server is an extra: pip install -e '.[serve]'", file=sys.stderr)
        return 2
    try:
        _project_defaults(args)
        classifier = Classifier(args.model)
    except FoodVisionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    samples = examples(args.examples, args.photos) if args.examples and args.photos else []
    host = args.host.strip("[]")  # `[::1]` as a URL writes it, `::1` as a socket takes it
    try:  # bound here, not by uvicorn: with --port 0 the banner names the port the OS gave
        sock = socket.create_server((host, args.port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}; pick another --port",
              file=sys.stderr)
        return 2
    local = host in LOOPBACK
    shown_host = f"[{host}]" if ":" in host else host
    query = f"?token={quote(args.token, safe='')}" if args.token else ""  # `+&#` in a token: the URL still works
    print(f"FoodVision: {args.model} ({len(classifier.classes)} classes, {len(samples)} examples) on "
          f"http://{shown_host}:{sock.getsockname()[1]}/{query}", flush=True)
    if not local and not args.token:
        print(f"warning: serving {args.host} without --token: anyone who can reach this port can use it",
              file=sys.stderr, flush=True)
    _more_file_descriptors(args.max_connections + 100)
    keep_big_buffers_out_of_the_heap()
    # Pillow warns of images over 89 megapixels; ours refuses over images.PHOTO_MAX_PIXELS from the header, so a
    # bomb sender would only fill the log
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    site = app(classifier, samples, token=args.token, local_only=local, timeout=args.timeout,
               memory_mb=args.upload_memory_mb, disk_mb=args.upload_disk_mb)
    config = uvicorn.Config(site, log_level="warning", http=_protocol(args.timeout, args.max_connections),
                            timeout_keep_alive=5, timeout_graceful_shutdown=5)
    # uvicorn warns of every request it cannot parse, python-multipart of every malformed body: a client could
    # fill the log with them; the client gets its 400, the log nothing
    logging.getLogger("uvicorn.error").addFilter(lambda record: record.getMessage() != "Invalid HTTP request received.")
    logging.getLogger("python_multipart").setLevel(logging.CRITICAL)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
