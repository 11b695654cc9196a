#!/usr/bin/env bash
# Install the tools tests/deploy needs, from Debian's packages. Idempotent, non-interactive. `make test` runs it:
# with every tool present it only reports them; a missing tool is installed as root, or, when that cannot be done
# here (not root, no apt-get), the exact command to run is printed and it exits 1.
#   bash deploy/ci/install-tools.sh
# Tools: promtool + prometheus (package `prometheus`), kubectl with its built-in kustomize (package
# `kubernetes-client`, unless a kubectl or kustomize is already on PATH), systemd-analyze (package `systemd`).
# The Debian `prometheus` package's service is never started here: the tests start their own server on loopback.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

need=()
have() { command -v "$1" >/dev/null 2>&1; }

if ! have promtool || ! have prometheus; then need+=(prometheus); fi
if ! have kustomize && ! { have kubectl && kubectl kustomize --help >/dev/null 2>&1; }; then need+=(kubernetes-client); fi
if ! have systemd-analyze; then need+=(systemd); fi

if [ "${#need[@]}" -gt 0 ] && { [ "$(id -u)" -ne 0 ] || ! have apt-get; }; then
  echo "install-tools: tests/deploy needs the Debian package(s) ${need[*]} (promtool, prometheus, kubectl, systemd-analyze)." >&2
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
