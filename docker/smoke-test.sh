#!/usr/bin/env bash
# Start a built serving image the way Cloud Run does and wait until it is ready, before anything deploys it:
# the image must load a model from a store, warm it up and answer /readyz. The store is a folder inside the
# container, holding a random vit-cifar-tiny that the image's own Python registers (no network, no credentials).
#   docker/smoke-test.sh IMAGE [TIMEOUT_S]      (default 180 s; the host port is $SMOKE_PORT, default 18080)
set -euo pipefail
image=${1:?usage: docker/smoke-test.sh IMAGE [TIMEOUT_S]}
timeout_s=${2:-180}
port=${SMOKE_PORT:-18080}
name="vit-smoke-$$"

# shellcheck disable=SC2329  # called by the EXIT trap
cleanup() {
  local status=$?
  if [ "$status" -ne 0 ]; then echo "--- the container's log:" >&2; docker logs "$name" 2>&1 | tail -n 40 >&2 || true; fi
  docker rm -f "$name" >/dev/null 2>&1 || true
  exit "$status"
}
trap cleanup EXIT

register='import sys
from vit_nbdev.model import build_model, save_package
from vit_nbdev.store import open_store
model, pre = build_model("vit-cifar-tiny")
open_store(sys.argv[1]).register(save_package(model, pre, sys.argv[1] + "-package"), "smoke")'
# shellcheck disable=SC2016  # $0 and $store are expanded by the container's shell, not this one
docker run -d --name "$name" -p "127.0.0.1:$port:8080" -e VIT_MODEL=latest -e VIT_TELEMETRY=0 --entrypoint sh "$image" \
  -c 'store="${TMPDIR:-/tmp}/smoke-store"; python -c "$0" "$store" && VIT_STORE="$store" exec vit-serve' "$register" >/dev/null

for _ in $(seq "$timeout_s"); do
  if ready=$(curl -fsS "http://127.0.0.1:$port/readyz" 2>/dev/null); then
    curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null
    echo "$image is ready: $ready"
    exit 0
  fi
  if [ "$(docker inspect -f '{{.State.Running}}' "$name" 2>/dev/null)" != true ]; then
    echo "$image: the container stopped before it was ready" >&2
    exit 1
  fi
  sleep 1
done
echo "$image: not ready after $timeout_s s" >&2
exit 1
