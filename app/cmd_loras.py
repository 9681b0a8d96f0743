"""`loraloom loras DIR`: list the LoRAs in a folder with adapter type, family, rank, resident memory, targets,
category and trigger words."""

from __future__ import annotations

import argparse
import json


def register(sub) -> None:
    p = sub.add_parser("loras", help="list the LoRA files in a folder", description="Describe every LoRA file in a folder "
                       "from its header (no weights are read): adapter type (LoRA, LoCon-Tucker, LoHa, LoKr, DoRA, OFT, "
                       "BOFT, full, norm; '+' joins the types of a file that mixes them), base family, rank, the memory "
                       "it takes when loaded (its tensors + the cache its types build: LoHa's rank-r² or dense form, "
                       "DoRA/OFT vectors and rotations; at the file's dtype), targeted layers, category, trigger words.")
    p.add_argument("folder")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--no-recursive", action="store_true", help="only the folder itself, not sub-folders")
    p.add_argument("--allow-pickle", action="store_true", help="also read .ckpt/.pt/.bin (torch.load weights_only=True)")
    p.set_defaults(func=run)


def _short_targets(targets: dict[str, list[str]]) -> str:
    parts = []
    order = {"unet": 0, "text_encoder": 1, "text_encoder_2": 2}
    for comp in sorted(targets, key=lambda c: order.get(c, 9)):
        label = {"unet": "unet", "text_encoder": "te", "text_encoder_2": "te2"}.get(comp, comp)
        # attn1/attn2/self_attn share projection names; the table shows each kind once (--json has them all)
        names = list(dict.fromkeys(n.split("attn1.")[-1].split("attn2.")[-1].split("self_attn.")[-1] for n in targets[comp]))
        shown = ",".join(names[:6]) + (f",+{len(names) - 6}" if len(names) > 6 else "")
        parts.append(f"{label}:{shown}")
    return " ".join(parts)


def _size(n: int) -> str:
    for unit, scale in (("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n}B"


def _memory(factor_bytes: int, cache_bytes: int) -> str:
    """'3.1M' for a LoRA applied through its factors; '1.0M+2.0M' when its types add a cache while resident."""
    return _size(factor_bytes) + (f"+{_size(cache_bytes)}" if cache_bytes else "")


def run(args: argparse.Namespace) -> int:
    from loraloom.composition.library import scan_loras
    from loraloom.composition.lora_file import lora_name

    entries = scan_loras(args.folder, recursive=not args.no_recursive, allow_pickle=args.allow_pickle)
    if args.json:
        print(json.dumps([
            {**(e.info.to_dict() if e.info else {"path": str(e.path)}), "error": e.error,
             "preview": str(e.preview) if e.preview else None}
            for e in entries
        ], indent=2))
        return 0
    rows = [("name", "type", "family", "rank", "memory", "category", "triggers", "targets")]
    for e in entries:
        if e.info is None:
            rows.append((lora_name(e.path), "ERROR", "", "", "", "", e.error or "", ""))
            continue
        i = e.info
        rows.append((i.name, i.kind, i.family or "?", str(i.rank) if i.rank else "-", _memory(i.factor_bytes, i.cache_bytes),
                     i.category or "-", ", ".join(i.triggers) or "-", _short_targets(i.targets)))
    widths = [min(max(len(r[c]) for r in rows), 48 if c in (6, 7) else 200) for c in range(len(rows[0]))]
    for r in rows:
        print("  ".join((v if len(v) <= widths[c] else v[: widths[c] - 1] + "…").ljust(widths[c]) for c, v in enumerate(r)).rstrip())
    if not entries:
        print(f"(no LoRA files in {args.folder})")
    return 0
