#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian machine: system peers (Orthanc + DICOMweb, dcmtk, dicom3tools, PixelMed,
# Chromium, Node.js/npm), a venv, the project, and the pinned OHIF web app (outside the repository).
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
OHIF_VERSION=3.13.2
OHIF_CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/bone-dicomnode"
need_apt=0
for bin in /usr/sbin/Orthanc /usr/share/orthanc/plugins/libOrthancDicomWeb.so /usr/bin/storescu /usr/bin/dciodvfy \
           /usr/bin/chromium /usr/bin/openssl /usr/bin/java /usr/bin/npm; do
  [ -e "$bin" ] || need_apt=1
done
dpkg -s pixelmed-apps >/dev/null 2>&1 || need_apt=1
python3 -c "import ensurepip" 2>/dev/null || need_apt=1  # stock Debian's python3 lacks venv/ensurepip
if [ "$need_apt" = 1 ]; then
  $SUDO apt-get update -qq
  pkgs="orthanc orthanc-dicomweb dcmtk dicom3tools chromium openssl pixelmed-apps python3-venv"
  # a NodeSource nodejs already brings npm; Debian's nodejs needs the npm package
  command -v npm >/dev/null 2>&1 || pkgs="$pkgs nodejs npm"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $pkgs >/dev/null
fi
# Debian's postinst may start a system Orthanc on 4242/8042; the tests and the demo use their own instances.
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  .venv/bin/pip install -q --upgrade pip
  # torch first and pinned, so no other requirement can pull a different build
  .venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
fi
.venv/bin/pip install -q -e '.[dev,cluster]'
# The OHIF web app (viewer for the results; the browser test and the demo serve it with dicomnode/viewer.py):
# the npm package ships its built dist/, so `npm pack` fetches it without a build. Pinned, cached outside the repo.
if [ ! -f "$OHIF_CACHE/ohif-$OHIF_VERSION/dist/index.html" ]; then
  mkdir -p "$OHIF_CACHE"
  tmp="$(mktemp -d)"
  (cd "$tmp" && npm pack --silent "@ohif/app@$OHIF_VERSION" >/dev/null)
  mkdir -p "$OHIF_CACHE/ohif-$OHIF_VERSION.tmp"
  tar -xzf "$tmp"/ohif-app-"$OHIF_VERSION".tgz -C "$OHIF_CACHE/ohif-$OHIF_VERSION.tmp" --strip-components=1
  rm -rf "$tmp" "$OHIF_CACHE/ohif-$OHIF_VERSION"
  mv "$OHIF_CACHE/ohif-$OHIF_VERSION.tmp" "$OHIF_CACHE/ohif-$OHIF_VERSION"
fi
