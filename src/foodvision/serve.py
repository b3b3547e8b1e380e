"""foodvision-serve: a local web page and a JSON endpoint for the exported classifier.

    foodvision-serve [--model models/model.onnx] [--examples plots/predictions.json] [--host 127.0.0.1] [--port 8000]

It runs ONNX Runtime, Pillow and numpy, never torch (a test checks), so it starts in a fraction of
a second; the extra adds three small packages (`pip install -e '.[serve]'`). The model is loaded
once; the page is one static HTML file with no external resources, so it works offline.
`POST /api/predict` (multipart field `image`) answers `{"class", "probability", "probabilities", "ms"}`,
or HTTP 400 with a one-line `error`.
"""

from __future__ import annotations

import argparse
import io
import json
import socket
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from foodvision.classifier import OnnxClassifier
from foodvision.errors import FoodVisionError
from foodvision.images import ImageTooLarge

MAX_UPLOAD_MB = 50
PAGE = Path(__file__).with_name("static") / "serve.html"


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
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            raise BadImage("not an image Pillow can read (JPEG, PNG, WebP, ...)") from None
        probs = self.probabilities(image)
        order = np.argsort(-probs, kind="stable")
        return {"class": self.classes[order[0]], "probability": round(float(probs[order[0]]), 6),
                "probabilities": {self.classes[i]: round(float(probs[i]), 6) for i in order},
                "ms": round(1000 * (time.perf_counter() - start), 1)}


def examples(predictions_json: Path) -> list[dict[str, str]]:
    """The last run's test samples (`predict` stage) that are still on disk: one click away on the page."""
    try:
        results = json.loads(Path(predictions_json).read_text())
    except (OSError, ValueError):
        return []
    return [{"name": Path(r["source"]).name, "true": r["true"], "path": r["path"]} for r in results
            if isinstance(r, dict) and r.get("true") and r.get("path") and Path(r["path"]).is_file()]


def app(classifier: Classifier, samples: list[dict[str, str]]) -> Any:
    """The Starlette application: the page, the endpoint, the examples."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile
    from starlette.requests import Request
    from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    def error(message: str, status: int = 400) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    html = PAGE.read_text()

    async def page(request: Request) -> Response:
        return HTMLResponse(html)

    async def predict(request: Request) -> Response:
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            return error("not a multipart/form-data upload: send the photo in the field `image`")
        too_big = error(f"upload over {MAX_UPLOAD_MB} MB: send a photo", 413)
        length = request.headers.get("content-length", "0")
        if not length.isdigit() or int(length) > MAX_UPLOAD_MB * 2**20:
            return too_big if length.isdigit() else error("a Content-Length that is not a number")
        try:
            async with request.form(max_files=1, max_fields=10) as form:
                upload = form.get("image")
                if not isinstance(upload, UploadFile):
                    return error("no file in the multipart field `image`")
                if (upload.size or 0) > MAX_UPLOAD_MB * 2**20:  # a chunked body has no Content-Length
                    return too_big
                data = await upload.read()
        except Exception as exc:  # a malformed body is the client's error, whatever the parser raised
            return error(f"not a multipart/form-data upload ({str(exc).splitlines()[0][:100] if str(exc) else exc!r})")
        try:
            return JSONResponse(await run_in_threadpool(classifier, data))
        except BadImage as exc:
            return error(str(exc))

    async def example_list(request: Request) -> Response:
        return JSONResponse([{"name": s["name"], "true": s["true"], "url": f"/examples/{i}"}
                             for i, s in enumerate(samples)])

    async def example(request: Request) -> Response:
        i = request.path_params["i"]
        if i >= len(samples) or not Path(samples[i]["path"]).is_file():
            return error("no such example (deleted since the server started?)", 404)
        return FileResponse(samples[i]["path"])

    return Starlette(routes=[Route("/", page), Route("/api/predict", predict, methods=["POST"]),
                             Route("/api/examples", example_list), Route("/examples/{i:int}", example)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="foodvision-serve", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/model.onnx"), help="the export stage's file")
    parser.add_argument("--examples", type=Path, default=Path("plots/predictions.json"),
                        help="the predict stage's results: their test samples are the page's examples")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines (no authentication)")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port (the banner names it)")
    args = parser.parse_args(argv)
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
    samples = examples(args.examples)
    try:  # bound here, not by uvicorn: with --port 0 the banner names the port the OS gave
        sock = socket.create_server((args.host, args.port))
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}; pick another --port",
              file=sys.stderr)
        return 2
    print(f"FoodVision: {args.model} ({len(classifier.classes)} classes, {len(samples)} examples) on "
          f"http://{args.host}:{sock.getsockname()[1]}/", flush=True)
    server = uvicorn.Server(uvicorn.Config(app(classifier, samples), log_level="warning"))
    server.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
