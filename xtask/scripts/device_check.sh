#!/usr/bin/env bash
# The GPU check of bench-table (README "GPU"): on a machine with PyTorch 2.11's libtorch, the
# carried release CLI runs ViT-Tiny float and 8/8/4 on CUDA and on the CPU, and reports
# per-image top-1 agreement and images/s. Usage: device_check.sh PACK (from device_pack.sh).
# Writes PACK-independent results to $OUT (default ./device-check-out). CHECK_DEVICE=cpu runs
# the "CUDA" side on the CPU too (a rehearsal of the script where there is no GPU).
set -euo pipefail
pack=${1:?usage: device_check.sh PACK}
out=${OUT:-device-check-out}
dev=${CHECK_DEVICE:-cuda}
mkdir -p "$out"
if [[ -z "${LIBTORCH:-}" ]]; then
    LIBTORCH=$(python3 -c 'import os, torch; print(os.path.dirname(torch.__file__))')
fi
export LD_LIBRARY_PATH="$LIBTORCH/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
cli=("$pack/fqvit-cli" -q)
"${cli[@]}" doctor | tee "$out/doctor.txt"
w=(--weights-dir "$pack/weights")
calib=(--calib-batchsize 50 --calib-iter 2 --calib-order sorted)
run() { # name args...
    local name=$1
    shift
    local t0=$SECONDS
    "${cli[@]}" "$@" --json "$out/$name.json" > "$out/$name.txt" 2>&1 || {
        echo "FAILED: $name"
        tail -n 20 "$out/$name.txt"
        return 1
    }
    echo "$name: $((SECONDS - t0)) s"
}
status=0
run float-cpu eval vit_tiny "$pack/data" "${w[@]}" --device cpu || status=1
run float-dev eval vit_tiny "$pack/data" "${w[@]}" --device "$dev" || status=1
# One calibration, replayed on both devices: the agreement isolates the quantized forward.
"${cli[@]}" quantize vit_tiny "$pack/data" "${w[@]}" --device cpu --ptf --lis "${calib[@]}" \
    -o "$out/vit_tiny-8-8-4.safetensors" > "$out/quantize.txt" 2>&1 || {
    echo "FAILED: quantize"
    tail -n 20 "$out/quantize.txt"
    status=1
}
run q884-cpu eval vit_tiny "$pack/data" --qparams "$out/vit_tiny-8-8-4.safetensors" --device cpu || status=1
run q884-dev eval vit_tiny "$pack/data" --qparams "$out/vit_tiny-8-8-4.safetensors" --device "$dev" || status=1
# Calibrating on the device as well (what a bench-table cell does).
run q884-calib-dev eval vit_tiny "$pack/data" "${w[@]}" --device "$dev" --quant --ptf --lis "${calib[@]}" || status=1
for m in vit_tiny deit_small deit_base swin_tiny; do
    "${cli[@]}" bench "$m" --device "$dev" --batch-size 32 --json "$out/bench-$m.json" \
        > "$out/bench-$m.txt" 2>&1 || {
        echo "FAILED: bench $m"
        tail -n 20 "$out/bench-$m.txt"
        status=1
    }
done
python3 - "$out" "$dev" <<'PY'
import json, os, sys
out, dev = sys.argv[1], sys.argv[2]
def load(name):
    p = os.path.join(out, name + ".json")
    return json.load(open(p)) if os.path.exists(p) else None
print(f"| check | top-1 CPU | top-1 {dev} | equal top-1 | equal top-5 lists | {dev} images/s |")
print("|---|---|---|---|---|---|")
for label, a, b in [("float", "float-cpu", "float-dev"), ("8/8/4, same qparams", "q884-cpu", "q884-dev")]:
    x, y = load(a), load(b)
    if not (x and y):
        print(f"| {label} | missing | | | | |"); continue
    px, py = x["predictions"], y["predictions"]
    if [p["path"] for p in px] != [p["path"] for p in py]:
        print(f"| {label} | the two runs saw different images | | | | |"); continue
    t1 = sum(p["top5"][0] == q["top5"][0] for p, q in zip(px, py))
    t5 = sum(p["top5"] == q["top5"] for p, q in zip(px, py))
    n = len(px)
    print(f"| {label} | {x['top1']:.2f} | {y['top1']:.2f} | {t1}/{n} ({100*t1/n:.1f} %) | {t5}/{n} | {y['images']/y['eval_seconds']:.0f} |")
c = load("q884-calib-dev")
if c:
    print(f"| 8/8/4 calibrated on {dev} | | {c['top1']:.2f} | | | {c['images']/c['eval_seconds']:.0f} |")
print()
print(f"| model (random weights, batch 32, {dev}) | float images/s | 8/8/4 images/s |")
print("|---|---|---|")
for m in ["vit_tiny", "deit_small", "deit_base", "swin_tiny"]:
    b = load("bench-" + m)
    if b:
        print(f"| {m} | {b['float_images_per_s']:.0f} | {b['quantized_images_per_s']:.0f} |")
PY
exit $status
