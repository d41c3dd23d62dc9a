#!/usr/bin/env bash
# Shows the service working: scripts a torchvision ResNet-18 (random weights) as a user
# would, uploads it, runs channel pruning + static INT8 (calibrated on synthetic inputs, which
# the report warns about), follows the job, downloads the result and its report, and loads
# the result in Python PyTorch.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${PARE_BIN_DIR:-$root/build}
pare=$bin/client/pare
work=${PARE_DEMO_DIR:-$root/pare-demo}
mkdir -p "$work"
/usr/bin/python3 - "$work/resnet18.pt" <<'PY'
import sys, torch, torchvision
torch.manual_seed(0)
torch.jit.script(torchvision.models.resnet18().eval()).save(sys.argv[1])
PY
cat >"$work/recipe.json" <<'JSON'
{"steps": [
  {"prune":    {"channel": {"amount": 0.5}}},
  {"quantize": {"static":  {"calibrationBatches": 4}}}
]}
JSON
set -x
model=$("$pare" upload-model "$work/resnet18.pt" --name resnet18 --input-shape 1,3,224,224)
job=$("$pare" submit --model "$model" --recipe "$work/recipe.json")
"$pare" wait "$job"
"$pare" download "$job" -o "$work/resnet18-pruned-int8.pt" --report "$work/report.json"
/usr/bin/python3 -c "import torch; m=torch.jit.load('$work/resnet18-pruned-int8.pt'); print('output', tuple(m(torch.randn(1,3,224,224)).shape))"
