#!/bin/sh
# Installs Debian's chromium (for the Playwright browser test of the web UI) when /usr/bin/chromium is missing.
# Playwright cannot download its own browsers here; Debian's build works via executable_path.
# Never fails the caller: without Chromium the browser test skips and says why.
set -u
CHROMIUM=${LORALOOM_CHROMIUM:-/usr/bin/chromium}
[ -x "$CHROMIUM" ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure_chromium: $CHROMIUM is missing and apt-get is not available; the browser test will be skipped." >&2
    exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "ensure_chromium: $CHROMIUM is missing and installing it needs root (apt-get install -y chromium); the browser test will be skipped." >&2
        exit 0
    fi
fi
echo "ensure_chromium: installing chromium with apt-get (once, about 30 s) ..." >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null 2>&1 || true
if $SUDO apt-get install -y -qq chromium >/dev/null 2>&1; then
    echo "ensure_chromium: installed $(command -v chromium)" >&2
else
    echo "ensure_chromium: apt-get install chromium failed; the browser test will be skipped." >&2
fi
exit 0
