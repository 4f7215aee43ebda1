#!/usr/bin/env bash
# N CPU processes of one training run on this machine, talking over 127.0.0.1 with gloo
# collectives: the whole multi-host path (jax.distributed, per-host loading and data, multi-host
# orbax checkpoints) without a cluster. It is how tests/test_multihost.py runs it.
#
#   launch/local_multiprocess.sh 2 --config=configs/demo.py --config.workdir=runs/demo_2proc_dp \
#       --config.mesh.data=-1
#   DEVICES_PER_PROCESS=2 PORT=23456 launch/local_multiprocess.sh 2 --config=configs/demo.py \
#       --config.workdir=runs/demo_2proc_fsdp --config.mesh.data=1 --config.mesh.fsdp=2 \
#       --config.mesh.tensor=2
#
# Every argument after N goes to `python -m ftjax.train`; this adds --coordinator_address=
# 127.0.0.1:$PORT --num_processes=N --process_id=I. Environment: DEVICES_PER_PROCESS (CPU
# devices per process, default 1), PORT (default: a free one), PYTHON (default python).
# Only process 0 prints progress. If one process fails the others are stopped (a dead peer would
# leave them waiting in a collective); the script exits with the first failure's status.
set -euo pipefail

if (($# < 1)) || ! [[ $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 N --config=configs/NAME.py [--config.a.b=value ...]" >&2
  exit 2
fi
n=$1
shift
python=${PYTHON:-python}
port=${PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
export JAX_PLATFORMS=cpu
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-1}"

pids=()
stop() { kill "${pids[@]}" 2>/dev/null || true; }
trap 'stop; exit 130' INT TERM
for ((i = 0; i < n; i++)); do
  "$python" -m ftjax.train "$@" --coordinator_address="127.0.0.1:$port" --num_processes="$n" \
      --process_id="$i" &
  pids+=($!)
done

status=0
for _ in "${pids[@]}"; do
  wait -n || { s=$?; ((status)) || status=$s; stop; }
done
exit "$status"
