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

On the diffusion transformers (FLUX.1, SD 3/3.5) the blocks are the transformer's own, numbered as diffusers numbers
them — for FLUX the blocks ComfyUI's block-weight nodes weigh (e.g. Inspire Pack's LoRA Block Weight; BFL's
`double_blocks.N` and `single_blocks.N`, 19 + 38 on FLUX.1): `BASE` (the text encoders), `D00`… (FLUX's
double-stream `transformer_blocks.N`), `S00`… (FLUX's single-stream `single_transformer_blocks.N`), `J00`… (SD3's
joint `transformer_blocks.N`). A vector lists BASE first, as the extension's do, then the blocks in that order
(FLUX.1: 1 + 19 + 38 = 58 values), or the blocks only (BASE = 1). The counts are the loaded transformer's (`dit_block_ids`). The presets
that mean the same on every model (`DIT_PRESETS`: ALL, NONE, ALL0.5) apply; the UNet's (INS, OUTD, …) are refused.
Layers in no block (`x_embedder`, `context_embedder`, `time_text_embed`, `norm_out`, `proj_out`) weigh 1.
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


# The presets whose value is the same in every block, so they mean the same on a diffusion transformer.
DIT_PRESETS: dict[str, float] = {"ALL": 1.0, "NONE": 0.0, "ALL0.5": 0.5}


class ControlError(LoraloomError, ValueError):
    """A control that cannot be applied (bad vector, unknown preset, empty schedule)."""


def block_spec(spec: str | Sequence[float]) -> str | tuple[float, ...]:
    """Block weights as given, checked without knowing the model: a preset's name (upper case) or the numbers of a
    vector (a text of comma-separated numbers is read as one). How many numbers the model takes is checked when it is
    known (`block_vector` for the UNets, `flux_block_vector` / `sd3_block_vector` for the transformers)."""
    if isinstance(spec, str):
        if spec.strip().upper() in LBW_PRESETS:
            return spec.strip().upper()
        try:
            return tuple(float(v) for v in spec.split(","))
        except ValueError:
            raise ControlError(f"block weights {spec!r}: not a preset ({', '.join(LBW_PRESETS)}) nor a list of numbers") from None
    values = tuple(float(v) for v in spec)
    if not values:
        raise ControlError("block weights: an empty list (give a preset or one number per block)")
    return values


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


def dit_block_ids(family: str, num_layers: int, num_single_layers: int = 0) -> list[str]:
    """The block ids of a diffusion transformer in vector order: BASE, then FLUX's double-stream blocks `D00`… and
    single-stream blocks `S00`… (`num_layers`, `num_single_layers` of its config; FLUX.1: 19 and 38), or SD3's joint
    blocks `J00`… (`num_layers`: 24 on SD 3/3.5 Medium, 38 on 3.5 Large)."""
    if family == "flux":
        return ["BASE", *(f"D{i:02d}" for i in range(num_layers)), *(f"S{i:02d}" for i in range(num_single_layers))]
    if family == "sd3":
        return ["BASE", *(f"J{i:02d}" for i in range(num_layers))]
    raise ControlError(f"block weights: no block ids for the {family!r} transformer (known: flux, sd3)")


def _span(ids: Sequence[str], letter: str) -> str:
    own = [b for b in ids if b[0] == letter]
    return f"{own[0]}–{own[-1]}" if len(own) > 1 else own[0] if own else ""


def dit_block_vector(spec: str | Sequence[float], ids: Sequence[str], model: str) -> dict[str, float]:
    """{block id: weight} of a preset (ALL, NONE, ALL0.5) or a vector on a diffusion transformer whose blocks are
    `ids` (`dit_block_ids`, BASE first): len(ids) values in that order, or len(ids) - 1 (the blocks; BASE = 1).
    `model` names the model in messages."""
    blocks = [b for b in ids if b != "BASE"]
    layout = ", ".join(filter(None, (_span(ids, k) for k in "DSJ")))
    lengths = (f"{len(ids)} values (BASE, {layout}) or {len(blocks)} ({layout}; BASE, the text encoders, at 1)")
    try:
        parsed = block_spec(spec)
    except ControlError:
        raise ControlError(f"block weights {spec!r}: not a preset ({', '.join(DIT_PRESETS)} on {model}) nor a list of "
                           f"numbers; {model} takes a vector of {lengths}") from None
    if isinstance(parsed, str):
        if parsed not in DIT_PRESETS:
            raise ControlError(f"block weights {parsed}: a preset of the SD UNet's blocks (IN…, M00, OUT…); {model} has "
                               f"BASE, {layout}. Fix: a preset that means the same here ({', '.join(DIT_PRESETS)}) or a "
                               f"vector of {lengths}")
        return dict.fromkeys(ids, DIT_PRESETS[parsed])
    if len(parsed) == len(ids):
        return dict(zip(ids, parsed, strict=True))
    if len(parsed) == len(blocks):
        return {"BASE": 1.0, **dict(zip(blocks, parsed, strict=True))}
    raise ControlError(f"block weights: {model} takes a vector of {lengths}, got {len(parsed)} values")


def flux_block_vector(spec: str | Sequence[float], num_layers: int = 19, num_single_layers: int = 38) -> dict[str, float]:
    """{block id: weight} on a FLUX.1 transformer of `num_layers` double-stream and `num_single_layers` single-stream
    blocks (FLUX.1: 19 + 38, ComfyUI's `double_blocks` / `single_blocks`): a preset, or 1 + 19 + 38 = 58 values
    (BASE, D00–D18, S00–S37) or 57 (BASE = 1)."""
    return dit_block_vector(spec, dit_block_ids("flux", num_layers, num_single_layers), "FLUX.1")


def sd3_block_vector(spec: str | Sequence[float], num_layers: int = 24) -> dict[str, float]:
    """{block id: weight} on an SD 3/3.5 transformer of `num_layers` joint blocks (24 on Medium, 38 on 3.5 Large): a
    preset, or 1 + num_layers values (BASE, J00, …) or num_layers (BASE = 1)."""
    return dit_block_vector(spec, dit_block_ids("sd3", num_layers), "SD3")


_DOUBLE = re.compile(r"^transformer_blocks\.(\d+)\.")
_SINGLE = re.compile(r"^single_transformer_blocks\.(\d+)\.")


def dit_block_of(component: str, path: str, family: str) -> str | None:
    """The block id of a module of a diffusion transformer (diffusers path) of `family` ("flux" or "sd3"): BASE for
    the text encoders, D/S (FLUX's double/single-stream blocks) or J (SD3's joint blocks) with the block's number;
    None for layers in no block (x_embedder, context_embedder, time_text_embed, norm_out, proj_out)."""
    if component != "transformer":
        return "BASE"
    m = _SINGLE.match(path)
    if m:
        return f"S{int(m.group(1)):02d}" if family == "flux" else None
    m = _DOUBLE.match(path)
    if m:
        return f"{'D' if family == 'flux' else 'J'}{int(m.group(1)):02d}"
    return None


def layer_block_weights(weights: Mapping[str, float], component: str, paths, layers_per_block: int = 2,
                        dit: str | None = None) -> dict[str, float]:
    """{module path: weight} of one component's layers under block weights (1 for layers in no block). `dit`: the
    diffusion transformer's family ("flux", "sd3": `dit_block_of`), or None for a UNet (`block_of`)."""
    out = {}
    for path in paths:
        block = block_of(component, path, layers_per_block) if dit is None else dit_block_of(component, path, dit)
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
    """A LoRA's controls in one generation. `te`/`unet`: strength multipliers of its text-encoder and denoiser parts
    (A1111's `<lora:name:te:unet>`, relative to the LoRA's weight; on FLUX.1 and SD3 `unet` is the transformer's
    strength); `blocks`: block weights (preset or vector);
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
            # an unknown preset or a non-number fails here; the length when the model is known (`Run`)
            parsed = block_spec(blocks)
            blocks = blocks if isinstance(blocks, str) else parsed
        controls = LoRAControls(te=float(item.get("te", 1.0)), unet=float(item.get("unet", 1.0)), blocks=blocks,
                                schedule=schedule, mask=item.get("mask"), feather=float(item.get("feather", 0.0)))
        return str(item["name"]), float(item.get("weight", 1.0)), controls
    if len(item) == 3:
        if not isinstance(item[2], LoRAControls):
            raise ControlError(f"LoRA entry {item!r}: the third value must be LoRAControls")
        return str(item[0]), float(item[1]), item[2]
    return str(item[0]), float(item[1]), LoRAControls()
