#!/usr/bin/env bash
# The README's acceptance story with the real binaries: pare-server on its embedded
# default, the pare CLI uploading a torchvision ResNet-18, submitting, waiting, downloading,
# the result loading in Python; plus the CLI's exit codes and the offline compress verb.
set -euo pipefail
BIN=${PARE_BIN_DIR:?}
FX=${PARE_FIXTURES:?}
PY=${PARE_PYTHON:-/usr/bin/python3}
PARE=$BIN/client/pare
work=$(mktemp -d)
server_pid=""
cleanup() { [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }
expect_rc() { # expected-rc description command...
  local want=$1 what=$2; shift 2
  set +e; "$@" >"$work/out" 2>"$work/err"; local rc=$?; set -e
  [ "$rc" = "$want" ] || { cat "$work/err" >&2; fail "$what: exit code $rc, expected $want"; }
}

cd "$work"
"$BIN/server/pare-server" --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --data-dir "$work/pare-data" --local-workers 1 \
  --worker-threads 1 >"$work/server.out" 2>"$work/server.log" &
server_pid=$!
for _ in $(seq 100); do grep -q "listening on" "$work/server.out" 2>/dev/null && break; sleep 0.1; done
export PARE_SERVER=$(grep -o 'listening on 127.0.0.1:[0-9]*' "$work/server.out" | grep -o '127.0.0.1:[0-9]*')
[ -n "$PARE_SERVER" ] || fail "pare-server did not start"

model=$($PARE upload-model "$FX/resnet18.pt" --name resnet18 --input-shape 1,3,64,64)
[[ $model == mdl_* ]] || fail "upload-model printed '$model'"
cat >recipe.json <<'JSON'
{"steps": [
  {"prune":    {"magnitude": {"amount": 0.5, "scope": "GLOBAL"}}},
  {"quantize": {"dynamic":   {}}}
]}
JSON
expect_rc 0 "submit --wait" $PARE submit --model "$model" --recipe recipe.json --request-id readme-1 --wait
job=$(head -1 "$work/out")
grep -q "SUCCEEDED" "$work/out" || fail "submit --wait did not print SUCCEEDED"
[ "$($PARE submit --model "$model" --recipe recipe.json --request-id readme-1)" = "$job" ] || fail "request id not idempotent"
expect_rc 0 "download" $PARE download "$job" -o out.pt --report report.json
"$PY" - <<'PYEOF' || fail "the downloaded model or report is wrong"
import json, torch
m = torch.jit.load("out.pt")
y = m(torch.randn(2, 3, 64, 64))
assert tuple(y.shape) == (2, 10), y.shape
r = json.load(open("report.json"))
steps = [s["step"] for s in r["steps"]]
assert steps == ["original", "prune.magnitude", "quantize.dynamic"], steps
orig, pruned = r["steps"][0]["stats"], r["steps"][1]["stats"]
assert abs(pruned["sparsity"] - 0.5) < 0.01, pruned["sparsity"]
assert pruned["deflated_bytes"] < orig["deflated_bytes"]
PYEOF
expect_rc 0 "status --json" $PARE --json status "$job"
"$PY" -c "import json,sys; j=json.load(open('$work/out')); assert j['state']=='SUCCEEDED' and j['attempts']==1, j" \
  || fail "status --json"
expect_rc 0 "list" $PARE list
grep -q "$job" "$work/out" || fail "list does not show $job"

# Exit codes: 1 job failed, 2 usage, 3 unreachable, 4 rejected.
bad=$($PARE upload-model "$FX/throws.pt")
expect_rc 1 "a failing job" $PARE submit --model "$bad" --recipe recipe.json --wait
grep -q "MODEL_RUN" "$work/out" || fail "the failed job's reason is not shown"
expect_rc 2 "no verb" $PARE
expect_rc 2 "missing --format" $PARE upload-dataset "$FX/mnist_like.pt"
expect_rc 3 "unreachable" $PARE --server 127.0.0.1:1 --timeout 3 list
expect_rc 4 "garbage model" $PARE upload-model "$FX/garbage.bin"
grep -q "not a zip archive" "$work/err" || fail "garbage upload message"
expect_rc 4 "unknown job" $PARE status job_nope
echo '{"steps":[{"factorize":{"rankRatio":1.5}}]}' >bad-field.json
expect_rc 4 "out-of-range recipe field" $PARE submit --model "$model" --recipe bad-field.json
grep -q "steps\[0\].factorize.rankRatio" "$work/err" || fail "bad recipe field not named"
echo '{"steps": [{"prune": {"chanel": {}}}]}' >misspelt.json
expect_rc 4 "a misspelt recipe field" $PARE submit --model "$model" --recipe misspelt.json
grep -q "recipe.steps\[0\].prune has no field 'chanel' (it has: magnitude, channel, nm)" "$work/err" \
  || { cat "$work/err" >&2; fail "a misspelt field is not named with its alternatives"; }

# IDX datasets (gzip, as Fashion-MNIST ships) with labels, packed by the CLI.
ds=$($PARE upload-dataset "$FX/idx-images.gz" --labels "$FX/idx-labels.gz" --format idx)
[[ $ds == ds_* ]] || fail "upload-dataset printed '$ds'"
cnn=$($PARE upload-model "$FX/small_cnn.pt" --input-shape 1,1,28,28)
expect_rc 0 "job with an idx eval set" $PARE --json submit --model "$cnn" --recipe recipe.json --eval "$ds" --wait
"$PY" -c "import json; j=json.load(open('$work/out')); assert all(r['stats']['hasAccuracy'] for r in j['reports']), j" \
  || fail "accuracy missing from the report"

echo '{"steps":[{"quantize":{"static":{"observer":"PERCENTILE","calibrationBatches":2}}}]}' >static.json
expect_rc 0 "static INT8 calibrated on an idx dataset" $PARE --json submit --model "$cnn" --recipe static.json \
  --calibration "$ds" --eval "$ds" --wait
"$PY" -c "import json; j=json.load(open('$work/out')); r=j['reports'][1]; assert r['step']=='quantize.static' and r['notes'][0]=='calibrated on 16 images' and r['notes'][1].startswith('activations: ') and all(n.startswith('WARNING: slower') or n.startswith('timing unsteady') or 'middle zero point' in n for n in r['notes'][2:]), r" \
  || fail "static quantization report"

# A model whose forward takes two tensors: one --input-shape per input, through the service;
# the job is calibrated and measured on synthetic inputs, and the result takes both.
pair=$($PARE --json upload-model "$FX/user_two_input.pt" --input-shape 1,3,32,32 --input-shape 1,3,32,32)
"$PY" -c "import json,sys; m=json.loads(sys.argv[1]); assert m['moreInputShapes']==[{'dims':['1','3','32','32']}], m" "$pair" \
  || fail "upload-model of a two-input model: $pair"
pair=$("$PY" -c "import json,sys; print(json.loads(sys.argv[1])['id'])" "$pair")
echo '{"steps":[{"prune":{"channel":{"amount":0.5}}},{"quantize":{"static":{"calibrationBatches":2}}}]}' >pair.json
expect_rc 0 "a two-input model pruned and quantized" $PARE submit --model "$pair" --recipe pair.json --wait
pair_job=$(head -1 "$work/out")
expect_rc 0 "download the two-input result" $PARE download "$pair_job" -o pair.pt
"$PY" -c "import torch; m=torch.jit.load('pair.pt'); y=m(torch.randn(2,3,32,32), torch.randn(2,3,32,32)); assert y.shape==(2,10), y.shape" \
  || fail "the two-input result does not take its two inputs"
one=$($PARE upload-model "$FX/user_two_input.pt" --input-shape 1,3,32,32)
expect_rc 1 "a two-input model with one input shape" $PARE submit --model "$one" --recipe pair.json --wait
grep -q "MODEL_INPUTS\|takes 2 input" "$work/out" "$work/err" || fail "the missing input shape is not named"

# image-folder datasets: a folder of class folders (PNG and JPEG) packed by the CLI, with its
# preprocess.json; calibration and evaluation on it; a tar whose image does not decode.
imgs=$($PARE upload-dataset "$FX/images" --format image-folder)
[[ $imgs == ds_* ]] || fail "upload-dataset of an image folder printed '$imgs'"
rgb=$($PARE upload-model "$FX/rgb16_cnn.pt" --input-shape 1,3,16,16)
expect_rc 0 "static INT8 on an image-folder dataset" $PARE --json submit --model "$rgb" --recipe static.json \
  --calibration "$imgs" --eval "$imgs" --wait
"$PY" -c "import json; j=json.load(open('$work/out')); r=j['reports'][1]; assert r['stats']['hasAccuracy'] and r['notes'][0]=='calibrated on 16 images' and r['notes'][1].startswith('activations: ') and all(n.startswith('WARNING: slower') or n.startswith('timing unsteady') or 'middle zero point' in n for n in r['notes'][2:]), r" \
  || fail "image-folder job report"
bad_imgs=$($PARE upload-dataset "$FX/images_bad.tar" --format image-folder)
expect_rc 1 "a job on an image that does not decode" $PARE submit --model "$rgb" --recipe static.json \
  --eval "$bad_imgs" --wait
grep -q "a/broken.png" "$work/out" "$work/err" || fail "the undecodable image is not named"

# Offline: the same engine without a server.
expect_rc 0 "compress" $PARE compress "$FX/small_cnn.pt" --recipe recipe.json -o offline.pt --report offline.json \
  --input-shape 1,1,28,28 --eval "$FX/mnist_like.pt" --threads 1 --latency-batches 4,1
# Each batch size's p50 is labelled on the summary line, the first (4) too.
grep -Eq "p50 [0-9.]+ ms \(b4\), [0-9.]+ ms \(b1\) agree" "$work/out" || fail "compress's p50s are not labelled"
"$PY" -c "import torch; print(torch.jit.load('offline.pt')(torch.randn(1,1,28,28)).shape)" >/dev/null || fail "offline result"
expect_rc 0 "compress with an image folder" $PARE compress "$FX/rgb16_cnn.pt" --recipe static.json -o offline-rgb.pt \
  --calibration "$FX/images" --eval "$FX/images" --format image-folder --threads 1
grep -q "centred" "$work/out" || fail "compress's summary has no centred cosine"
grep -q "^    - agreement (top-1 agreement, cosines) on " "$work/out" || fail "compress's summary has no notes"
# Bad input is refused before any work, naming what is wrong.
expect_rc 2 "compress with a negative thread count" $PARE compress "$FX/small_cnn.pt" --recipe recipe.json \
  -o neg.pt --input-shape 1,1,28,28 --threads -1
grep -q -- "--threads" "$work/err" || fail "the negative thread count is not named"
grep -q "not in range 0 to 4096" "$work/err" || fail "the thread count's range is not stated plainly"
expect_rc 2 "a worker with a negative thread count" "$BIN/worker/pare-worker" --threads -1
grep -q -- "--threads" "$work/err" || fail "the worker's negative thread count is not named"
expect_rc 2 "a server with a negative worker thread count" "$BIN/server/pare-server" --worker-threads -1
grep -q -- "--worker-threads" "$work/err" || fail "the server's negative worker thread count is not named"
expect_rc 2 "compress to a folder that does not exist" $PARE compress "$FX/small_cnn.pt" --recipe recipe.json \
  -o "$work/no/such/dir/o.pt" --input-shape 1,1,28,28
grep -q "no/such/dir does not exist" "$work/err" || fail "the missing output folder is not named"
expect_rc 2 "compress with a batch size twice" $PARE compress "$FX/small_cnn.pt" --recipe recipe.json -o o.pt \
  --input-shape 1,1,28,28 --latency-batches 1,4,1
grep -q -- "--latency-batches: batch size 1 is given twice" "$work/err" || fail "a repeated batch size is not named"
# pare-worker refuses the same before it talks to any server.
expect_rc 2 "pare-worker with a batch size twice" "$BIN/worker/pare-worker" --server 127.0.0.1:1 \
  --latency-batches 8,8
grep -q -- "--latency-batches: batch size 8 is given twice" "$work/err" || fail "pare-worker: repeated batch size"
expect_rc 2 "pare-worker with batch size 0" "$BIN/worker/pare-worker" --server 127.0.0.1:1 --latency-batches 0
grep -q -- "--latency-batches: batch size 0 is not in 1..4096" "$work/err" || fail "pare-worker: batch size 0"
for budget in nan abc -1; do
  expect_rc 2 "compress with --latency-budget $budget" $PARE compress "$FX/small_cnn.pt" --recipe recipe.json \
    -o o.pt --input-shape 1,1,28,28 --latency-budget "$budget"
  grep -q -- "--latency-budget: '$budget' is not" "$work/err" || fail "a bad --latency-budget ($budget) is not named"
done
echo '{"steps":[{"prune":{"magnitude":{"amount":0.5}}},]}' >trailing-comma.json
expect_rc 4 "a recipe with a trailing comma" $PARE compress "$FX/small_cnn.pt" --recipe trailing-comma.json \
  -o o.pt --input-shape 1,1,28,28
grep -q "not valid JSON" "$work/err" || fail "the recipe's JSON error is not said"
"$PY" -c "import torch; x=torch.randn(8,1,28,28); x[3,0,1,1]=float('nan'); torch.save({'images': x}, 'nan.pt')"
expect_rc 1 "compress on a calibration set holding NaN" $PARE compress "$FX/small_cnn.pt" --recipe static.json \
  -o o.pt --input-shape 1,1,28,28 --calibration nan.pt
grep -q "BAD_DATASET: 'images' holds NaN or infinite values in 1 sample(s), the first at index 3" "$work/err" \
  || fail "NaN in a dataset is not named"
# An input shape without its batch dimension: the message says which dimension is the batch.
expect_rc 1 "compress with a batch-less input shape" $PARE compress "$FX/small_cnn.pt" --recipe static.json \
  -o o.pt --input-shape 1,28,28
grep -q "MODEL_RUN: the model's forward failed on inputs of shape \[28, 28\] (one sample of the input shape \[1, 28, 28\], whose first dimension is the batch)" "$work/err" \
  || { cat "$work/err" >&2; fail "a batch-less input shape is not explained"; }

kill -TERM "$server_pid"; wait "$server_pid" || fail "pare-server did not exit cleanly on SIGTERM"
server_pid=""

# Mutual TLS from the CLI: certificates made here; without the client certificate, no answer.
echo "subjectAltName=DNS:localhost,IP:127.0.0.1" >san.ext
openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 1 -subj /CN=cli-test-ca 2>/dev/null
for n in server client; do
  openssl req -newkey rsa:2048 -nodes -keyout $n.key -out $n.csr -subj /CN=$n 2>/dev/null
  openssl x509 -req -in $n.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out $n.pem -days 1 -extfile san.ext 2>/dev/null
done
"$BIN/server/pare-server" --listen 127.0.0.1:0 --metrics-listen "" --data-dir "$work/tls-data" --local-workers 0 \
  --tls-cert server.pem --tls-key server.key --tls-client-ca ca.pem >"$work/tls.out" 2>"$work/tls.log" &
server_pid=$!
for _ in $(seq 100); do grep -q "listening on" "$work/tls.out" 2>/dev/null && break; sleep 0.1; done
tls_server=$(grep -o 'listening on 127.0.0.1:[0-9]*' "$work/tls.out" | grep -o '127.0.0.1:[0-9]*')
expect_rc 0 "list over mutual TLS" $PARE --server "$tls_server" --tls-ca ca.pem --tls-cert client.pem --tls-key client.key list
expect_rc 3 "list over TLS without a client certificate" $PARE --server "$tls_server" --timeout 3 --tls-ca ca.pem list
expect_rc 3 "list in plaintext to a TLS port" $PARE --server "$tls_server" --timeout 3 list
expect_rc 2 "a TLS file that is not PEM" $PARE --server "$tls_server" --tls-ca recipe.json list
kill -TERM "$server_pid"; wait "$server_pid" || true
server_pid=""

# Local workers share the machine: without --worker-threads, each job runs on its worker's share
# of the CPUs (the workers say so as they start; their logs are the server's).
"$BIN/server/pare-server" --listen 127.0.0.1:0 --metrics-listen "" --data-dir "$work/shared-data" --local-workers 2 \
  >"$work/shared.out" 2>"$work/shared.log" &
server_pid=$!
for _ in $(seq 300); do [ "$(grep -c '"msg":"worker started"' "$work/shared.log" 2>/dev/null)" = 2 ] && break; sleep 0.1; done
[ "$(grep '"msg":"worker started"' "$work/shared.log" | grep -c 'shared by 2 workers')" = 2 ] \
  || { cat "$work/shared.log" >&2; fail "two local workers do not split the CPUs"; }
kill -TERM "$server_pid"; wait "$server_pid" || true
server_pid=""
echo "cli_test: all checks passed"
