"""foodvision-serve: a local web page and a JSON endpoint for the exported classifier.

    foodvision-serve [--model MODEL.onnx] [--examples PREDICTIONS.json] [--photos DIR] [--host 127.0.0.1]
                     [--port 8000] [--token SECRET]

Inside the project the files default to the stages' outputs named in dvc.yaml (`paths.onnx`,
`paths.predictions_json`, `paths.examples`); outside it, give --model. The application is `web.py`.
It runs ONNX Runtime, Pillow and numpy, never torch (a test checks), so it starts in a fraction of a
second; the extra adds three small packages (`pip install -e '.[serve]'`). The model is loaded once; the
page is one static HTML file with no external resources, so it works offline.
`POST /api/predict` (multipart field `image`) answers `{"class", "probability", "probabilities", "ms"}`,
or HTTP 4xx with a one-line `error`.

Here, the connections are bounded: one that has not sent its request within `--timeout` is closed, and
at most MAX_CONNECTIONS are open at once; `web.py` bounds what one request can cost.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

from foodvision.core.errors import FoodVisionError
from foodvision.core.params import ParamsError, project_paths, required_project_paths

REQUEST_SECONDS = 30  # default --timeout: from connecting (or the last answer) to the whole request received
MAX_CONNECTIONS = 2000  # open at once, idle ones included; more are closed as they arrive (file descriptors)
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


def _request_timeout_protocol(seconds: float) -> type:
    """uvicorn's h11 protocol, closing a connection whose next request has not begun within `seconds`
    (uvicorn times out idle keep-alive connections, but not one that sends half a header and waits)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()
            if len(self.server_state.connections) > MAX_CONNECTIONS:  # keep file descriptors for the rest
                transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def _arm(self) -> None:
            self._deadline = self.loop.call_later(seconds, self._expire, self.cycle)

        def _expire(self, cycle: Any) -> None:
            if self.cycle is cycle and not self.transport.is_closing():  # no request began since
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            self._deadline.cancel()
            super().connection_lost(exc)

    return Protocol


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
    parser.add_argument("--timeout", type=float, default=REQUEST_SECONDS,
                        help="seconds a client has to send its whole request (slow or stalled clients are cut off)")
    parser.add_argument("--token", default=os.environ.get(TOKEN_ENV),
                        help=f"a secret every request must carry (?token= or Authorization: Bearer); or ${TOKEN_ENV}")
    args = parser.parse_args(argv)
    if not args.host.strip():
        parser.error("--host is empty: give 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)")
    try:
        import uvicorn

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
    _more_file_descriptors(MAX_CONNECTIONS + 100)
    config = uvicorn.Config(app(classifier, samples, token=args.token, local_only=local, timeout=args.timeout),
                            log_level="warning", http=_request_timeout_protocol(args.timeout),
                            timeout_keep_alive=5, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
