#!/usr/bin/env bash
# Prove the NVML path on a host with an NVIDIA GPU: the GPU benchmark, then a real controller
# and agent on that host, and the GPU as the API reports it.
# Usage: bench/gpu-check.sh BIN_DIR OUT_DIR   (BIN_DIR holds release builds of nebula,
# nebula-agent and nebula-bench)
set -uo pipefail
BIN=$(cd "$1" && pwd); OUT=$2
mkdir -p "$OUT"
for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu; do
    [ -d "$d" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
done
nvidia-smi -L
"$BIN/nebula-bench" gpu --iterations 20000 --out "$OUT/gpu.json" 2>&1 | grep -v '^ *[0-9]*: \|^ *at '
work=$(mktemp -d); cd "$work"
echo nbl_device_check_0123456789 > admin.token
"$BIN/nebula" serve --data-dir data --http-listen 127.0.0.1:18080 --quic-listen 127.0.0.1:14433 \
    --admin-token-file admin.token --telemetry-interval 1s > controller.log 2>&1 &
sleep 2
export NEBULA_CONTROLLER=http://127.0.0.1:18080 NEBULA_TOKEN=nbl_device_check_0123456789
TOKEN=$("$BIN/nebula" token create --label gpu=nvidia 2>/dev/null)
RUST_LOG=info "$BIN/nebula-agent" join --controller 127.0.0.1:14433 --token "$TOKEN" --state-dir agent --name gpu-host > agent.log 2>&1 &
sleep 8
"$BIN/nebula" nodes
"$BIN/nebula" nodes --json > "$OUT/nodes.json"
python3 - <<'PY' > "$OUT/telemetry.json"
import json, urllib.request
req = urllib.request.Request("http://127.0.0.1:18080/api/v1/nodes/gpu-host/telemetry?since=1m",
                             headers={"Authorization": "Bearer nbl_device_check_0123456789"})
print(json.dumps(json.load(urllib.request.urlopen(req)), indent=1))
PY
python3 -c "import json; t=json.load(open('$OUT/telemetry.json')); print('API latest gpus:', json.dumps(t['latest']['gpus'])); print('API gpu_driver:', t['latest']['gpu_driver']); print('points:', len(t['points']), 'gpu util in points:', [p['gpu_utilization_percent'] for p in t['points']][:5])"
grep -i "nvidia\|nvml\|gpu" agent.log | head -5
cp agent.log controller.log "$OUT/" 2>/dev/null
kill %1 %2 2>/dev/null
true
