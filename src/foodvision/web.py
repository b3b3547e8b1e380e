"""foodvision-serve's web application: the page, `POST /api/predict` and the examples, each request bounded.

What one request can cost is bounded: the body (MAX_UPLOAD_MB, counted as it arrives, never more held),
the pixels decoded (`images.PHOTO_MAX_PIXELS`, from the header) and DECODE_SLOTS decodes at once. Any web
page the user visits can reach localhost, so requests from another site are refused (`Sec-Fetch-Site`,
`Origin`, and a `Host` that is not this machine: DNS rebinding); with a token every request must carry it.
"""

from __future__ import annotations

import hmac
import io
import time
from pathlib import Path
from typing import Any

import anyio
import numpy as np
from PIL import Image
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from foodvision.classifier import OnnxClassifier
from foodvision.images import READABLE, ImageTooLarge, UnsupportedFormat

MAX_UPLOAD_MB = 20  # a phone photo is 2-8 MB
DECODE_SLOTS = 2  # photos decoded at once: each may take a few hundred MB at PHOTO_MAX_PIXELS
PAGE = Path(__file__).with_name("static") / "serve.html"
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


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


def error(message: str, status: int = 400) -> JSONResponse:
    # 408 and 413 leave the rest of the body unread: closing stops the client from sending it anyway
    close = {"Connection": "close"} if status in (408, 413) else None
    return JSONResponse({"error": message}, status_code=status, headers=close)


class Site:
    """The routes, sharing the classifier, the examples and the limits."""

    def __init__(self, classifier: Classifier, samples: list[dict[str, str]], timeout: float) -> None:
        self.classifier, self.samples, self.timeout = classifier, samples, timeout
        self.html = PAGE.read_text(encoding="utf-8")
        self.decoding = anyio.CapacityLimiter(DECODE_SLOTS)
        self.limit = MAX_UPLOAD_MB * 2**20

    async def page(self, request: Request) -> Response:
        return HTMLResponse(self.html)

    async def predict(self, request: Request) -> Response:
        if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):  # RFC 9110: no case
            return error("not a multipart/form-data upload: send the photo in the field `image`")
        too_big = error(f"upload over {MAX_UPLOAD_MB} MB: send a photo", 413)
        length = request.headers.get("content-length", "0")
        if not length.isdigit() or int(length) > self.limit:
            return too_big if length.isdigit() else error("a Content-Length that is not a number")
        try:
            body = await self.body_within_limit(request)
        except TimeoutError:
            return error(f"the upload took over {self.timeout:g} s", 408)
        except ClientDisconnect:  # the client went away mid-upload: nobody to answer, nothing to log
            return error("the client closed the connection during the upload", 400)
        if body is None:
            return too_big
        try:
            data = await self.image_field(request, body)
        except Exception as exc:  # a malformed body is the client's error, whatever the parser raised
            return error(f"not a multipart/form-data upload ({str(exc).splitlines()[0][:100] if str(exc) else exc!r})")
        if data is None:
            return error("no file in the multipart field `image`")
        try:
            return JSONResponse(await anyio.to_thread.run_sync(self.classifier, data, limiter=self.decoding))
        except BadImage as exc:
            return error(str(exc))
        except MemoryError:
            return error("the image needs more memory than this server has free: send a smaller photo", 413)

    async def body_within_limit(self, request: Request) -> bytes | None:
        """The body, read as it arrives; None as soon as it passes the limit (a chunked one has no length)."""
        received = bytearray()
        with anyio.fail_after(self.timeout):
            async for chunk in request.stream():
                received += chunk
                if len(received) > self.limit:
                    return None
        return bytes(received)

    @staticmethod
    async def image_field(request: Request, body: bytes) -> bytes | None:
        """The uploaded file's bytes in the field `image` of the multipart `body` already read; None if absent."""
        async def replay() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        async with Request(request.scope, replay).form(max_files=1, max_fields=10) as form:
            upload = form.get("image")
            return await upload.read() if isinstance(upload, UploadFile) else None

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
        timeout: float) -> Starlette:
    """The Starlette application: the page, the endpoint, the examples, behind the origin and token checks."""
    site = Site(classifier, samples, timeout)
    return Starlette(routes=[Route("/", site.page), Route("/api/predict", site.predict, methods=["POST"]),
                             Route("/api/examples", site.example_list), Route("/examples/{i:int}", site.example)],
                     middleware=[Middleware(Guard, token=token, local_only=local_only)],
                     exception_handlers={404: _not_here, 405: _not_here})
