#!/usr/bin/env bash
# Start (or stop) a Ray cluster over every host of a Cloud TPU VM pod and run training from host 0.
#
#   scripts/ray_tpu_pod.sh TPU_NAME ZONE setup        copy this checkout to every host and install it
#   scripts/ray_tpu_pod.sh TPU_NAME ZONE start        Ray head on host 0, a worker on every other host
#   scripts/ray_tpu_pod.sh TPU_NAME ZONE train ARGS   device_train.py ARGS --hosts N on host 0, in tmux
#   scripts/ray_tpu_pod.sh TPU_NAME ZONE stop         stop Ray everywhere
#
# Every host advertises the custom Ray resource {"tpu": 1}, so `--actor-resources tpu=1` (which `train`
# passes) puts exactly one actor on each TPU host. Successor of the original init_ray.sh.
set -euo pipefail

if [[ $# -lt 3 ]]; then
  sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
TPU_NAME=$1 ZONE=$2 ACTION=$3
shift 3
PROJECT_FLAG=${CLOUDSDK_CORE_PROJECT:+--project=$CLOUDSDK_CORE_PROJECT}
REMOTE_DIR=${REMOTE_DIR:-mesh-transformer}  # relative to each host's home directory
RAY_PORT=${RAY_PORT:-6379}
VENV=$REMOTE_DIR/.venv

on_hosts() {  # on_hosts WORKERS COMMAND: run COMMAND on the given hosts ("all", "0", "1,2", ...)
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker="$1" --command="$2"
}

describe() {
  gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --format="$1"
}

head_ip() {
  local ip
  ip=$(describe 'value(networkEndpoints[0].ipAddress)')
  if [[ -z $ip ]]; then
    echo "error: TPU $TPU_NAME in zone $ZONE has no network endpoints; is it READY?" >&2
    exit 1
  fi
  echo "$ip"
}

host_count() {
  describe 'value(networkEndpoints[].ipAddress)' | tr ';,' '\n\n' | grep -c .
}

case $ACTION in
  setup)
    # git archive sends the committed tree only, never local runs/ or .venv/.
    archive=$(mktemp --suffix=.tar.gz)
    trap 'rm -f "$archive"' EXIT
    git -C "$(dirname "$0")/.." archive --format=tar.gz -o "$archive" HEAD
    gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME":mesh-transformer.tar.gz --zone="$ZONE" \
      $PROJECT_FLAG --worker=all
    on_hosts all "mkdir -p $REMOTE_DIR && tar -xzf mesh-transformer.tar.gz -C $REMOTE_DIR \
      && python3 -m venv $VENV && $VENV/bin/pip install -q -e '$REMOTE_DIR[tpu]'"
    ;;
  start)
    ip=$(head_ip)
    # Head first; then every host whose address is not the head's joins it.
    on_hosts 0 "$VENV/bin/ray stop --force >/dev/null 2>&1 || true; \
      $VENV/bin/ray start --head --port=$RAY_PORT --resources='{\"tpu\": 1}' --include-dashboard=false"
    on_hosts all "if ! hostname -I | tr ' ' '\n' | grep -qx '$ip'; then \
      $VENV/bin/ray stop --force >/dev/null 2>&1 || true; \
      $VENV/bin/ray start --address=$ip:$RAY_PORT --resources='{\"tpu\": 1}'; fi"
    on_hosts 0 "$VENV/bin/ray status"
    ;;
  train)
    hosts=$(host_count)
    run="cd $REMOTE_DIR && .venv/bin/python device_train.py $(printf '%q ' "$@")--hosts $hosts \
--ray-address auto --actor-resources tpu=1 2>&1 | tee -a train.log"
    # In tmux, so the run outlives this ssh session; Ctrl-C inside it stops the whole group.
    on_hosts 0 "tmux new-session -d -s train $(printf '%q' "$run")"
    echo "training on $hosts hosts; watch it with:"
    echo "  gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=0 -- -t tmux attach -t train"
    ;;
  stop)
    on_hosts all "$VENV/bin/ray stop --force || true"
    ;;
  *)
    echo "error: unknown action '$ACTION'; expected setup, start, train or stop" >&2
    exit 2
    ;;
esac
