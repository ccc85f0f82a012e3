#!/usr/bin/env bash
# Build the CPU variant of the Dockerfile with podman, pulling no image from any registry.
#
#   deploy/build_cpu_image.sh                 # -> localhost/tssc:cpu
#   IMAGE=localhost/tssc:test deploy/build_cpu_image.sh
#
# 1. base image: a Debian bookworm root filesystem made by debootstrap (with python3 + venv),
#    imported as $BASE_IMAGE (skipped when that image already exists);
# 2. wheelhouse: every wheel the image needs (CPU torch, the project's dependencies, setuptools),
#    gathered on this host by pip with this host's own index settings;
# 3. podman build of the Dockerfile with VARIANT=cpu, CPU_BASE_IMAGE=$BASE_IMAGE and
#    `pip --no-index --find-links /wheels`: the build itself fetches nothing (chroot isolation
#    only allows the host network, so this is by construction, not by a network namespace);
# 4. smoke test without a container runtime (podman run cannot start containers on hosts like
#    CI's): create and mount a container of the image, run its `tssc serve` chrooted there (with
#    /proc, /sys and /dev bound in a private mount namespace) as the image's non-root user with the
#    image's environment, and wait for GET /health = 200 and tssc_model_info in /metrics.
#    SMOKE_MODEL_DIR=DIR serves DIR instead of the bundled model; SKIP_BUILD=1 only runs step 4.
#
# Measured on a 2-core CI-like machine: 3 min 47 s from nothing (debootstrap + import 65 s,
# wheelhouse 17 s, podman build 136 s, smoke test 7 s); image 1.35 GB.
#
# Needs: root, podman, debootstrap (Debian packages `podman debootstrap`), and a CPython 3.11
# ($PYTHON, default .venv/bin/python) for the wheelhouse, as bookworm's python3 is 3.11.
# RUN steps use `--isolation chroot`: crun cannot create containers here (cgroups in hybrid mode);
# `--format docker` keeps the HEALTHCHECK, which the OCI image format has no field for.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-localhost/tssc:cpu}
BASE_IMAGE=${BASE_IMAGE:-localhost/tssc-base:bookworm}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PYTHON=${PYTHON:-.venv/bin/python}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
WORK=${WORK:-$(mktemp -d /tmp/tssc-image.XXXXXX)}
KEEP_WORK=${KEEP_WORK:-0}

log() { printf '[build_cpu_image %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
cleanup() {
  if [[ -n "${SERVER_PID:-}" ]]; then { kill "$SERVER_PID"; wait "$SERVER_PID"; } 2>/dev/null || true; fi
  if [[ -n "${CONTAINER:-}" ]]; then podman rm -f "$CONTAINER" >/dev/null || true; fi
  if [[ "$KEEP_WORK" != 1 ]]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT

for tool in podman debootstrap; do
  command -v "$tool" >/dev/null || { log "missing $tool (apt-get install podman debootstrap)"; exit 1; }
done
"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
  || { log "$PYTHON is not CPython 3.11 (the base image's python3)"; exit 1; }

build_base() {
  if podman image exists "$BASE_IMAGE"; then
    log "base image $BASE_IMAGE exists"
    return
  fi
  log "debootstrap bookworm -> $BASE_IMAGE"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$WORK/rootfs" "$DEBIAN_MIRROR" >"$WORK/debootstrap.log"
  rm -rf "$WORK/rootfs/var/cache/apt/archives/"*.deb "$WORK/rootfs/var/lib/apt/lists/"*
  tar -C "$WORK/rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
  rm -rf "$WORK/rootfs"
}

build_wheelhouse() {
  log "wheelhouse -> $WORK/wheels"
  "$PYTHON" -m pip wheel -q -w "$WORK/wheels" "$TORCH_SPEC" .
  "$PYTHON" -m pip download -q -d "$WORK/wheels" "setuptools>=68" wheel
  # dependencies behind environment markers this host's python does not meet but the image's does:
  # redis needs async-timeout below Python 3.11.3 (bookworm has 3.11.2)
  "$PYTHON" -m pip download -q -d "$WORK/wheels" "async-timeout>=4.0.3"
}

build_image() {
  log "podman build (VARIANT=cpu) -> $IMAGE"
  podman build --isolation chroot --network host --format docker \
    --volume "$WORK/wheels:/wheels:ro" \
    --build-arg VARIANT=cpu \
    --build-arg CPU_BASE_IMAGE="$BASE_IMAGE" \
    --build-arg TORCH_SPEC="$TORCH_SPEC" \
    --build-arg TORCH_INDEX_URL= \
    --build-arg PIP_OPTIONS="--no-index --find-links /wheels" \
    --tag "$IMAGE" --file Dockerfile .
}

check_image_config() {
  local user
  user=$(podman image inspect --format '{{.Config.User}}' "$IMAGE")
  [[ "$user" == tssc ]] || { log "image user is '$user', not tssc"; exit 1; }
  podman image inspect --format '{{json .Config.Healthcheck}}' "$IMAGE" | grep -q /health \
    || { log "image has no /health HEALTHCHECK"; exit 1; }
}

# GET http://127.0.0.1:$1$2 once; prints the body, fails unless 200.
http_get() {
  "$PYTHON" -c 'import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())' \
    "http://127.0.0.1:$1$2" 2>/dev/null
}

# Until the server answers 200 on $2 (max $3 s), as long as it runs.
wait_healthy() {
  local deadline=$((SECONDS + $3))
  until http_get "$1" "$2" >/dev/null; do
    if ! kill -0 "$SERVER_PID" 2>/dev/null || ((SECONDS > deadline)); then
      log "the server never answered 200 on $2:"
      tail -30 "$WORK/serve.log" >&2
      exit 1
    fi
    sleep 1
  done
}

# Serve from the image's filesystem: a container is created (not started) and mounted, and its
# entrypoint runs chrooted there as the image's user, with the image's environment, on loopback.
smoke_test() {
  log "smoke test: tssc serve from $IMAGE's root filesystem (chroot, user tssc)"
  local cid root port env_args=()
  cid=$(podman create --no-healthcheck "$IMAGE")
  CONTAINER=$cid
  root=$(podman mount "$cid")
  mapfile -t env_args < <(podman image inspect --format '{{range .Config.Env}}{{println .}}{{end}}' "$IMAGE" | sed '/^$/d')
  if [[ -n "${SMOKE_MODEL_DIR:-}" ]]; then  # a model to serve instead of the bundled one
    cp -r "$SMOKE_MODEL_DIR" "$root/tmp/smoke-model" && chown -R 10001:10001 "$root/tmp/smoke-model"
    env_args+=(TSSC_MODEL=/tmp/smoke-model)
  fi
  port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  # A private mount namespace gives the chroot /proc, /sys and /dev (torch reads cpuinfo from them)
  # and drops those mounts when the server exits.
  # shellcheck disable=SC2016  # $root and $@ belong to the inner shell
  unshare --mount --propagation private /bin/sh -c '
    root=$1; shift
    mount --rbind /proc "$root/proc" && mount --rbind /sys "$root/sys" && mount --rbind /dev "$root/dev"
    exec chroot --userspec=tssc:tssc "$root" "$@"' sh "$root" \
    /usr/bin/env -i "${env_args[@]}" HOME=/home/tssc tssc serve --host 127.0.0.1 --port "$port" \
    >"$WORK/serve.log" 2>&1 &
  SERVER_PID=$!
  wait_healthy "$port" /health 300
  http_get "$port" /metrics | grep -q '^tssc_model_info{' || { log "no tssc_model_info in /metrics"; exit 1; }
  log "image serves: /health 200 and /metrics on port $port"
}

start=$SECONDS
if [[ "${SKIP_BUILD:-0}" != 1 ]]; then  # SKIP_BUILD=1: only test an existing $IMAGE
  build_base
  build_wheelhouse
  build_image
fi
check_image_config
smoke_test
log "done in $((SECONDS - start)) s: $(podman image inspect --format '{{.Size}}' "$IMAGE") bytes"
