#!/usr/bin/env bash
# Makes a Prometheus binary available to tests/test_dashboard.py, without installing or starting a service:
# Debian's `prometheus` package is downloaded with `apt-get download` and unpacked with `dpkg-deb -x` into
# DEST (default .venv/prometheus), so the binaries are DEST/usr/bin/prometheus and DEST/usr/bin/promtool.
# Nothing is installed system-wide and no maintainer script runs (no user, no systemd unit, no daemon).
#
# Safe to run again: does nothing when DEST already holds a working binary, or when `prometheus` is on PATH.
# Never fails: where apt is missing, or the download fails, it prints a note and exits 0 (the dashboard test
# then fails, saying how to install Prometheus).
#
#   bash scripts/prometheus_for_tests.sh [DEST]
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-${VENV:-.venv}/prometheus}
BIN="$DEST/usr/bin/prometheus"

note() { printf 'NOTE: %s\n' "$*" >&2; }
how() {
  note "tests/test_dashboard.py needs a Prometheus binary: install one ('apt-get install prometheus', or a release"
  note "from https://prometheus.io/download/) on PATH, or point PROMETHEUS_BIN at it."
}

if [ -x "$BIN" ] && "$BIN" --version >/dev/null 2>&1; then
  echo "Prometheus is already in $DEST: $("$BIN" --version 2>&1 | head -n 1)"
  exit 0
fi
if command -v prometheus >/dev/null 2>&1; then
  echo "Prometheus is on PATH ($(command -v prometheus)); the tests use it"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-deb >/dev/null 2>&1; then
  note "no apt-get/dpkg-deb here: Prometheus is not installed."
  how
  exit 0
fi

# The work folder sits beside DEST, so that the final move is a rename on one file system.
mkdir -p "$(dirname "$DEST")"
work=$(mktemp -d "$(dirname "$DEST")/.prometheus-download.XXXXXX")
trap 'rm -rf "$work"' EXIT
download() { (cd "$work" && apt-get download -q prometheus) >"$work/apt.log" 2>&1; }

if ! download; then
  # Usually a fresh image without package lists; only root may fetch them.
  if [ "$(id -u)" = 0 ]; then
    echo "apt-get download failed; fetching the package lists (apt-get update) and trying again"
    apt-get update -q >"$work/update.log" 2>&1 || true
    download || true
  fi
fi
deb=$(find "$work" -maxdepth 1 -name 'prometheus_*.deb' -print -quit)
if [ -z "$deb" ]; then
  note "could not download Debian's prometheus package:"
  sed 's/^/  /' "$work/apt.log" >&2 || true
  [ "$(id -u)" = 0 ] || note "(not root: 'apt-get update' was not tried)"
  how
  exit 0
fi

# Unpack beside DEST and move into place, so a half-unpacked folder never looks installed.
if ! dpkg-deb -x "$deb" "$work/root" || ! "$work/root/usr/bin/prometheus" --version >/dev/null 2>&1; then
  note "$(basename "$deb") could not be unpacked, or its prometheus does not run here."
  how
  exit 0
fi
rm -rf "$DEST"
mv "$work/root" "$DEST"
echo "Prometheus unpacked into $DEST: $("$BIN" --version 2>&1 | head -n 1)"
