"""Images as evaluators take them: PIL images for encoders, hashed bytes for judges and caches."""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from loraloom.evaluation.errors import EvaluationError

ImageLike = Image.Image | str | os.PathLike | bytes

_MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}


def load_rgb(image: ImageLike) -> Image.Image:
    """An RGB PIL image from a PIL image, a file path or encoded bytes."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    try:
        if isinstance(image, bytes):
            with Image.open(io.BytesIO(image)) as im:
                return im.convert("RGB")
        with Image.open(image) as im:
            return im.convert("RGB")
    except (OSError, SyntaxError) as err:
        raise EvaluationError(f"{image if not isinstance(image, bytes) else '<bytes>'}: cannot be read as an image ({err})") from None


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes without metadata: the same pixels always give the same bytes (and the same cache key)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@dataclass(frozen=True)
class ImageBlob:
    """An encoded image and the sha256 of its bytes as given (the identity judges and caches use)."""

    data: bytes = field(repr=False)
    mime: str
    sha256: str
    source: str | None = None

    @staticmethod
    def of(image: ImageLike | ImageBlob) -> ImageBlob:
        """From a file (its bytes as they are on disk), encoded bytes, or a PIL image (encoded as PNG)."""
        if isinstance(image, ImageBlob):
            return image
        source = None
        if isinstance(image, Image.Image):
            data = encode_png(image.convert("RGB") if image.mode not in ("RGB", "RGBA", "L") else image)
        elif isinstance(image, bytes):
            data = image
        else:
            source = str(image)
            try:
                data = Path(image).read_bytes()
            except OSError as err:
                raise EvaluationError(f"{image}: cannot be read ({err.strerror})") from None
        try:
            with Image.open(io.BytesIO(data)) as im:
                fmt = im.format
        except (OSError, SyntaxError) as err:
            raise EvaluationError(f"{source or '<bytes>'}: not an image ({err})") from None
        if fmt not in _MIME:
            raise EvaluationError(f"{source or '<bytes>'}: {fmt} images are not supported; convert it to PNG or JPEG")
        return ImageBlob(data=data, mime=_MIME[fmt], sha256=hashlib.sha256(data).hexdigest(), source=source)

    def image(self) -> Image.Image:
        return load_rgb(self.data)

    def pixels(self, max_side: int | None = None) -> Image.Image:
        """The RGB image, its long side brought down to `max_side` (bicubic) when it is larger."""
        im = self.image()
        if max_side and max(im.size) > max_side:
            ratio = max_side / max(im.size)
            im = im.resize((max(1, round(im.width * ratio)), max(1, round(im.height * ratio))), Image.Resampling.BICUBIC)
        return im

    def clean_png(self, max_side: int | None = None) -> bytes:
        """What a judge is sent: the pixels only, as PNG. A loraloom PNG's metadata (prompt, LoRA file paths)
        does not leave the machine; the cache key stays the sha256 of the original bytes."""
        return encode_png(self.pixels(max_side))
