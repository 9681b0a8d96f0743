"""The `loraloom` command line. Each subcommand lives in `app/cmd_<name>.py`, which defines
`register(subparsers)`: it adds its parser and sets `func` (called with the parsed arguments, returns an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys

from loraloom.composition.errors import LoraloomError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraloom", description="Compose several LoRAs in one diffusion generation.")
    parser.add_argument("-v", "--verbose", action="store_true", help="more logging")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    import loraloom.app as app

    for mod in sorted(m.name for m in pkgutil.iter_modules(app.__path__) if m.name.startswith("cmd_")):
        importlib.import_module(f"loraloom.app.{mod}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("loraloom: interrupted; everything written so far is kept.", file=sys.stderr)
        return 130
    except Exception as err:
        if args.debug:
            raise
        code, line = error_line(err)
        print(f"loraloom: error: {line}", file=sys.stderr)
        return code


def error_line(err: BaseException) -> tuple[int, str]:
    """(exit code, one line) for an error: 2 for what the user can fix (loraloom's own errors, files and paths,
    memory), 1 for anything unexpected (a bug: `--debug` shows where)."""
    text = " ".join(str(err).split())
    if isinstance(err, LoraloomError):
        return 2, text
    if isinstance(err, OSError):
        where = f"{err.filename}: " if getattr(err, "filename", None) else ""
        return 2, f"{where}{err.strerror or text}. Fix: check the path and its permissions."
    if isinstance(err, MemoryError):
        return 2, "out of memory. Fix: a smaller size, fewer LoRAs per batch, or float16 on a GPU."
    return 1, f"unexpected {type(err).__name__}: {text or 'no message'}. Run again with --debug for the traceback, and please report it."


if __name__ == "__main__":
    sys.exit(main())
