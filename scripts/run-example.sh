#!/usr/bin/env bash
# Installs the server, starts it with its embedded defaults (SQLite state in ./state), sends the
# example feedback in config/examples/ as CloudEvents and prints the metrics. Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
port="${HTTP_PORT:-8080}"
python -m pip install -q -e .
python -m adserver --http_host 127.0.0.1 --http_port "$port" \
  --model_name example --state_dir ./state/example \
  --event_type io.seldon.serving.feedback.metrics --event_source io.seldon.serving.feedback \
  MetricsServer &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null' EXIT INT TERM
until curl -fs "http://127.0.0.1:$port/health/ready" >/dev/null; do
  kill -0 "$server" || exit 1
  sleep 0.1
done
for file in config/examples/*.json; do
  echo "POST $file"
  curl -s -o /dev/null -w '  -> HTTP %{http_code}\n' "http://127.0.0.1:$port/" \
    -H 'Content-Type: application/json' -H 'ce-specversion: 1.0' \
    -H "ce-id: example-$(basename "$file" .json)" -H 'ce-source: run-example' \
    -H 'ce-type: io.seldon.serving.feedback' --data-binary "@$file"
done
echo "GET /v1/metrics?format=json"
curl -s "http://127.0.0.1:$port/v1/metrics?format=json"; echo
echo "GET /v1/metrics (Prometheus text, first lines)"
curl -s "http://127.0.0.1:$port/v1/metrics" | grep -E '^feedback_(accuracy|precision|recall)' | head -12
echo "Server running on http://127.0.0.1:$port (Ctrl-C to stop)."
wait "$server"
