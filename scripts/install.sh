#!/usr/bin/env bash
# Production install on a Debian/Ubuntu server (deploy/INSTALL.md, section 3): only what the node needs at run time.
# Run as root from the checkout that stays in place (e.g. /opt/dicomnode):  sudo bash scripts/install.sh
# It installs python3 + python3-venv (stock Debian lacks the venv module) and dcmtk (echoscu/storescu for the
# acceptance tests with the PACS), creates the system user `dicomnode`, /var/lib/dicomnode and /etc/dicomnode,
# a virtual environment .venv with the pinned torch and `pip install .` (no developer extras: no pytest, ruff,
# Orthanc or Chromium; those are for scripts/bootstrap.sh on a developer machine).
# Environment: TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu gives CPU-only torch wheels (about 1 GB instead
# of the ~6 GB that PyPI's CUDA build brings); DICOMNODE_USER (default dicomnode); DICOMNODE_SKIP_APT=1.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1
SVC_USER="${DICOMNODE_USER:-dicomnode}"
if [ "$(id -u)" != "0" ]; then
  echo "error: run as root (sudo bash scripts/install.sh): it adds a system user and packages" >&2
  exit 2
fi
if [ "${DICOMNODE_SKIP_APT:-0}" != "1" ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv python3-pip dcmtk >/dev/null
fi
if ! id -u "$SVC_USER" >/dev/null 2>&1; then
  useradd --system --home-dir /var/lib/dicomnode --create-home --shell /usr/sbin/nologin "$SVC_USER"
fi
install -d -o "$SVC_USER" -g "$SVC_USER" -m 0750 /var/lib/dicomnode
install -d -m 0755 /etc/dicomnode
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip
# torch first and pinned, so no other requirement can pull a different build
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  .venv/bin/pip install -q --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
else
  .venv/bin/pip install -q "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
fi
.venv/bin/pip install -q .
if [ ! -e /etc/dicomnode/node.yaml ]; then
  install -m 0644 config/node.yaml /etc/dicomnode/node.yaml
  echo "wrote /etc/dicomnode/node.yaml from config/node.yaml: edit it (deploy/INSTALL.md, section 1)"
fi
echo "installed: $(pwd)/.venv/bin/dicomnode and dicomnode-train; next: edit /etc/dicomnode/node.yaml, then"
echo "  sudo -u $SVC_USER $(pwd)/.venv/bin/dicomnode check-config /etc/dicomnode/node.yaml"
