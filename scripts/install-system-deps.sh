#!/usr/bin/env bash
# Installs the Debian packages the tests run for real. Idempotent: does nothing when present.
set -euo pipefail
PACKAGES=(etcd-server prometheus-alertmanager chromium rsync pgbouncer prometheus pebble
          prometheus-postgres-exporter prometheus-blackbox-exporter dnsmasq-base nginx)
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian starts these as services on install; the tests run their own instances.
for svc in etcd prometheus-alertmanager pgbouncer prometheus prometheus-postgres-exporter \
    prometheus-blackbox-exporter; do
    if command -v systemctl >/dev/null && systemctl is-active --quiet "$svc" 2>/dev/null; then
        systemctl stop "$svc" || true
    fi
done
pkill -u etcd -x etcd 2>/dev/null || true  # only the package service, never a test cluster's etcd
pkill -u prometheus -f '^/usr/bin/prometheus-alertmanager' 2>/dev/null || true
pkill -u prometheus -x prometheus 2>/dev/null || true  # the package's server, never a test's (root)
# The exporters' package services (user prometheus); the drills start their own as root.
pkill -u prometheus -f '^/usr/bin/prometheus-postgres-exporter' 2>/dev/null || true
pkill -u prometheus -f '^/usr/bin/prometheus-blackbox-exporter' 2>/dev/null || true
# nginx's package service (the default config on :80); the tests run their own with -c.
pkill -f '^nginx: master process /usr/sbin/nginx -g daemon on; master_process on;' \
    2>/dev/null || true
exit 0
