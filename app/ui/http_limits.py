"""Per-type size limits on uploads, at the HTTP layer, before Gradio writes a byte to disk.

Gradio has one `max_file_size` for every upload. The workbench takes two kinds of file with very different sizes:
PNGs to reproduce (`max_png_mb`, 20 MB) and LoRAs for the library (`max_lora_mb`, 1 GB). `UploadLimits` is an ASGI
middleware on Gradio's upload route: it reads the first part's headers of the multipart body (the file's name),
works out the file's size from `Content-Length`, and answers 413 — naming the type and its limit — when the file
is larger than its type allows (any other type, and LoRAs when uploads of LoRAs are off, get the PNG limit, the
smallest). Nothing of a refused upload reaches Gradio, so nothing of it is written to the temporary folder.
Gradio's own `max_file_size` (the largest limit) stays in place behind it for the other routes that take files.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import PurePosixPath

from .uploads import human_size

FILENAME = re.compile(rb'filename\*?=(?:"([^"]*)"|([^;\r\n]*))', re.IGNORECASE)
BOUNDARY = re.compile(rb'boundary="?([^";]+)"?', re.IGNORECASE)
HEAD_BYTES = 64 * 1024  # the first part's headers must come within this many bytes
DRAIN_BYTES = 4 << 20  # read (and drop) this much of a refused body, so the client reads the answer, not a reset


class UploadLimits:
    """ASGI middleware: refuse an upload (`POST …/upload`) larger than its type's limit, by file-name suffix."""

    def __init__(self, app, limits: Mapping[str, int], default: int, path_suffix: str = "/upload"):
        self.app = app
        self.limits = {k.lower(): int(v) for k, v in limits.items()}
        self.default = int(default)
        self.path_suffix = path_suffix

    def limit_for(self, name: str) -> tuple[int, str]:
        """(bytes allowed, how the type is named) for a file called `name`."""
        suffix = PurePosixPath(name.replace("\\", "/")).suffix.lower()
        if suffix in self.limits:
            return self.limits[suffix], f"a {suffix} file"
        return self.default, "this file type"

    async def __call__(self, scope, receive, send):
        if (scope["type"] != "http" or scope.get("method") != "POST"
                or not scope.get("path", "").rstrip("/").endswith(self.path_suffix)):
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        length = headers.get(b"content-length", b"")
        if not length.isdigit():
            await _answer(send, 411, "An upload must state its size (Content-Length).")
            return
        length = int(length)
        boundary = BOUNDARY.search(headers.get(b"content-type", b""))
        tail = len(b"\r\n--" + boundary.group(1) + b"--\r\n") if boundary else 0
        messages, head, more = [], b"", True
        while more and len(head) < HEAD_BYTES and not _headers_done(head):
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            messages.append(message)
            head += message.get("body", b"")
            more = message.get("more_body", False)
        found = FILENAME.search(head)
        if found:
            name = (found.group(1) or found.group(2) or b"").decode("utf-8", "replace").strip()
            limit, kind = self.limit_for(name)
            start = head.find(b"\r\n\r\n", found.end())
            size = length - (start + 4 if start >= 0 else 0) - tail
            if size > limit:
                await _drain(receive, more, length - len(head))
                await _answer(send, 413, f"The uploaded file {name!r} is {human_size(size)}; {kind} may be at most "
                                         f"{human_size(limit)} on this server.")
                return

        async def replay():
            if messages:
                return messages.pop(0)
            return await receive()

        await self.app(scope, replay, send)


def _headers_done(head: bytes) -> bool:
    """True once the body holds a file part's name and the blank line that ends that part's headers."""
    found = FILENAME.search(head)
    return bool(found) and head.find(b"\r\n\r\n", found.end()) >= 0


async def _drain(receive, more: bool, left: int) -> None:
    read = 0
    while more and read < min(left, DRAIN_BYTES):
        message = await receive()
        if message["type"] != "http.request":
            return
        read += len(message.get("body", b""))
        more = message.get("more_body", False)


async def _answer(send, status: int, text: str) -> None:
    body = text.encode("utf-8")
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
