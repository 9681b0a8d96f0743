"""Memory held per client session by the web UI: does the server's RSS come back down as sessions come and go?

Starts the UI on the tiny model in a subprocess (its own RSS, untouched by the clients), then runs rounds of
`--sessions` new `gradio_client` sessions, each doing one cheap call (`/library`, or `/reproduce` of a PNG), and
one generation per round (`/generate`). After each round it reads the server's RSS (psutil) and prints it; last
it prints `ui_rss_growth_mb_per_round`, the mean growth per round after the second round (the first rounds pay
for imports, caches and the model's first run).

    .venv/bin/python benchmarks/bench_ui_sessions.py [--rounds 10] [--sessions 40] [--call library|reproduce]

Nothing is timed: the numbers are megabytes, so a busy machine changes how long it takes, not what it prints.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PAIR = [["tiny_character", 1.0], ["tiny_style", 0.8]]


def serve_forever(root: Path, port: int, ready: Path) -> None:
    """The server process: the tiny UI world in `root`, on 127.0.0.1:`port`; writes `ready` once it serves."""
    import torch

    from loraloom.app.ui.sandbox import serve, tiny_ui_world

    torch.set_num_threads(1)
    config = tiny_ui_world(root, clip=False)
    with serve(config, port=port) as (_, url):
        ready.write_text(url)
        while True:
            time.sleep(3600)


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    from loraloom.app.ui.sandbox import free_port

    ready = root / "ready"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(root), "--port", str(free_port()),
                             "--ready", str(ready)], env=env)
    while not ready.exists():
        if proc.poll() is not None:
            raise SystemExit(f"the UI server exited with {proc.returncode}")
        time.sleep(0.2)
    return proc, ready.read_text()


def one_round(url: str, sessions: int, call: str, png: str | None, seed: int) -> None:
    """`sessions` new clients, one cheap call each; one of them also generates an image."""
    from gradio_client import Client, handle_file

    for k in range(sessions):
        client = Client(url, verbose=False, download_files=False)
        if call == "reproduce" and png:
            client.predict(handle_file(png), api_name="/reproduce")
        else:
            client.predict(api_name="/library")
        if k == 0:
            client.predict("tiny:sd1", "a portrait, {triggers}", "", PAIR, "merge", {}, 2, 7.5, 32, 32, "ddim", seed,
                           api_name="/generate")
        close = getattr(client, "close", None)
        if close:
            close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--sessions", type=int, default=40, help="new client sessions per round")
    p.add_argument("--call", choices=["library", "reproduce"], default="library", help="each session's cheap call")
    p.add_argument("--serve", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--ready", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve_forever(Path(args.serve), args.port, Path(args.ready))
        return 0
    import psutil
    from gradio_client import Client

    root = Path(tempfile.mkdtemp(prefix="loraloom-ui-sessions-"))
    proc, url = start_server(root)
    try:
        server = psutil.Process(proc.pid)
        png = None
        if args.call == "reproduce":
            png = Client(url, verbose=False, download_files=False).predict(
                "tiny:sd1", "p", "", PAIR, "merge", {}, 2, 7.5, 32, 32, "ddim", 0, api_name="/generate")[2]["file"]
        rss = []
        for r in range(args.rounds):
            one_round(url, args.sessions, args.call, png, seed=r)
            rss.append(server.memory_info().rss / 1e6)
            print(f"round {r + 1:2d}: {args.sessions} sessions, server RSS {rss[-1]:.1f} MB", flush=True)
        steps = [b - a for a, b in zip(rss[1:], rss[2:])]
        growth = sum(steps) / len(steps) if steps else float("nan")
        print(f"ui_rss_growth_mb_per_round {growth:.2f}")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
