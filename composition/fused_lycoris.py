"""LyCORIS files for FLUX.1 in kohya module names (lycoris-lora / sd-scripts' LyCORIS: `lora_unet_double_blocks_0_
img_attn_qkv.lokr_w1`, `lora_unet_single_blocks_0_linear1.hada_w1_a`, ComfyUI's `diffusion_model.…` spelling too),
which diffusers' FLUX converter does not read (it converts `lora_down`/`lora_up` only).

Where each file module goes is still diffusers' decision: one probe LoRA (rank 1, its up factor numbering the output
rows) goes through `FluxLoraLoaderMixin.lora_state_dict`, and the rows each diffusers module receives are read back.
A module that maps onto one diffusers module with its rows in order keeps its adapter as it is (any type). BFL's
fused modules map onto several: `img_attn.qkv` onto `attn.to_q/to_k/to_v` (the text stream's onto
`add_q/k/v_proj`), `single_blocks.N.linear1` onto `to_q/to_k/to_v` and `proj_mlp`; the final layer's modulation
onto `norm_out.linear` with its halves swapped. Their update is the fused weight's change ΔW, split by rows:

- LoRA/LoCon: the up factor's rows (the down factor is shared) — exact, still low rank;
- LoHa: the rows of `hada_w1_a` and `hada_w2_a` ((w1a w1b) ⊙ (w2a w2b) is split row by row) — exact, still LoHa;
- LoKr (ΔW = s · w1 ⊗ w2, w2 with c rows): when every piece starts and ends on a multiple of c, the rows of w1 —
  exact, still LoKr; otherwise (**dense split**) ΔW is formed once from the factors and each diffusers module gets its
  rows as a full diff (a dense (rows × in) tensor per module: on FLUX.1 up to 12288 × 3072 for `proj_mlp`);
- full diffs (`diff`, `diff_b`): their rows;
- LoRA with a bias diff (`lora_down`/`lora_up` + `diff_b`, ComfyUI's "Extract and Save Lora" with bias_diff): the up
  factor's rows and diff_b's (`adapters.LoRABias`); a module that maps 1:1 keeps it as it is.

Norm-layer diffs (a 1-D `diff`, `diff_b`, `w_norm`/`b_norm` on a `…norm…` module without LoRA factors, e.g. ComfyUI's
`diffusion_model.double_blocks.0.img_attn.norm.query_norm.diff`) are refused by name: FLUX.1's query/key norms are
RMSNorms, which loraloom's norm adapter (LayerNorm/GroupNorm) does not cover, and diffusers drops them too.

DoRA, OFT/BOFT, Tucker and norm adapters on a fused module are refused by name (their update is not a sum of
per-row pieces loraloom keeps).
"""

from __future__ import annotations

import torch

from .adapters import AdapterPartsError, build_adapter
from .errors import LoRAFileError, UnsupportedLoRAFormat
from .lora_formats import KOHYA_PARTS, RawLayer

# FLUX.1's single-block linear1 height (3 · 3072 + 12288): the converter's hard-coded split of it fits this, and
# every other split (thirds, halves) too. The probe's rows are scaled to each module's real height.
PROBE_ROWS = 21504
_SUFFIXES = sorted([*KOHYA_PARTS, "alpha"], key=len, reverse=True)
# Parts that make a kohya-named file a LyCORIS file (plain LoRAs keep going through diffusers' converter).
LYCORIS_PARTS = frozenset(KOHYA_PARTS) - {"lora_down.weight", "lora_up.weight"}
PREFIXES = ("lora_unet_", "lora_te1_", "lora_te_", "diffusion_model.")


def split_key(key: str) -> tuple[str, str] | None:
    """(module name, part) of a kohya-style key (`lora_unet_x.lokr_w1`, `diffusion_model.a.b.hada_w1_a`), or None."""
    for suffix in _SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    return None


def is_lycoris(keys) -> bool:
    """True for a kohya/ComfyUI-named FLUX file with LyCORIS parts (LoHa, LoKr, full diffs, DoRA, …)."""
    for key in keys:
        if key.startswith(PREFIXES):
            parts = split_key(key)
            if parts and parts[1] in LYCORIS_PARTS:
                return True
    return False


def _runs(rows: torch.Tensor) -> list[tuple[int, int]]:
    """Consecutive ascending runs [(start, stop)] of an index vector."""
    breaks = (torch.nonzero(rows.diff() != 1).flatten() + 1).tolist()
    edges = [0, *breaks, len(rows)]
    return [(int(rows[a]), int(rows[b - 1]) + 1) for a, b in zip(edges[:-1], edges[1:])]


def probe_targets(names, to_diffusers, path) -> dict[str, list[tuple[str, str, list[tuple[int, int]]]]]:
    """{file module name: [(component, diffusers module, [(start, stop) probe rows])]}, from one probe LoRA through
    diffusers' converter (`to_diffusers(state_dict)` -> PEFT-named state dict)."""
    from .transformer_loras import _PEFT_KEY, _split

    names = list(names)
    probe = {}
    for i, name in enumerate(names):
        probe[f"{name}.lora_down.weight"] = torch.full((1, 1), float(i), dtype=torch.float64)
        probe[f"{name}.lora_up.weight"] = torch.arange(PROBE_ROWS, dtype=torch.float64).unsqueeze(1)
    converted = to_diffusers(probe)
    downs, ups = {}, {}
    for key, value in converted.items():
        comp, rest = _split(key)
        m = _PEFT_KEY.match(rest)
        if m is None:
            raise LoRAFileError(path, f"diffusers' converter gave an unexpected key for a LyCORIS module: {key!r}.",
                                "report this file's layout to loraloom.")
        (downs if m.group(2) == "A" else ups)[(comp, m.group(1))] = value
    out: dict[str, list] = {n: [] for n in names}
    for target, down in downs.items():
        rows = ups[target].flatten().round().long()
        out[names[int(down.flatten()[0])]].append((*target, _runs(rows)))
    missing = [n for n, t in out.items() if not t]
    if missing:
        raise LoRAFileError(path, f"diffusers' FLUX.1 converter maps no diffusers module for {missing[:3]}.",
                            "this LoRA was probably made for another model architecture.")
    return out


def _scaled(runs, height: int, name: str, path) -> torch.Tensor:
    index = []
    for start, stop in runs:
        a, b = start * height, stop * height
        if a % PROBE_ROWS or b % PROBE_ROWS:
            raise LoRAFileError(path, f"module {name} has {height} output rows, which diffusers' split of it does not fit.",
                                "this LoRA was probably made for another model architecture.")
        index.append(torch.arange(a // PROBE_ROWS, b // PROBE_ROWS))
    return torch.cat(index)


def _split_parts(parts: dict[str, torch.Tensor], alpha, idx: torch.Tensor, adapter, dense_cache: dict):
    """The parts (and alpha) of the adapter restricted to output rows `idx`."""
    keys = set(parts)
    if keys == {"down", "up"}:
        return {"down": parts["down"], "up": parts["up"][idx]}, alpha
    if keys == {"down", "up", "diff_b"}:  # LoRA with a bias diff: the up factor's rows and the bias diff's
        return {"down": parts["down"], "up": parts["up"][idx], "diff_b": parts["diff_b"].flatten()[idx]}, alpha
    if keys <= {"diff", "diff_b"}:
        return {k: v[idx] for k, v in parts.items()}, None
    if keys == {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}:
        return {**parts, "hada_w1_a": parts["hada_w1_a"][idx], "hada_w2_a": parts["hada_w2_a"][idx]}, alpha
    if keys & {"lokr_w1", "lokr_w1_a"} and "lokr_t2" not in keys:
        c = adapter._cd()[0]
        blocks = idx.reshape(-1, c) if len(idx) % c == 0 else None
        if blocks is not None and torch.equal(blocks, blocks[:, :1] + torch.arange(c)) and bool((blocks[:, 0] % c == 0).all()):
            w1 = "lokr_w1" if "lokr_w1" in parts else "lokr_w1_a"
            return {**parts, w1: parts[w1][blocks[:, 0] // c]}, alpha
        if "delta" not in dense_cache:  # dense split: ΔW formed once from the factors (scale included)
            dense_cache["delta"] = adapter.delta(torch.float32).to(parts.get("lokr_w1", parts.get("lokr_w1_a")).dtype)
        return {"diff": dense_cache["delta"][idx].contiguous()}, None
    return None, None


def flux_lycoris_layers(state_dict: dict[str, torch.Tensor], to_diffusers, path) -> dict[str, dict[str, RawLayer]]:
    """{component: {diffusers module: RawLayer}} of a LyCORIS file in kohya/ComfyUI FLUX.1 names; fused modules split
    by rows as the module docstring says."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        parts = split_key(key) if key.startswith(PREFIXES) else None
        if parts is None:
            raise LoRAFileError(path, f"has a key loraloom does not read in a FLUX.1 LyCORIS file: {key!r}.",
                                "loraloom reads LyCORIS modules in kohya names (`lora_unet_double_blocks_0_img_attn_qkv.lokr_w1`) "
                                "or ComfyUI's (`diffusion_model.double_blocks.0.img_attn.qkv.lokr_w1`).")
        modules.setdefault(parts[0], {})[parts[1]] = value
    norms = [f"{n}.{p}" for n, keys in modules.items() for p, v in keys.items() if "norm" in n and v.ndim == 1
             and p in ("diff", "diff_b", "w_norm", "b_norm") and "lora_down.weight" not in keys]
    if norms:  # ComfyUI's and LyCORIS' norm diffs: 1-D changes of norm scales (FLUX's query_norm/key_norm are RMSNorms)
        raise UnsupportedLoRAFormat(
            path, f"holds {len(norms)} norm-layer diffs ({', '.join(norms[:3])}{', …' if len(norms) > 3 else ''}), which "
                  "loraloom does not apply in FLUX.1 files (FLUX.1's query/key norms are RMSNorms; diffusers' FLUX "
                  "loader drops norm diffs too).",
            "re-export the LoRA without norm diffs, or delete those keys from the file (diffusers ignores them).")
    targets = probe_targets(modules, to_diffusers, path)
    out: dict[str, dict[str, RawLayer]] = {}
    for name, keys in modules.items():
        alpha_t = keys.pop("alpha", None)
        alpha = None if alpha_t is None else float(alpha_t.flatten()[0])
        parts = {KOHYA_PARTS[k]: v for k, v in keys.items()}
        if not parts:
            raise LoRAFileError(path, f"module {name} has an alpha but no weights.", "the file is incomplete; export it again.")
        try:
            adapter = build_adapter(parts, alpha, name)
        except AdapterPartsError as err:
            raise (UnsupportedLoRAFormat if err.fix else LoRAFileError)(
                path, f"{name}: {err}.", err.fix or "the file is damaged or incomplete; export it again.") from None
        height = _height(parts)
        dense: dict = {}
        for comp, module, runs in targets[name]:
            if len(targets[name]) == 1 and runs == [(0, PROBE_ROWS)]:
                out.setdefault(comp, {})[module] = RawLayer(parts, alpha, name)
                continue
            idx = _scaled(runs, height, name, path)
            split, split_alpha = _split_parts(parts, alpha, idx, adapter, dense)
            if split is None:
                where = ", ".join(m for _, m, _ in targets[name])
                raise UnsupportedLoRAFormat(
                    path, f"module {name} is a {adapter.kind} adapter on a fused BFL module that diffusers splits into "
                          f"{where}; loraloom splits LoRA (with or without a bias diff), LoHa, LoKr (without a Tucker core) and full diffs there, not {adapter.kind}.",
                    "train the adapter without this module, or as LoRA, LoHa or LoKr.")
            out.setdefault(comp, {})[module] = RawLayer(split, split_alpha, f"{name}[{idx[0]}:{idx[-1] + 1}]")
    return out


def _height(parts: dict[str, torch.Tensor]) -> int:
    """The output rows of a module's update, from its factors."""
    if "up" in parts:
        return int(parts["up"].shape[0])
    if "diff" in parts:
        return int(parts["diff"].shape[0])
    if "hada_w1_a" in parts:
        return int(parts["hada_w1_a"].shape[0])
    if "lokr_w1" in parts or "lokr_w1_a" in parts:
        a = parts["lokr_w1"].shape[0] if "lokr_w1" in parts else parts["lokr_w1_a"].shape[0]
        c = parts["lokr_w2"].shape[0] if "lokr_w2" in parts else parts["lokr_w2_a"].shape[0 if "lokr_t2" not in parts else 1]
        return int(a * c)
    if "oft_blocks" in parts:
        b = parts["oft_blocks"]
        return int(b.shape[-3] * b.shape[-1])
    if "w_norm" in parts:
        return int(parts["w_norm"].shape[0])
    return 0
