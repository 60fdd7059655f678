#!/usr/bin/env bash
# Build and smoke-test the serving image with buildah where no container registry can be reached: only a
# Debian mirror (for a debootstrap base image) and the Python package sources pip is configured with (for a
# wheelhouse). Run as root from anywhere:
#   docker/buildah-offline.sh                  # base, wheels, build, smoke (smoke needs STORE)
#   docker/buildah-offline.sh base|wheels|build|smoke ...
# Environment:
#   WORK             buildah storage, rootfs and wheelhouse, outside the repository (default /var/tmp/vit-buildah);
#                    the vfs driver copies every layer, so keep ~10 GB free
#   DEBIAN_MIRROR    default http://deb.debian.org/debian
#   TORCH_INDEX_URL  where pip finds the CPU torch wheel (default https://download.pytorch.org/whl/cpu;
#                    empty: pip's own configuration already has it)
#   STORE            smoke: a store (folder) with a registered model, e.g. made by vit-train -p store DIR
#   PORT             smoke: the port on 127.0.0.1 (default 18080)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${WORK:-/var/tmp/vit-buildah}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
TORCH_INDEX_URL=${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}
PYTHON=${PYTHON:-python3}
PORT=${PORT:-18080}
BASE=localhost/python-base:3.11-bookworm
IMAGE=${IMAGE:-localhost/vit-serve:dev}

b() { buildah --root "$WORK/storage" --runroot "$WORK/run" --storage-driver vfs "$@"; }
log() { printf '\n== %s %s\n' "$(date +%T)" "$*" >&2; }

# A stand-in for python:3.11-slim-bookworm: Debian bookworm minbase with its python3 (3.11) and venv.
base() {
    if b inspect --type image "$BASE" >/dev/null 2>&1; then log "have $BASE"; return; fi
    log "debootstrap bookworm from $DEBIAN_MIRROR"
    local rootfs="$WORK/rootfs" ctr mnt
    rm -rf "$rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
        bookworm "$rootfs" "$DEBIAN_MIRROR"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    ctr=$(b from scratch)
    mnt=$(b mount "$ctr")
    cp -a "$rootfs"/. "$mnt"/
    b umount "$ctr"
    b config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 \
        --cmd python3 "$ctr"
    b commit --rm "$ctr" "$BASE"
    rm -rf "$rootfs"
}

# Every wheel the serving image installs (CPython 3.11, x86_64): the CPU torch of constraints.txt, the
# dependencies and the `fast` extra at their pinned versions, and setuptools for building the package.
wheels() {
    log "wheelhouse in $WORK/wheels"
    local torch extra=()
    torch=$(grep '^torch==' "$REPO/constraints.txt")
    if [[ -n $TORCH_INDEX_URL ]]; then extra=(--extra-index-url "$TORCH_INDEX_URL"); fi
    mkdir -p "$WORK/wheels"
    (cd "$REPO" && "$PYTHON" -m pip download --dest "$WORK/wheels" --only-binary=:all: \
        --python-version 3.11 --implementation cp --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform linux_x86_64 \
        "${extra[@]}" -c constraints.txt "$torch" 'setuptools>=77' '.[fast]')
}

# The wheels enter the build through docker/wheels/ (hard links, else copies; removed afterwards) and
# PIP_NO_INDEX=1 keeps pip off the network. Without --layers: vfs would keep a full copy per step.
build() {
    log "build $IMAGE"
    local w commit
    commit=$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)
    # shellcheck disable=SC2329  # called by the trap
    unlink_wheels() { for w in "$WORK"/wheels/*.whl; do rm -f "$REPO/docker/wheels/${w##*/}"; done; }
    trap unlink_wheels EXIT
    for w in "$WORK"/wheels/*.whl; do ln -f "$w" "$REPO/docker/wheels/" 2>/dev/null || cp "$w" "$REPO/docker/wheels/"; done
    b bud --isolation chroot --format docker --build-arg PYTHON_IMAGE="$BASE" --build-arg PIP_NO_INDEX=1 \
        --build-arg VIT_CODE_COMMIT="$commit" -f "$REPO/docker/serve.Dockerfile" -t "$IMAGE" "$REPO"
    unlink_wheels
    trap - EXIT
    b images --format '{{.Name}}:{{.Tag}} {{.Size}}' "$IMAGE"
}

# Start the image's vit-serve on 127.0.0.1:$PORT with a copy of $STORE, then: /healthz, /readyz, the image's
# own HEALTHCHECK command, a /predict with a PNG, the user it runs as.
smoke() {
    [[ -n ${STORE:-} && -d ${STORE:-} ]] || { echo "smoke: set STORE to a store folder with a model" >&2; exit 2; }
    log "smoke test of $IMAGE on 127.0.0.1:$PORT"
    local i hc
    SMOKE_DIR=$(mktemp -d "$WORK/smoke.XXXXXX")
    mkdir "$SMOKE_DIR/store"
    cp -a "$STORE"/. "$SMOKE_DIR/store"/
    chown -R 10001:10001 "$SMOKE_DIR"
    SMOKE_CTR=$(b from --pull-never "$IMAGE")
    # not through b(): $! must be buildah itself, not a subshell
    buildah --root "$WORK/storage" --runroot "$WORK/run" --storage-driver vfs run --isolation chroot --network host \
        -v "$SMOKE_DIR/store:/store" -e VIT_STORE=/store -e PORT="$PORT" "$SMOKE_CTR" -- vit-serve --host 127.0.0.1 &
    SMOKE_PID=$!
    trap smoke_stop EXIT
    for i in $(seq 300); do curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null && break; sleep 0.2; done
    echo "healthy after ~$((i / 5)) s"
    curl -sf "http://127.0.0.1:$PORT/readyz"; echo
    hc=$(b inspect --type image "$IMAGE" \
        | "$PYTHON" -c 'import json, shlex, sys; print(shlex.join(json.load(sys.stdin)["Docker"]["config"]["Healthcheck"]["Test"][1:]))')
    eval "b run --isolation chroot --network host -e PORT=$PORT $SMOKE_CTR -- $hc" && echo "HEALTHCHECK command: ok"
    b run --isolation chroot -v "$SMOKE_DIR:/out" "$SMOKE_CTR" -- python -c \
        "from PIL import Image; Image.new('RGB', (32, 32), (180, 40, 40)).save('/out/red.png')"
    curl -sf -F "file=@$SMOKE_DIR/red.png" "http://127.0.0.1:$PORT/predict"; echo
    echo "runs as: $(b run --isolation chroot "$SMOKE_CTR" -- id)"
}

# shellcheck disable=SC2329  # called by the trap
smoke_stop() {
    kill -TERM "$SMOKE_PID" 2>/dev/null || true   # buildah run takes its container's processes with it
    wait "$SMOKE_PID" 2>/dev/null || true
    b rm "$SMOKE_CTR" >/dev/null || true
    rm -rf "$SMOKE_DIR"
}

if [[ $# -eq 0 ]]; then set -- base wheels build smoke; fi
for step in "$@"; do
    case $step in
        base|wheels|build|smoke) "$step" ;;
        *) echo "unknown step $step (base, wheels, build, smoke)" >&2; exit 2 ;;
    esac
done
