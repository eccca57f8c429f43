#!/usr/bin/env bash
# Installs the non-Python tools the test suite uses, when this machine allows it.
# Missing tools make the tests that need them skip with a reason; nothing here fails the run.
set -uo pipefail
have() { command -v "$1" >/dev/null 2>&1; }
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if have sudo && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO=""; fi
fi
if have apt-get && { [ "$(id -u)" = 0 ] || [ -n "$SUDO" ]; }; then
  missing=()
  have promtool || missing+=(prometheus)
  have prometheus-pushgateway || [ -x /usr/bin/prometheus-pushgateway ] || missing+=(prometheus-pushgateway)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq >/dev/null 2>&1 || true
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 \
      || echo "warning: could not install ${missing[*]}; tests needing them will skip"
    # The Debian packages start services; the tests run their own on free ports.
    for svc in prometheus prometheus-pushgateway prometheus-node-exporter; do
      $SUDO systemctl stop "$svc" >/dev/null 2>&1 || $SUDO service "$svc" stop >/dev/null 2>&1 || true
    done
  fi
else
  echo "note: no root/apt here; promtool and pushgateway tests will skip unless those tools are on PATH"
fi
if have npm; then
  tooldir=ci/.tools
  if [ ! -x "$tooldir/node_modules/.bin/readme-generator" ]; then
    mkdir -p "$tooldir"
    npm install --silent --no-audit --no-fund --prefix "$tooldir" @bitnami/readme-generator-for-helm@2.7.2 >/dev/null 2>&1 \
      || echo "warning: could not install readme-generator-for-helm; README freshness test will skip"
  fi
fi
# checkov pins many libraries that clash with the project's; it lives in its own venv.
checkov_venv=ci/.tools/checkov
if [ ! -x "$checkov_venv/bin/checkov" ]; then
  mkdir -p ci/.tools
  { python3 -m venv "$checkov_venv" \
      && "$checkov_venv/bin/python" -m pip install -q --disable-pip-version-check 'checkov==3.3.30'; } >/dev/null 2>&1 \
    || echo "warning: could not install checkov; the checkov scan test will skip"
fi
exit 0
