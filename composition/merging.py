"""Weight-space merging of a subject and a style LoRA into one LoRA (ZipLoRA, LoRA.rar), on factors.

ZipLoRA (Shah et al. 2024, sec. 3.3) merges per column: dW_m = m_c (x) dW_c + m_s (x) dW_s, where
m_c, m_s in R^in and (x) multiplies column j (input dimension j) by m[j]. Scaling the columns of B A scales the
columns of A, so the merged update is exactly a LoRA of rank r_c + r_s:

    B = [w_c s_c B_c | w_s s_s B_s],   A = [A_c diag(m_c) ; A_s diag(m_s)],   alpha = rank (scale 1)

with s = alpha / rank of each source LoRA and w its user weight. Nothing here materialises a dense delta.
Also here: which of two LoRAs is the subject and which the style, and writing a LoRA as a diffusers-layout file.

Other adapter types (`composition.adapters`) enter a column merge as plain LoRA factors (`plain_lora`): exactly where
their update is a low-rank product (Tucker LoCon: mid ∘ down; LoHa: its rank-r² Khatri–Rao factors), else only
when asked, as the truncated SVD of their ΔW to rank `svd_rank` (LoKr, DoRA, OFT, BOFT, full diffs; the relative
Frobenius error of each layer is reported). Norm-layer and bias diffs have no low-rank form and are refused.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from .adapters import Adapter, LoHa, TuckerLoCon
from .errors import LoraloomError
from .files import WritePolicy, write_file
from .lora import LoRA, LoRAInfo, LoRALayer, target_name

SUBJECT_CATEGORIES = ("character", "clothing", "object")
STYLE_CATEGORIES = ("style", "background")
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")

Coefficients = dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]  # component -> module -> (m_c, m_s)


# --- roles -------------------------------------------------------------------------------------------------
def role_of(category: str | None) -> str | None:
    """'subject' for character/clothing/object LoRAs, 'style' for style/background ones, None if unknown."""
    if category in SUBJECT_CATEGORIES:
        return "subject"
    if category in STYLE_CATEGORIES:
        return "style"
    return None


def subject_and_style(loras: Sequence, roles: str = "category", method: str = "this method"):
    """(subject, style) of exactly two LoRAs (objects with `.name` and `.category`).

    roles='category': character/clothing/object is the subject, style/background the style; when the categories
    do not decide (unknown, or both on one side) the given order decides. roles='given': first = subject.
    """
    if len(loras) != 2:
        names = ", ".join(l.name for l in loras) or "none"
        raise LoraloomError(
            f"{method} merges exactly two LoRAs, a subject and a style (got {len(loras)}: {names}). "
            "Fix: pick one subject LoRA (character/clothing/object) and one style LoRA (style/background)."
        )
    if roles not in ("category", "given"):
        raise ValueError(f"roles must be 'category' or 'given', got {roles!r}")
    a, b = loras
    if roles == "category" and role_of(a.category) == "style" and role_of(b.category) != "style":
        return b, a
    if roles == "category" and role_of(b.category) == "subject" and role_of(a.category) != "subject":
        return b, a
    return a, b


def group_by_role(loras: Sequence, roles: str = "category") -> tuple[list, list]:
    """(subjects, styles) of any number of LoRAs, by category; with roles='given' (or unknown categories) the
    first LoRA is the subject group and the rest the style group."""
    if roles == "category":
        subjects = [l for l in loras if role_of(l.category) == "subject"]
        styles = [l for l in loras if role_of(l.category) == "style"]
        if subjects and styles and len(subjects) + len(styles) == len(loras):
            return subjects, styles
    return list(loras[:1]), list(loras[1:])


def projection(module_path: str) -> str:
    """`...attn2.to_out.0` -> `to_out.0`; `...attn1.to_q` -> `to_q`."""
    return "to_out.0" if module_path.endswith("to_out.0") else module_path.rsplit(".", 1)[-1]


def is_attention_projection(module_path: str) -> bool:
    """True for to_q / to_k / to_v / to_out.0 of an attention module (attn1 self-, attn2 cross-attention)."""
    parent = module_path[: -len(projection(module_path))].rstrip(".").rsplit(".", 1)[-1]
    return projection(module_path) in ATTENTION_PROJECTIONS and parent.startswith("attn")


# --- other adapter types as plain LoRA factors ------------------------------------------------------------------
def svd_lora_layer(delta: torch.Tensor, rank: int, source: str | None = None) -> tuple[LoRALayer, float]:
    """The best rank-`rank` LoRA (LoCon for a conv ΔW) of a dense ΔW (truncated SVD, Eckart–Young) and its relative
    Frobenius error ||ΔW - ΔW_r|| / ||ΔW||."""
    d = delta.float()
    flat = d.reshape(d.shape[0], -1)
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    r = max(1, min(int(rank), s.numel()))
    root = s[:r].sqrt()
    up, down = u[:, :r] * root, root[:, None] * vh[:r]
    total = float(s.pow(2).sum())
    err = (float(s[r:].pow(2).sum()) / total) ** 0.5 if total > 0 else 0.0
    if d.ndim == 4:
        return LoRALayer(down.reshape(r, *d.shape[1:]), up.reshape(d.shape[0], r, 1, 1), float(r), source=source), err
    return LoRALayer(down, up, float(r), source=source), err


def as_lora_layer(layer: Adapter, svd_rank: int = 0, where: str = "") -> tuple[LoRALayer, float]:
    """(a LoRALayer with the same update, relative error): exact for LoRA/LoCon, Tucker LoCon and LoHa; the truncated
    SVD of ΔW at `svd_rank` for the other types (0: refused, with the fix)."""
    if layer.bias_delta() is not None and isinstance(layer, LoRALayer):  # LoRABias: the bias has no column form
        raise LoraloomError(f"{where}: a LoRA with a bias diff (diff_b) cannot be merged column-wise (the bias change "
                            "has no columns). Fix: compose this LoRA with merge, switch or composite, or re-export it "
                            "without bias diffs.")
    if isinstance(layer, LoRALayer):
        return layer, 0.0
    if isinstance(layer, TuckerLoCon):
        return layer.as_locon(), 0.0
    if isinstance(layer, LoHa):
        return layer.as_lora_layer(), 0.0
    if layer.bias_delta() is not None or layer.kind == "norm":
        raise LoraloomError(f"{where}: a {layer.kind} adapter with norm-layer or bias diffs has no low-rank form, so it "
                            "cannot be merged column-wise. Fix: compose this LoRA with merge, switch or composite.")
    if svd_rank <= 0:
        raise LoraloomError(f"{where}: a {layer.kind} adapter's update is not a low-rank product, so it cannot enter a "
                            "column-wise merge exactly. Fix: set svd_rank (e.g. 16) to merge the truncated SVD of its ΔW "
                            "(the relative error per layer is reported), or compose it with merge, switch or composite.")
    with torch.no_grad():
        return svd_lora_layer(layer.delta(torch.float32), svd_rank, getattr(layer, "source", None))


def plain_lora(lora: LoRA, svd_rank: int = 0) -> tuple[LoRA, dict]:
    """The LoRA with every layer as plain LoRA factors (`as_lora_layer`), and a report {"converted": n, "svd": n,
    "max_relative_error": e}. A LoRA that is plain already is returned as it is."""
    report = {"converted": 0, "svd": 0, "max_relative_error": 0.0}
    if all(type(l) is LoRALayer for mods in lora.layers.values() for l in mods.values()):
        return lora, report
    layers: dict[str, dict[str, LoRALayer]] = {}
    for comp, mods in lora.layers.items():
        for path, layer in mods.items():
            plain, err = as_lora_layer(layer, svd_rank, f"{lora.name} {comp}.{path}")
            if plain is not layer:
                report["converted"] += 1
                report["svd"] += not isinstance(layer, LoRALayer | TuckerLoCon | LoHa)
                report["max_relative_error"] = max(report["max_relative_error"], err)
            layers.setdefault(comp, {})[path] = plain
    return LoRA(name=lora.name, layers=layers, info=lora.info), report


# --- column-wise merge -------------------------------------------------------------------------------------
def column_merged_layer(
    c: LoRALayer | None, s: LoRALayer | None, m_c: torch.Tensor | None = None, m_s: torch.Tensor | None = None,
    w_c: float = 1.0, w_s: float = 1.0,
) -> LoRALayer:
    """The rank-(r_c + r_s) factors of m_c (x) (w_c dW_c) + m_s (x) (w_s dW_s) (ZipLoRA eq. 3); alpha = rank.

    A missing side (layer only in one LoRA) contributes nothing; m = None means ones (a plain sum). Conv (LoCon)
    layers are merged with m = None only (a column of a conv delta is not one input dimension).
    Differentiable in m_c, m_s (used by the ZipLoRA optimisation and the hypernetwork training).
    """
    downs, ups = [], []
    for layer, m, w in ((c, m_c, w_c), (s, m_s, w_s)):
        if layer is None:
            continue
        if layer.bias_delta() is not None:  # a LoRA with a bias diff: its factors alone would drop the bias
            raise ValueError(f"{layer.source or 'layer'}: a LoRA with a bias diff (diff_b) has no plain low-rank form "
                             "to merge column-wise")
        down = layer.down
        if m is not None:
            if layer.is_conv:
                raise ValueError("column coefficients apply to Linear layers only")
            down = down * m.to(down.dtype)[None, :]
        downs.append(down)
        ups.append(layer.up * (layer.scale * w))
    if not downs:
        raise ValueError("column_merged_layer needs at least one layer")
    down, up = torch.cat(downs, 0), torch.cat(ups, 1)
    return LoRALayer(down, up, float(down.shape[0]))


def merged_lora(
    name: str, subject: LoRA, style: LoRA, coefficients: Coefficients | None = None,
    w_c: float = 1.0, w_s: float = 1.0, description: str = "",
) -> LoRA:
    """One LoRA holding every layer of both: column-merged where `coefficients[component][module]` is given,
    summed elsewhere (and for layers that only one of them has)."""
    coefficients = coefficients or {}
    layers: dict[str, dict[str, LoRALayer]] = {}
    for comp in dict.fromkeys([*subject.layers, *style.layers]):
        cl, sl = subject.layers.get(comp, {}), style.layers.get(comp, {})
        out = {}
        for path in dict.fromkeys([*cl, *sl]):
            m = coefficients.get(comp, {}).get(path)
            m_c, m_s = m if m is not None else (None, None)
            out[path] = column_merged_layer(cl.get(path), sl.get(path), m_c, m_s, w_c, w_s)
        if out:
            layers[comp] = out
    info = _merged_info(name, subject, style, layers, description)
    return LoRA(name=name, layers=layers, info=info)


def _merged_info(name: str, subject: LoRA, style: LoRA, layers, description: str) -> LoRAInfo:
    ranks = {c: sorted({l.rank for l in mods.values()}) for c, mods in layers.items()}
    targets = {c: sorted({target_name(m) for m in mods}) for c, mods in layers.items()}
    triggers = list(dict.fromkeys([*subject.triggers, *style.triggers]))
    return LoRAInfo(
        path=None, name=name, layout="merged", family=subject.info.family or style.info.family,
        family_source="merged", ranks=ranks, targets=targets, num_modules=sum(len(m) for m in layers.values()),
        file_size=0, metadata={"loraloom.merged.description": description} if description else {},
        category=None, triggers=triggers, sidecar={},
    )


def coefficient_similarity(m_c: torch.Tensor, m_s: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """|sim(m_c, m_s)| of one layer, the ZipLoRA penalty term (Shah et al. 2024, eq. 4).

    'cosine': |cos(m_c, m_s)| — what the paper calls it and LoRA.rar computes (the paper's formula writes a dot
    product, see docs/methods/ziplora.md#objective); 'dot': |m_c . m_s| as printed; 'mean_product': mean |m_c * m_s| (mkshing's code).
    """
    if kind == "cosine":
        return torch.nn.functional.cosine_similarity(m_c, m_s, dim=0, eps=1e-8).abs()
    if kind == "dot":
        return (m_c * m_s).sum().abs()
    if kind == "mean_product":
        return (m_c * m_s).abs().mean()
    raise ValueError(f"unknown similarity {kind!r}; use cosine, dot or mean_product")


# --- files -------------------------------------------------------------------------------------------------
def lora_state_dict(lora: LoRA, dtype: torch.dtype | None = torch.float32) -> dict[str, torch.Tensor]:
    """diffusers/PEFT keys (`unet.<module>.lora_A.weight` = down, `.lora_B.weight` = up) with alpha/rank folded
    into `up`, so every layer has scale 1 — what diffusers assumes for a file without alpha data."""
    out = {}
    for comp, mods in lora.layers.items():
        for path, layer in mods.items():
            if type(layer) is not LoRALayer:
                raise LoraloomError(f"{lora.name}: {comp}.{path} is a {layer.kind} adapter; only plain LoRA factors are "
                                    "written in the diffusers layout. Fix: convert it first (merging.plain_lora).")
            down, up = layer.down.detach(), layer.up.detach() * layer.scale
            if dtype is not None:
                down, up = down.to(dtype), up.to(dtype)
            out[f"{comp}.{path}.lora_A.weight"] = down.contiguous().cpu()
            out[f"{comp}.{path}.lora_B.weight"] = up.contiguous().cpu()
    return out


def save_lora_file(lora: LoRA, path: str | Path, policy: WritePolicy, metadata: Mapping[str, str] | None = None,
                   dtype: torch.dtype | None = torch.float32) -> Path:
    """Write a LoRA as an ordinary diffusers-layout `.safetensors` file (loads in loraloom and in diffusers'
    `load_lora_weights`), through the write policy (`composition.files.write_file`)."""
    from safetensors.torch import save_file

    family = lora.info.family
    arch = {"sd1": "stable-diffusion-v1/lora", "sd2": "stable-diffusion-v2/lora", "sdxl": "stable-diffusion-xl-v1-base/lora"}.get(family or "")
    meta = {"modelspec.architecture": arch} if arch else {}
    if lora.triggers:
        meta["modelspec.trigger_phrase"] = ", ".join(lora.triggers)
    meta.update({k: str(v) for k, v in (lora.info.metadata or {}).items()})
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    meta["loraloom.written_by"] = "loraloom"
    tensors = lora_state_dict(lora, dtype)
    return write_file(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta), policy, what="LoRA file")


def lora_fingerprint(lora: LoRA) -> str:
    """sha256 of a LoRA's factors (module names, shapes, fp32 values): identifies a pair for saved coefficients."""
    h = hashlib.sha256()
    for comp in sorted(lora.layers):
        for path in sorted(lora.layers[comp]):
            layer = lora.layers[comp][path]
            tag = "" if type(layer) is LoRALayer else f":{layer.kind}"  # plain LoRAs hash as they always did
            h.update(f"{comp}.{path}:{layer.alpha}{tag}".encode())
            for t in layer.tensors:
                h.update(t.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def save_coefficients(path: str | Path, coefficients: Coefficients, metadata: Mapping[str, str], policy: WritePolicy) -> Path:
    """Per-column merge coefficients as safetensors: `<component>.<module>.m_c` / `.m_s` (through the write policy)."""
    from safetensors.torch import save_file

    flat = {}
    for comp, mods in coefficients.items():
        for module, (m_c, m_s) in mods.items():
            flat[f"{comp}.{module}.m_c"] = m_c.detach().float().contiguous().cpu()
            flat[f"{comp}.{module}.m_s"] = m_s.detach().float().contiguous().cpu()
    meta = {"format": "loraloom-merge-coefficients/1", **{k: str(v) for k, v in metadata.items()}}
    return write_file(path, lambda tmp: save_file(flat, str(tmp), metadata=meta), policy, what="coefficient file")


def load_coefficients(path: str | Path) -> tuple[Coefficients, dict[str, str]]:
    """Coefficients written by `save_coefficients`, or a `LoraloomError` saying the file is not one."""
    from safetensors import SafetensorError, safe_open

    not_ours = f"{path}: not a loraloom merge-coefficient file"
    if not Path(path).is_file():
        raise LoraloomError(f"{not_ours} (not a regular file). Fix: name a file written by ziplora's `coefficients`.")
    out: Coefficients = {}
    try:
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
            if meta.get("format") != "loraloom-merge-coefficients/1":
                raise LoraloomError(f"{not_ours} (format {meta.get('format')!r}). Fix: name a file written by ziplora's "
                                    "`coefficients`, or a path that does not exist yet.")
            keys = list(f.keys())
            tensors = {k: f.get_tensor(k) for k in keys}
        for key in keys:
            if key.endswith(".m_c"):
                comp, module = key[: -len(".m_c")].split(".", 1)
                out.setdefault(comp, {})[module] = (tensors[key], tensors[key[:-4] + ".m_s"])
    except (SafetensorError, OSError, ValueError, KeyError) as err:
        raise LoraloomError(f"{not_ours} ({' '.join(str(err).split())}). Fix: delete it to optimise again.") from None
    return out, meta

