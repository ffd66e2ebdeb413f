#!/usr/bin/env bash
# Set up pep on a fresh Debian machine (run as root): system packages, then a virtualenv in
# ./.venv with pep installed in it. Idempotent. `--test` also installs the test extra.
set -euo pipefail
cd "$(dirname "$0")/.."

extra=""
[ "${1:-}" = "--test" ] && extra="[test]"

if [ "$(id -u)" -ne 0 ]; then
    echo "setup.sh: run as root (it installs Debian packages; pep itself needs CAP_NET_ADMIN)" >&2
    exit 2
fi

export DEBIAN_FRONTEND=noninteractive
# iptables: the legacy backend python-iptables writes to; iproute2: `ip netns exec`;
# gcc + python3-dev: python-iptables compiles a small extension; iperf3, haproxy, nginx-light,
# wrk: the benchmarks' load and reference paths (bench/); openssl: the lab's HTTPS certificate;
# keepalived: VRRP for the lab's `ha` topology; curl: the HTTP client of examples/ (its test runs
# in the suite).
pkgs=(iptables iproute2 gcc python3-dev python3-venv iperf3 haproxy nginx-light wrk openssl
    keepalived curl)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".${extra}"
echo "setup.sh: pep installed in $(pwd)/.venv ($(.venv/bin/pep --help >/dev/null && echo ok))"
