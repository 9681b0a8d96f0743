"""Per-LoRA controls the routing layer applies in every method: separate text-encoder and UNet strengths, a
step schedule (start/stop, ramps), block weights, and a spatial mask.

These are the remedies users reach for against concept bleeding when LoRAs are stacked (the LoRA Block Weight
extension's `lbw=`/`start=`/`stop=`, `<lora:name:te:unet>`, regional masks). They multiply a LoRA's gate; a method
never sees them, so Merge, Switch, Composite, … all honour them the same way.

Block weights follow the LoRA Block Weight extension (hako-mikan/sd-webui-lora-block-weight): the same block ids
(`BASE` = the text encoders, `IN00`…, `M00`, `OUT00`…, numbered as the original SD UNet's `input_blocks`,
`middle_block`, `output_blocks`), the same vector lengths (17 and 26 for SD 1.x/2.x, 12 and 20 for SDXL; shorter
lists leave the blocks they do not name at 0, as the extension's `to26` does), the same presets, and a weight of 1
for layers in no block (the time embedding, `conv_out`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .errors import LoraloomError

BLOCKID26 = ["BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12))]
BLOCKID17 = ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", "OUT03", "OUT04", "OUT05", "OUT06", "OUT07",
             "OUT08", "OUT09", "OUT10", "OUT11"]
BLOCKID12 = ["BASE", "IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05"]
BLOCKID20 = ["BASE", *(f"IN{i:02d}" for i in range(9)), "M00", *(f"OUT{i:02d}" for i in range(9))]
BLOCK_LISTS = {17: BLOCKID17, 26: BLOCKID26, 12: BLOCKID12, 20: BLOCKID20}

# The extension's default presets (17 values, SD 1.x order).
LBW_PRESETS: dict[str, str] = {
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
    "ALL0.5": "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5",
}


class ControlError(LoraloomError, ValueError):
    """A control that cannot be applied (bad vector, unknown preset, empty schedule)."""


def block_vector(spec: str | Sequence[float]) -> dict[str, float]:
    """{block id: weight} of a preset name or a vector of 12, 17, 20 or 26 numbers (blocks a short list leaves out
    weigh 0, as in the extension)."""
    if isinstance(spec, str):
        text = LBW_PRESETS.get(spec.strip().upper(), spec)
        try:
            values = [float(v) for v in text.split(",")]
        except ValueError:
            raise ControlError(f"block weights {spec!r}: not a preset ({', '.join(LBW_PRESETS)}) nor a list of numbers") from None
    else:
        values = [float(v) for v in spec]
    ids = BLOCK_LISTS.get(len(values))
    if ids is None:
        raise ControlError(f"block weights need 12, 17, 20 or 26 values (the extension's lists), got {len(values)}")
    weights = dict.fromkeys(BLOCKID26, 0.0)
    weights.update(zip(ids, values, strict=True))
    return weights


_DOWN = re.compile(r"^down_blocks\.(\d+)\.(attentions|resnets|downsamplers)\.(\d+)\.")
_UP = re.compile(r"^up_blocks\.(\d+)\.(attentions|resnets|upsamplers)\.(\d+)\.")


def block_of(component: str, path: str, layers_per_block: int = 2) -> str | None:
    """The block id of a module (diffusers UNet path) as the original SD UNet numbers it; BASE for text encoders;
    None for layers in no block (time embedding, conv_out and its norm)."""
    if component != "unet":
        return "BASE"
    if path.startswith("conv_in"):
        return "IN00"
    if path.startswith("mid_block."):
        return "M00"
    m = _DOWN.match(path)
    if m:
        b, kind, j = int(m.group(1)), m.group(2), int(m.group(3))
        return f"IN{(b + 1) * (layers_per_block + 1):02d}" if kind == "downsamplers" else f"IN{1 + b * (layers_per_block + 1) + j:02d}"
    m = _UP.match(path)
    if m:
        b, kind, j = int(m.group(1)), m.group(2), int(m.group(3))
        per = layers_per_block + 1
        return f"OUT{b * per + per - 1:02d}" if kind == "upsamplers" else f"OUT{b * per + j:02d}"
    return None


def layer_block_weights(weights: Mapping[str, float], component: str, paths, layers_per_block: int = 2) -> dict[str, float]:
    """{module path: weight} of one component's layers under block weights (1 for layers in no block)."""
    out = {}
    for path in paths:
        block = block_of(component, path, layers_per_block)
        out[path] = 1.0 if block is None else float(weights.get(block, 0.0))
    return out


@dataclass(frozen=True)
class Schedule:
    """When a LoRA acts: from `start` to `stop` (fractions of the run in [0, 1], or step numbers when either is
    above 1 — the extension's `start=`/`stop=` are step numbers; `unit` fixes the unit instead), optionally ramped by
    `keyframes`: (position, factor) pairs, linearly interpolated, positions in the same unit."""

    start: float = 0.0
    stop: float | None = None
    keyframes: tuple[tuple[float, float], ...] = ()
    unit: str = "auto"  # "auto": the rule above; "steps" or "fraction" says it (a tag's stop=1 is step 1)

    def __post_init__(self):
        if self.unit not in ("auto", "steps", "fraction"):
            raise ControlError(f"schedule unit {self.unit!r}: use 'steps', 'fraction' or 'auto'")
        if self.start < 0 or (self.stop is not None and self.stop <= self.start):
            raise ControlError(f"schedule start {self.start} / stop {self.stop}: need 0 <= start < stop")
        if self.unit == "fraction" and max(self.start, self.stop or 0.0, *(p for p, _ in self.keyframes)) > 1:
            raise ControlError(f"schedule start {self.start} / stop {self.stop}: fractions of the run lie between 0 and 1")
        if any(b[0] < a[0] for a, b in zip(self.keyframes, self.keyframes[1:])):
            raise ControlError("schedule keyframes must be in increasing position order")

    @property
    def in_steps(self) -> bool:
        if self.unit != "auto":
            return self.unit == "steps"
        return self.start > 1 or (self.stop is not None and self.stop > 1) or any(p > 1 for p, _ in self.keyframes)

    def factor(self, index: int, count: int) -> float:
        """The multiplier at loop step `index` of `count` (0 outside [start, stop))."""
        pos = float(index) if self.in_steps else index / count
        stop = self.stop if self.stop is not None else (count if self.in_steps else 1.0)
        if pos < self.start or pos >= stop:
            return 0.0
        if not self.keyframes:
            return 1.0
        points = list(self.keyframes)
        if pos <= points[0][0]:
            return float(points[0][1])
        for (p0, v0), (p1, v1) in zip(points, points[1:]):
            if pos <= p1:
                return float(v0 + (v1 - v0) * (pos - p0) / (p1 - p0)) if p1 > p0 else float(v1)
        return float(points[-1][1])


@dataclass(frozen=True)
class LoRAControls:
    """A LoRA's controls in one generation. `te`/`unet`: strength multipliers of its text-encoder and UNet parts
    (A1111's `<lora:name:te:unet>`, relative to the LoRA's weight); `blocks`: block weights (preset or vector);
    `schedule`; `mask`: where in the image it acts (see `composition.spatial.mask_from`)."""

    te: float = 1.0
    unet: float = 1.0
    blocks: str | tuple[float, ...] | None = None
    schedule: Schedule | None = None
    mask: object = None
    feather: float = 0.0

    @property
    def is_plain(self) -> bool:
        return self.te == 1.0 and self.unet == 1.0 and self.blocks is None and self.schedule is None and self.mask is None

    @property
    def is_static(self) -> bool:
        """No schedule and no mask: the LoRA can be fused into the weights (block weights and strengths fuse)."""
        return self.schedule is None and self.mask is None


@dataclass(frozen=True)
class Region:
    """A part of the image with its own prompt and LoRAs (Regional Prompter's latent mode, attention couple).

    `mask`: a name (`composition.spatial.NAMED_REGIONS`), a box [x0, y0, x1, y1] in fractions, an array or an image;
    `prompt`/`negative_prompt`: None = the run's; `loras`: names of the LoRAs that act only here."""

    mask: object
    prompt: str | None = None
    negative_prompt: str | None = None
    loras: tuple[str, ...] = ()
    feather: float = 0.0


CONTROL_KEYS = ("name", "weight", "te", "unet", "lbw", "blocks", "start", "stop", "keyframes", "mask", "feather")


def use_from(item) -> tuple[str, float, LoRAControls]:
    """(name, weight, controls) of one entry of a generation's LoRA list: a name; (name, weight); (name, weight,
    LoRAControls); or a mapping with `name`, `weight` and any of `te`, `unet`, `lbw` (or `blocks`), `start`,
    `stop`, `keyframes`, `mask`, `feather`."""
    if isinstance(item, str):
        return item, 1.0, LoRAControls()
    if isinstance(item, Mapping):
        unknown = set(item) - set(CONTROL_KEYS)
        if unknown:
            raise ControlError(f"LoRA entry {dict(item)!r}: unknown key(s) {sorted(unknown)}; known: {', '.join(CONTROL_KEYS)}")
        if "name" not in item:
            raise ControlError(f"LoRA entry {dict(item)!r} needs a name")
        start, stop, frames = item.get("start"), item.get("stop"), item.get("keyframes")
        schedule = None
        if start is not None or stop is not None or frames:
            schedule = Schedule(float(start or 0.0), None if stop is None else float(stop),
                                tuple((float(p), float(v)) for p, v in (frames or ())))
        blocks = item.get("lbw", item.get("blocks"))
        if blocks is not None:
            block_vector(blocks)  # a bad vector or preset fails here
            blocks = blocks if isinstance(blocks, str) else tuple(float(v) for v in blocks)
        controls = LoRAControls(te=float(item.get("te", 1.0)), unet=float(item.get("unet", 1.0)), blocks=blocks,
                                schedule=schedule, mask=item.get("mask"), feather=float(item.get("feather", 0.0)))
        return str(item["name"]), float(item.get("weight", 1.0)), controls
    if len(item) == 3:
        if not isinstance(item[2], LoRAControls):
            raise ControlError(f"LoRA entry {item!r}: the third value must be LoRAControls")
        return str(item[0]), float(item[1]), item[2]
    return str(item[0]), float(item[1]), LoRAControls()
