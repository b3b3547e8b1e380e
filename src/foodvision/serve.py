"""foodvision-serve: a local web page and a JSON endpoint for the exported classifier.

    foodvision-serve [--model models/model.onnx] [--examples plots/predictions.json] [--host 127.0.0.1]
                     [--port 8000] [--token SECRET]

It runs ONNX Runtime, Pillow and numpy, never torch (a test checks), so it starts in a fraction of
a second; the extra adds three small packages (`pip install -e '.[serve]'`). The model is loaded
once; the page is one static HTML file with no external resources, so it works offline.
`POST /api/predict` (multipart field `image`) answers `{"class", "probability", "probabilities", "ms"}`,
or HTTP 4xx with a one-line `error`.

What one request can cost is bounded: the body (MAX_UPLOAD_MB, counted as it arrives, never more held),
the pixels decoded (`images.PHOTO_MAX_PIXELS`, from the header), DECODE_SLOTS decodes at once, a
connection that has not sent its request within REQUEST_SECONDS is closed. Any web page the user
visits can reach localhost, so requests from another site are refused (`Sec-Fetch-Site`, `Origin`, and
a `Host` that is not this machine: DNS rebinding); with `--token` every request must carry it.
"""

from __future__ import annotations

import argparse
import hmac
import io
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from foodvision.classifier import OnnxClassifier
from foodvision.errors import FoodVisionError
from foodvision.images import READABLE, ImageTooLarge, UnsupportedFormat

MAX_UPLOAD_MB = 20  # a phone photo is 2-8 MB
DECODE_SLOTS = 2  # photos decoded at once: each may take a few hundred MB at PHOTO_MAX_PIXELS
REQUEST_SECONDS = 30  # default --timeout: from connecting (or the last answer) to the whole request received
MAX_CONNECTIONS = 2000  # open at once, idle ones included; more are closed as they arrive (file descriptors)
PAGE = Path(__file__).with_name("static") / "serve.html"
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
TOKEN_ENV = "FOODVISION_TOKEN"


class BadImage(ValueError):
    """An upload the classifier cannot take; its message is the endpoint's one-line `error`."""


class Classifier(OnnxClassifier):
    """The exported model, answering the endpoint: an upload's bytes in, a JSON-ready answer out."""

    def __call__(self, data: bytes) -> dict[str, Any]:
        """Class, probability, every class's probability (highest first) and the milliseconds it took."""
        start = time.perf_counter()
        if not data:
            raise BadImage("empty upload: choose a photo")
        try:
            image = self.load(io.BytesIO(data))
        except ImageTooLarge as exc:
            raise BadImage(f"image too large: {exc}") from None
        except UnsupportedFormat as exc:
            raise BadImage(str(exc)) from None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            raise BadImage(f"a damaged image, or not one this can read ({READABLE})") from None
        probs = self.probabilities(image)
        order = np.argsort(-probs, kind="stable")
        return {"class": self.classes[order[0]], "probability": round(float(probs[order[0]]), 6),
                "probabilities": {self.classes[i]: round(float(probs[i]), 6) for i in order},
                "ms": round(1000 * (time.perf_counter() - start), 1)}


def examples(predictions_json: Path, photos_dir: Path) -> list[dict[str, str]]:
    """The last run's test samples (`predict` stage): one click away on the page.

    Only files the predict stage wrote into `photos_dir` are served, by index: predictions.json is a
    tracked file anyone can edit, and a path in it must not make /etc/passwd an example.
    """
    try:
        results = json.loads(Path(predictions_json).read_text())
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


def app(classifier: Classifier, samples: list[dict[str, str]], *, token: str | None = None,
        local_only: bool = True, timeout: float = REQUEST_SECONDS) -> Any:
    """The Starlette application: the page, the endpoint, the examples, behind the origin and token checks."""
    import anyio
    from starlette.applications import Starlette
    from starlette.datastructures import UploadFile
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from starlette.requests import Request
    from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    def error(message: str, status: int = 400) -> JSONResponse:
        # 408 and 413 leave the rest of the body unread: closing stops the client from sending it anyway
        close = {"Connection": "close"} if status in (408, 413) else None
        return JSONResponse({"error": message}, status_code=status, headers=close)

    html = PAGE.read_text()
    decoding = anyio.CapacityLimiter(DECODE_SLOTS)
    limit = MAX_UPLOAD_MB * 2**20

    def refused(request: Request) -> Response | None:
        """Another site's page, or a request without the token: the answer that refuses it; else None."""
        site = request.headers.get("sec-fetch-site")
        origin = request.headers.get("origin")
        if site in ("cross-site", "same-site") or (origin and origin != f"{request.url.scheme}://{request.url.netloc}"):
            return error("a request from another site's page is refused: open this server's own page", 403)
        if token is not None:
            bearer = request.headers.get("authorization", "").removeprefix("Bearer ")
            given = request.query_params.get("token") or bearer
            if not hmac.compare_digest(given.encode(), token.encode()):
                return error("this server needs its token: open the address with ?token=... that it printed", 401)
        return None

    async def body_within_limit(request: Request) -> bytes | None:
        """The body, read as it arrives; None as soon as it passes the limit (a chunked one has no length)."""
        received = bytearray()
        with anyio.fail_after(timeout):
            async for chunk in request.stream():
                received += chunk
                if len(received) > limit:
                    return None
        return bytes(received)

    async def page(request: Request) -> Response:
        return HTMLResponse(html)

    async def predict(request: Request) -> Response:
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            return error("not a multipart/form-data upload: send the photo in the field `image`")
        too_big = error(f"upload over {MAX_UPLOAD_MB} MB: send a photo", 413)
        length = request.headers.get("content-length", "0")
        if not length.isdigit() or int(length) > limit:
            return too_big if length.isdigit() else error("a Content-Length that is not a number")
        try:
            body = await body_within_limit(request)
        except TimeoutError:
            return error(f"the upload took over {timeout:g} s", 408)
        if body is None:
            return too_big

        async def replay() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            async with Request(request.scope, replay).form(max_files=1, max_fields=10) as form:
                upload = form.get("image")
                if not isinstance(upload, UploadFile):
                    return error("no file in the multipart field `image`")
                data = await upload.read()
        except Exception as exc:  # a malformed body is the client's error, whatever the parser raised
            return error(f"not a multipart/form-data upload ({str(exc).splitlines()[0][:100] if str(exc) else exc!r})")
        try:
            return JSONResponse(await anyio.to_thread.run_sync(classifier, data, limiter=decoding))
        except BadImage as exc:
            return error(str(exc))
        except MemoryError:
            return error("the image needs more memory than this server has free: send a smaller photo", 413)

    async def example_list(request: Request) -> Response:
        return JSONResponse([{"name": s["name"], "true": s["true"], "url": f"/examples/{i}"}
                             for i, s in enumerate(samples)])

    async def example(request: Request) -> Response:
        i = request.path_params["i"]
        if i >= len(samples) or not Path(samples[i]["path"]).is_file():
            return error("no such example (deleted since the server started?)", 404)
        return FileResponse(samples[i]["path"])

    class Guard:
        """Every route behind the origin and token checks, before any of the body is read (plain ASGI:
        BaseHTTPMiddleware would wrap the streamed body that `body_within_limit` counts)."""

        def __init__(self, inner: Any) -> None:
            self.inner = inner

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            answer = refused(Request(scope)) if scope["type"] == "http" else None
            await (answer or self.inner)(scope, receive, send)

    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=list(LOOPBACK))] if local_only else []
    middleware.append(Middleware(Guard))
    return Starlette(routes=[Route("/", page), Route("/api/predict", predict, methods=["POST"]),
                             Route("/api/examples", example_list), Route("/examples/{i:int}", example)],
                     middleware=middleware)


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="foodvision-serve", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/model.onnx"), help="the export stage's file")
    parser.add_argument("--examples", type=Path, default=Path("plots/predictions.json"),
                        help="the predict stage's results: their test samples are the page's examples")
    parser.add_argument("--photos", type=Path, default=Path("data/examples"),
                        help="the folder predict keeps those photos in (paths.examples); nothing else is served")
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
    except ImportError:
        print("error: the web server is an extra: pip install -e '.[serve]'", file=sys.stderr)
        return 2
    try:
        classifier = Classifier(args.model)
    except FoodVisionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    samples = examples(args.examples, args.photos)
    try:  # bound here, not by uvicorn: with --port 0 the banner names the port the OS gave
        sock = socket.create_server((args.host, args.port))
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}; pick another --port",
              file=sys.stderr)
        return 2
    local = args.host in LOOPBACK
    shown_host = f"[{args.host}]" if ":" in args.host and not args.host.startswith("[") else args.host
    query = f"?token={args.token}" if args.token else ""
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
