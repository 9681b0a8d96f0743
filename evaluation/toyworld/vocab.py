"""The toy world's own CLIP tokenizer: byte-level BPE files (`vocab.json`, `merges.txt`) in which every
toy-world word is exactly one token.

Merges are appended one at a time: while a word still splits, the merge of its first two current pieces is
appended. A new merge has the lowest priority, so it never changes how an already-single-token word splits,
and the merges learned for one word cannot break another (the pitfall of naive left-to-right chains).
"""

from __future__ import annotations

import json
from pathlib import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP byte-level alphabet: 256 printable stand-ins for the 256 byte values (transformers' table, in its order)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode as table

    return list(table().values())


def bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE of one pre-token (the last symbol carries `</w>`)."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b), float("inf")), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:]))]
        best, _ = min(pairs)
        if best == float("inf"):
            break
        pair = next((pieces[i], pieces[i + 1]) for r, i in pairs if r == best)
        out, i = [], 0
        while i < len(pieces):
            if i < len(pieces) - 1 and (pieces[i], pieces[i + 1]) == pair:
                out.append(pieces[i] + pieces[i + 1])
                i += 2
            else:
                out.append(pieces[i])
                i += 1
        pieces = out
    return pieces


def build_bpe(words: list[str]) -> tuple[dict[str, int], list[str]]:
    """(vocab, merges) in which each of `words` (lower-case ASCII letters) is a single token."""
    chars = bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        if not word.isascii() or not word.isalpha() or word != word.lower():
            raise ValueError(f"toy-world words must be lower-case ASCII letters, got {word!r}")
        while len(pieces := bpe(word, ranks)) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            tokens.append(pair[0] + pair[1])
    tokens += [BOS, EOS]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    return vocab, [f"{a} {b}" for a, b in merges]


def write_tokenizer(folder: str | Path, words: list[str], max_length: int = 16):
    """Write vocab.json/merges.txt and save a `CLIPTokenizer` (save_pretrained) into `folder`; return it."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_bpe(words)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tok = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"),
                        pad_token=EOS, model_max_length=max_length)
    check_single_tokens(tok, words)
    tok.save_pretrained(folder)
    return tok


def check_single_tokens(tokenizer, words: list[str]) -> None:
    """Raise if any word is not exactly one token for this tokenizer."""
    bad = {w: tokenizer.tokenize(w) for w in words if len(tokenizer.tokenize(w)) != 1}
    if bad:
        raise ValueError(f"words that are not one token: {bad}")
