#!/usr/bin/env bash
# Install what `make bench` needs (wrk, nginx, taskset, redis-server) from Debian packages.
# Idempotent: does nothing when everything is already on PATH; runs
# `apt-get update` only when a package cannot be found in the local lists.
set -euo pipefail

need=()
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v taskset >/dev/null 2>&1 || need+=(util-linux)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)

if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    sudo=()
elif command -v sudo >/dev/null 2>&1; then
    sudo=(sudo)
else
    echo "bench/setup.sh: need root (or sudo) to install: ${need[*]}" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
# nginx-light was dropped from newer Debian releases; fall back to nginx.
if [[ " ${need[*]} " == *" nginx-light "* ]] && ! apt-cache show nginx-light >/dev/null 2>&1; then
    "${sudo[@]}" apt-get update -qq
    apt-cache show nginx-light >/dev/null 2>&1 || need=("${need[@]/nginx-light/nginx}")
fi

echo "bench/setup.sh: installing ${need[*]}"
if ! "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}"; then
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
