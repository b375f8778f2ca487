#!/usr/bin/env bash
# Cloud TPU pod slice: create the TPU VM, copy rrjax to every worker, install, train on all workers, follow
# the log, stop or delete. Every worker runs the same `python -m rrjax.train`; rrjax.distributed finds the
# other workers through the TPU metadata server (no coordinator flags needed on Cloud TPU).
#
#   launch/tpu_pod.sh [options] COMMAND [-- ARGS for rrjax.train]
#
# Commands:
#   create    gcloud compute tpus tpu-vm create (accelerator type, runtime version, zone)
#   copy      tar this checkout (without .venv, runs, .git) and unpack it in ~/rrjax on every worker
#   install   Python 3.12 and `bash scripts/setup.sh` (the README command) plus jax[tpu], on every worker
#   mount     mount a GCS bucket with gcsfuse at the same path on every worker (run_dir and data_dir
#             must be visible to all workers: Orbax writes one checkpoint from all of them)
#   train     start `python -m rrjax.train ARGS` detached on every worker, then follow worker 0's log
#   logs      follow worker 0's log (--worker N for another, --worker all for every worker's)
#   kill      stop the training processes started by `train` (by their saved process ids)
#   ssh       run ARGS as a shell command on the workers (--worker, default all)
#   stop      stop the TPU VM (keeps disks; `start` resumes it)
#   start     start a stopped TPU VM
#   delete    delete the TPU VM
#   up        create, copy, install
#
# Options (or the environment variable in brackets):
#   --name NAME                 [TPU_NAME]         default rrjax-pod
#   --zone ZONE                 [TPU_ZONE]         default us-central2-b
#   --project PROJECT           [TPU_PROJECT]      default gcloud's configured project
#   --accelerator-type TYPE     [TPU_TYPE]         default v4-32 (e.g. v5litepod-16, v5p-32, v6e-16)
#   --runtime-version VERSION   [TPU_RUNTIME]      default chosen from the accelerator type
#   --spot                      create a Spot TPU
#   --bucket BUCKET             [TPU_BUCKET]       for `mount`
#   --mount-point DIR           [TPU_MOUNT]        default /mnt/rrjax
#   --worker W                  [TPU_WORKER]       for logs/ssh: all or an index
#   --dry-run                   print the gcloud commands instead of running them
#
# Example (v5p-32 = 4 hosts x 4 chips; 7B SFT on one mesh over all 16 chips):
#   launch/tpu_pod.sh --name rr7b --zone us-east5-a --accelerator-type v5p-32 up
#   launch/tpu_pod.sh --name rr7b --bucket my-bucket mount
#   launch/tpu_pod.sh --name rr7b train -- --gin_file configs/sft/reasonrank_7b.gin \
#       --gin_file configs/mesh/tpu_pod.gin --gin_param "TrainConfig.run_dir = '/mnt/rrjax/runs/rr7b'"
#   launch/tpu_pod.sh --name rr7b delete
set -euo pipefail

NAME=${TPU_NAME:-rrjax-pod}
ZONE=${TPU_ZONE:-us-central2-b}
PROJECT=${TPU_PROJECT:-}
TYPE=${TPU_TYPE:-v4-32}
RUNTIME=${TPU_RUNTIME:-}
BUCKET=${TPU_BUCKET:-}
MOUNT=${TPU_MOUNT:-/mnt/rrjax}
WORKER=${TPU_WORKER:-}
SPOT=0
DRY_RUN=0
REMOTE_DIR=rrjax  # relative to each worker's home directory

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
  exit "${1:-0}"
}

die() {
  echo "tpu_pod.sh: $*" >&2
  exit 2
}

COMMAND=""
TRAIN_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --name) NAME=${2:?--name needs a value}; shift 2 ;;
    --zone) ZONE=${2:?--zone needs a value}; shift 2 ;;
    --project) PROJECT=${2:?--project needs a value}; shift 2 ;;
    --accelerator-type) TYPE=${2:?--accelerator-type needs a value}; shift 2 ;;
    --runtime-version) RUNTIME=${2:?--runtime-version needs a value}; shift 2 ;;
    --bucket) BUCKET=${2:?--bucket needs a value}; shift 2 ;;
    --mount-point) MOUNT=${2:?--mount-point needs a value}; shift 2 ;;
    --worker) WORKER=${2:?--worker needs a value}; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) [ -z "$COMMAND" ] || die "one command at a time (got $COMMAND and $1)"; COMMAND=$1; shift ;;
  esac
done
[ -n "$COMMAND" ] || usage 2

default_runtime() {
  case "$1" in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) die "no default runtime version for $1; pass --runtime-version" ;;
  esac
}

run() {
  if [ "$DRY_RUN" = 1 ]; then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}

GCLOUD_FLAGS=(--zone="$ZONE")
if [ -n "$PROJECT" ]; then
  GCLOUD_FLAGS+=(--project="$PROJECT")
fi

# Runs a shell command on the workers ($1: all or an index).
on_workers() {
  local worker=$1
  shift
  run gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_FLAGS[@]}" --worker="$worker" --command="$*"
}

quoted_train_args() {
  local out="" arg
  for arg in "${TRAIN_ARGS[@]}"; do
    out+=" $(printf '%q' "$arg")"
  done
  echo "$out"
}

cmd_create() {
  local runtime=${RUNTIME:-$(default_runtime "$TYPE")}
  local extra=()
  if [ "$SPOT" = 1 ]; then
    extra+=(--spot)
  fi
  run gcloud compute tpus tpu-vm create "$NAME" "${GCLOUD_FLAGS[@]}" --accelerator-type="$TYPE" \
    --version="$runtime" "${extra[@]}"
}

cmd_copy() {
  local root archive
  root=$(cd "$(dirname "$0")/.." && pwd)
  archive=$(mktemp -t rrjax-XXXXXX.tar.gz)
  tar -C "$root" --exclude=./.venv --exclude=./runs --exclude=./.git --exclude='*.egg-info' \
    --exclude='__pycache__' -czf "$archive" .
  run gcloud compute tpus tpu-vm scp "$archive" "$NAME:rrjax.tar.gz" "${GCLOUD_FLAGS[@]}" --worker=all || {
    rm -f "$archive"
    die "copy failed"
  }
  rm -f "$archive"
  on_workers all "mkdir -p ~/$REMOTE_DIR && tar -C ~/$REMOTE_DIR -xzf ~/rrjax.tar.gz && rm ~/rrjax.tar.gz"
}

cmd_install() {
  # TPU VM images ship Python 3.10; JAX >= 0.11 needs 3.12 (deadsnakes on Ubuntu 22.04).
  local python312="command -v python3.12 >/dev/null || { sudo add-apt-repository -y ppa:deadsnakes/ppa \
&& sudo apt-get update -q && sudo apt-get install -y -q python3.12 python3.12-venv; }"
  on_workers all "set -e; $python312; cd ~/$REMOTE_DIR && bash scripts/setup.sh \
&& .venv/bin/python -m pip install -q -U 'jax[tpu]' && .venv/bin/python -c 'import jax; print(jax.devices())'"
}

cmd_mount() {
  [ -n "$BUCKET" ] || die "mount needs --bucket"
  local install="command -v gcsfuse >/dev/null || { export GCSFUSE_REPO=gcsfuse-\$(lsb_release -c -s); \
echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt \$GCSFUSE_REPO main\" \
| sudo tee /etc/apt/sources.list.d/gcsfuse.list && curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg \
| sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null && sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; }"
  on_workers all "set -e; $install; sudo mkdir -p $MOUNT && sudo chown \$USER $MOUNT; \
mountpoint -q $MOUNT || gcsfuse --implicit-dirs $BUCKET $MOUNT"
}

cmd_train() {
  [ "${#TRAIN_ARGS[@]}" -gt 0 ] || die "train needs rrjax.train arguments after --"
  local args
  args=$(quoted_train_args)
  # setsid + nohup: training outlives the ssh session; the pid file lets `kill` stop exactly it.
  on_workers all "cd ~/$REMOTE_DIR && mkdir -p logs && setsid nohup .venv/bin/python -m rrjax.train$args \
> logs/train.log 2>&1 < /dev/null & echo \$! > ~/$REMOTE_DIR/logs/train.pid; echo \"\$(hostname): started \$(cat ~/$REMOTE_DIR/logs/train.pid)\""
  WORKER=${WORKER:-0}
  cmd_logs
}

cmd_logs() {
  on_workers "${WORKER:-0}" "tail -n +1 -F ~/$REMOTE_DIR/logs/train.log"
}

cmd_kill() {
  # setsid made the trainer a process-group leader: signal its group (data workers included).
  on_workers all "f=~/$REMOTE_DIR/logs/train.pid; if [ -f \$f ]; then kill -- -\$(cat \$f) 2>/dev/null \
&& echo \"\$(hostname): stopped \$(cat \$f)\"; rm -f \$f; fi"
}

cmd_ssh() {
  [ "${#TRAIN_ARGS[@]}" -gt 0 ] || die "ssh needs a command after --"
  on_workers "${WORKER:-all}" "${TRAIN_ARGS[*]}"
}

case "$COMMAND" in
  create) cmd_create ;;
  copy) cmd_copy ;;
  install) cmd_install ;;
  mount) cmd_mount ;;
  train) cmd_train ;;
  logs) cmd_logs ;;
  kill) cmd_kill ;;
  ssh) cmd_ssh ;;
  stop) run gcloud compute tpus tpu-vm stop "$NAME" "${GCLOUD_FLAGS[@]}" ;;
  start) run gcloud compute tpus tpu-vm start "$NAME" "${GCLOUD_FLAGS[@]}" ;;
  delete) run gcloud compute tpus tpu-vm delete "$NAME" "${GCLOUD_FLAGS[@]}" --quiet ;;
  up) cmd_create; cmd_copy; cmd_install ;;
  *) die "unknown command $COMMAND (see --help)" ;;
esac
