#!/usr/bin/env bash
# Start Prometheus on loopback with configs/prometheus/prometheus.yml (installs Debian's package
# first if `prometheus` is missing; needs root or sudo for that).
#   bash scripts/prometheus.sh [--port 9090] [--config FILE] [--data DIR] [--foreground]
# Writes its PID to DATA/prometheus.pid; stop with: kill "$(cat runs/prometheus/prometheus.pid)"
set -euo pipefail
cd "$(dirname "$0")/.."
port=9090
config=configs/prometheus/prometheus.yml
data=runs/prometheus
foreground=0
while [ $# -gt 0 ]; do
  case "$1" in
    --port) port="$2"; shift 2 ;;
    --config) config="$2"; shift 2 ;;
    --data) data="$2"; shift 2 ;;
    --foreground) foreground=1; shift ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

if ! command -v prometheus >/dev/null 2>&1; then
  echo "installing Debian's prometheus package" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
promtool check config "$config" >/dev/null
mkdir -p "$data"
args=(--config.file="$config" --storage.tsdb.path="$data/tsdb" --web.listen-address="127.0.0.1:$port" --storage.tsdb.retention.time=2d)
if [ "$foreground" = 1 ]; then
  exec prometheus "${args[@]}"
fi
prometheus "${args[@]}" >"$data/prometheus.log" 2>&1 &
echo $! >"$data/prometheus.pid"
for _ in $(seq 1 60); do
  if curl -fs "http://127.0.0.1:$port/-/ready" >/dev/null 2>&1; then
    echo "prometheus ready on http://127.0.0.1:$port (pid $(cat "$data/prometheus.pid"), log $data/prometheus.log)"
    exit 0
  fi
  sleep 0.5
done
echo "prometheus did not become ready; see $data/prometheus.log" >&2
exit 1
