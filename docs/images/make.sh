#!/usr/bin/env bash
# Regenerate docs/images/report.png: an exploding demo run, its HTML report, a headless-chromium screenshot.
# Needs chromium (Debian: apt-get install -y chromium). Run from anywhere; writes only docs/images/report.png.
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$repo"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
python3 -m gradwatch.cli demo --scenario exploding --no-prometheus --log-dir "$work/runs" >/dev/null
python3 -m gradwatch.cli report "$work"/runs/*.jsonl --format html -o "$work/report.html"
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --force-device-scale-factor=1 \
  --screenshot="$work/report.png" --window-size=1200,1600 "file://$work/report.html" 2>/dev/null
cp "$work/report.png" "$repo/docs/images/report.png"
ls -l "$repo/docs/images/report.png"
