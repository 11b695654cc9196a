#!/usr/bin/env bash
# Install the tools tests/deploy needs, from Debian's packages. Idempotent, non-interactive. `make test` runs it:
# with every tool present it only reports them; a missing tool is installed as root, or, when that cannot be done
# here (not root, no apt-get), the exact command to run is printed and it exits 1.
#   bash deploy/ci/install-tools.sh
# Tools: promtool + prometheus (package `prometheus`), kubectl with its built-in kustomize (package
# `kubernetes-client`, unless a kubectl or kustomize is already on PATH), systemd-analyze (package `systemd`),
# and PostgreSQL's server binaries initdb + pg_ctl (package `postgresql`: the ledger tests and bench/replicas.py
# start their own server on loopback; the package's own cluster and service are never used or started).
# The Debian `prometheus` package's service is never started here: the tests start their own server on loopback.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

need=()
have() { command -v "$1" >/dev/null 2>&1; }

if ! have promtool || ! have prometheus; then need+=(prometheus); fi
if ! have kustomize && ! { have kubectl && kubectl kustomize --help >/dev/null 2>&1; }; then need+=(kubernetes-client); fi
if ! have systemd-analyze; then need+=(systemd); fi
pg_bin() { local d found=""; for d in /usr/lib/postgresql/*/bin; do [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && found="$d"; done; echo "$found"; }
if ! { have initdb && have pg_ctl; } && [ -z "$(pg_bin)" ]; then need+=(postgresql); fi

if [ "${#need[@]}" -gt 0 ] && { [ "$(id -u)" -ne 0 ] || ! have apt-get; }; then
  echo "install-tools: tests/deploy needs the Debian package(s) ${need[*]} (promtool, prometheus, kubectl, systemd-analyze, initdb + pg_ctl)." >&2
  echo "install-tools: install them with:  sudo bash deploy/ci/install-tools.sh" >&2
  echo "install-tools: (or: sudo apt-get install --no-install-recommends ${need[*]}), then run make test again" >&2
  exit 1
fi

if [ "${#need[@]}" -gt 0 ]; then
  echo "install-tools: installing ${need[*]}"
  apt-get update -qq
  # policy-rc.d: keep package scripts from starting services (the prometheus package enables one)
  restore_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 0755 /usr/sbin/policy-rc.d
    restore_policy=1
  fi
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  if [ "$restore_policy" -eq 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
else
  echo "install-tools: nothing to install"
fi

echo "install-tools: promtool:   $(promtool --version 2>&1 | head -n1)"
echo "install-tools: prometheus: $(prometheus --version 2>&1 | head -n1)"
if have kustomize; then
  echo "install-tools: kustomize:  $(kustomize version 2>&1 | head -n1)"
else
  echo "install-tools: kubectl:    $(kubectl version --client 2>&1 | head -n2 | tr '\n' ' ')"
fi
echo "install-tools: systemd-analyze: $(systemd-analyze --version 2>&1 | head -n1)"
if have pg_ctl; then pg_ctl_bin=pg_ctl; else pg_ctl_bin="$(pg_bin)/pg_ctl"; fi
echo "install-tools: postgresql: $("$pg_ctl_bin" --version 2>&1 | head -n1)"
