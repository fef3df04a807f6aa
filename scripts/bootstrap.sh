#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian machine: system peers (Orthanc, dcmtk, dicom3tools), a venv, the project.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
need_apt=0
for bin in /usr/sbin/Orthanc /usr/bin/storescu /usr/bin/dciodvfy /usr/bin/chromium /usr/bin/openssl; do
  [ -x "$bin" ] || need_apt=1
done
if [ "$need_apt" = 1 ]; then
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq orthanc dcmtk dicom3tools chromium openssl >/dev/null
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
.venv/bin/pip install -q -e '.[dev]'
