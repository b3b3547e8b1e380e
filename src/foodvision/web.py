"""foodvision-serve's web application: the page, `POST /api/predict` and the examples, each request bounded.

What one request can cost is bounded: the body (MAX_UPLOAD_MB, counted as it arrives, never more held),
the pixels decoded (`images.PHOTO_MAX_PIXELS`, from the header) and DECODE_SLOTS decodes at once; what all
of them hold together is bounded by `uploads.Uploads` (memory, then disk, then 503). Any web
page the user visits can reach localhost, so requests from another site are refused (`Sec-Fetch-Site`,
`Origin`, and a `Host` that is not this machine: DNS rebinding); with a token every request must carry it.
"""

from __future__ import annotations

import hmac
import time
from pathlib import Path
from typing import IO, Any

import anyio
import numpy as np
from PIL import Image
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from foodvision.classifier import OnnxClassifier
from foodvision.images import READABLE, ImageTooLarge, UnsupportedFormat
from foodvision.uploads import Busy, ImageField, Upload, Uploads

MAX_UPLOAD_MB = 20  # a phone photo is 2-8 MB
DECODE_SLOTS = 2  # photos decoded at once: each may take a few hundred MB at PHOTO_MAX_PIXELS
RETRY_SECONDS = 2  # Retry-After of a 503
PAGE = Path(__file__).with_name("static") / "serve.html"
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


class BadImage(ValueError):
    """An upload the classifier cannot take; its message is the endpoint's one-line `error`."""


class Classifier(OnnxClassifier):
    """The exported model, answering the endpoint: an upload (a file) in, a JSON-ready answer out."""

    def __call__(self, photo: IO[bytes]) -> dict[str, Any]:
        """Class, probability, every class's probability (highest first) and the milliseconds it took."""
        start = time.perf_counter()
        if not photo.read(1):
            raise BadImage("empty upload: choose a photo")
        photo.seek(0)
        try:
            image = self.load(photo)
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


def error(message: str, status: int = 400, close: bool = False) -> JSONResponse:
    """The one-line JSON answer; `close` when the body was left unread (closing stops the client sending it)."""
    headers = {"Connection": "close"} if close or status in (408, 413, 503) else {}
    if status == 503:
        headers["Retry-After"] = str(RETRY_SECONDS)
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class Site:
    """The routes, sharing the classifier, the examples and the limits."""

    def __init__(self, classifier: Classifier, samples: list[dict[str, str]], timeout: float,
                 uploads: Uploads) -> None:
        self.classifier, self.samples, self.timeout, self.uploads = classifier, samples, timeout, uploads
        self.html = PAGE.read_text(encoding="utf-8")
        self.decoding = anyio.CapacityLimiter(DECODE_SLOTS)
        self.limit = MAX_UPLOAD_MB * 2**20

    async def page(self, request: Request) -> Response:
        return HTMLResponse(self.html)

    async def predict(self, request: Request) -> Response:
        content_type = request.headers.get("content-type", "")
        if not content_type.lower().startswith("multipart/form-data"):  # RFC 9110: no case
            return error("not a multipart/form-data upload: send the photo in the field `image`", close=True)
        length = request.headers.get("content-length")
        if length is not None and not length.isdigit():
            return error("a Content-Length that is not a number", close=True)
        if length is not None and int(length) > self.limit:
            return error(f"upload over {MAX_UPLOAD_MB} MB: send a photo", 413)
        try:
            upload = self.uploads.book(int(length) if length is not None else self.limit)
        except Busy as exc:
            return error(str(exc), 503)
        try:
            with anyio.CancelScope() as scope:
                upload.cut = scope.cancel
                refusal = await self.receive(request, content_type, upload)
            if scope.cancel_called:
                return error("this upload stalled while others waited and was cut off: send the photo at once", 503)
            if refusal is not None:
                return refusal
            try:
                return JSONResponse(await anyio.to_thread.run_sync(self.classifier, upload.photo(),
                                                                   limiter=self.decoding))
            except BadImage as exc:
                return error(str(exc))
            except MemoryError:
                return error("the image needs more memory than this server has free: send a smaller photo", 413)
        finally:
            upload.close()

    async def receive(self, request: Request, content_type: str, upload: Upload) -> Response | None:
        """The body, parsed as it arrives into `upload`; the error answer if it cannot be (else None)."""
        try:
            field = ImageField(content_type, upload)
            with anyio.fail_after(self.timeout):
                async for chunk in request.stream():
                    if upload.received + len(chunk) > self.limit:  # a chunked body declares no length
                        return error(f"upload over {MAX_UPLOAD_MB} MB: send a photo", 413)
                    upload.arrived(len(chunk))
                    field.feed(chunk)
        except TimeoutError:
            return error(f"the upload took over {self.timeout:g} s", 408)
        except ClientDisconnect:  # the client went away mid-upload: nobody to answer, nothing to log
            return error("the client closed the connection during the upload", 400)
        except OSError as exc:  # the temporary folder filled up under this upload
            return error(f"this server cannot hold the upload now ({exc.strerror or exc}): try again shortly", 503)
        except LookupError as exc:
            return error(str(exc))
        except ValueError as exc:  # a malformed body is the client's error
            return error(f"not a multipart/form-data upload ({str(exc).splitlines()[0][:100] if str(exc) else exc!r})",
                         close=not upload.complete)
        return None

    async def example_list(self, request: Request) -> Response:
        return JSONResponse([{"name": s["name"], "true": s["true"], "url": f"/examples/{i}"}
                             for i, s in enumerate(self.samples)])

    async def example(self, request: Request) -> Response:
        i = request.path_params["i"]
        if i >= len(self.samples) or not Path(self.samples[i]["path"]).is_file():
            return error("no such example (deleted since the server started?)", 404)
        return FileResponse(self.samples[i]["path"])


def refused(request: Request, token: str | None, local_only: bool) -> Response | None:
    """Another machine's name in Host (DNS rebinding), another site's page, or a request without the token: the
    answer that refuses it, in JSON like every answer; else None."""
    if local_only and _host_name(request.headers.get("host", "")) not in LOOPBACK:
        return error("this server answers only to this machine's name (127.0.0.1, localhost): "
                     "open the address it printed", 400)
    site = request.headers.get("sec-fetch-site")
    origin = request.headers.get("origin")
    if site in ("cross-site", "same-site") or (origin and origin != f"{request.url.scheme}://{request.url.netloc}"):
        return error("a request from another site's page is refused: open this server's own page", 403)
    if token is not None:
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        bearer = credentials.strip() if scheme.lower() == "bearer" else ""  # auth schemes ignore case (RFC 9110)
        given = request.query_params.get("token") or bearer
        if not hmac.compare_digest(given.encode(), token.encode()):
            return error("this server needs its token: open the address with ?token=... that it printed", 401)
    return None


def _host_name(host: str) -> str:
    """`127.0.0.1:8000` -> `127.0.0.1`, `[::1]:8000` -> `[::1]`; lowercased (names ignore case)."""
    host = host.strip().lower()
    return host[:host.index("]") + 1] if host.startswith("[") and "]" in host else host.rpartition(":")[0] or host


async def _not_here(request: Request, exc: Exception) -> Response:
    """The router's own 404 and 405, as JSON like every other answer."""
    status = getattr(exc, "status_code", 404)
    return error(f"no {request.method} {request.url.path} here (see the page at /)", status)


class Guard:
    """Every route behind the origin and token checks, before any of the body is read (plain ASGI:
    BaseHTTPMiddleware would wrap the streamed body that `body_within_limit` counts)."""

    def __init__(self, inner: Any, token: str | None, local_only: bool) -> None:
        self.inner, self.token, self.local_only = inner, token, local_only

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        answer = refused(Request(scope), self.token, self.local_only) if scope["type"] == "http" else None
        await (answer or self.inner)(scope, receive, send)


def app(classifier: Classifier, samples: list[dict[str, str]], *, token: str | None, local_only: bool,
        timeout: float, memory_mb: float, disk_mb: float) -> Starlette:
    """The Starlette application: the page, the endpoint, the examples, behind the origin and token checks."""
    site = Site(classifier, samples, timeout, Uploads(int(memory_mb * 2**20), int(disk_mb * 2**20)))
    return Starlette(routes=[Route("/", site.page), Route("/api/predict", site.predict, methods=["POST"]),
                             Route("/api/examples", site.example_list), Route("/examples/{i:int}", site.example)],
                     middleware=[Middleware(Guard, token=token, local_only=local_only)],
                     exception_handlers={404: _not_here, 405: _not_here})
