#!/usr/bin/env bash
# Installs the Debian packages medkms needs: SoftHSM2, Python 3.11, Node.js; with --tests,
# also what only the tests use (iproute2, promtool, Chromium), which a node or app host
# does without.
# As root it installs what is missing; otherwise it names what is missing.
set -euo pipefail

tests=false
case "${1:-}" in
  "") ;;
  --tests) tests=true ;;
  *) echo "usage: $0 [--tests]" >&2; exit 2 ;;
esac

missing=()
command -v softhsm2-util >/dev/null || missing+=(softhsm2)
{ command -v python3.11 >/dev/null || command -v python3 >/dev/null; } || missing+=(python3 python3-venv python3-dev)
command -v python3.11 >/dev/null || python3 -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null \
  || missing+=(python3 python3-venv)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
if $tests; then
  command -v ip >/dev/null || missing+=(iproute2)  # the multi-host tests (network namespaces)
  command -v promtool >/dev/null || missing+=(prometheus)  # promtool: the alert rules' unit tests
  command -v chromium >/dev/null || missing+=(chromium)  # headless: the audit report's tests
fi

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "missing system packages: ${missing[*]}" >&2
  echo "install them (e.g. sudo apt-get install ${missing[*]}) and run again" >&2
  exit 1
fi
echo "installing system packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
