"""The peers of `cargo xtask bench-peers` for one model: libtorch fp32 and ONNX Runtime fp32/int8.

usage: bench_peers.py --model NAME --timm TIMM_NAME --shared DIR --work DIR --out JSON
                      [--batches 32,1] [--iters 5] [--calib-images 32] [--accuracy]

Builds timm's model (ViT-Tiny with its real weights from SHARED/weights, the others random with
a fixed seed), exports it to ONNX (opset 17, dynamic batch), quantizes it statically with ORT
twice on the first N sorted train images (ORT's defaults; MatMul/Gemm/Conv only), times all four
at every batch size, and with --accuracy evaluates top-1 on SHARED/imagenet-sample/val. Writes
OUT (JSON); progress on stderr. Run by xtask with PYTHONPATH = the pinned peers, then torch.
"""

import argparse
import glob
import json
import logging
import os
import platform
import sys
import tempfile
import time
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import timm
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from PIL import Image
from safetensors.torch import load_file

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("--timm", required=True)
p.add_argument("--shared", required=True)
p.add_argument("--work", required=True)
p.add_argument("--out", required=True)
p.add_argument("--batches", default="32,1")
p.add_argument("--iters", type=int, default=5)
p.add_argument("--calib-images", type=int, default=32)
p.add_argument("--accuracy", action="store_true")
args = p.parse_args()
batches = [int(b) for b in args.batches.split(",")]
args.shared, args.work, args.out = map(os.path.abspath, (args.shared, args.work, args.out))
data = os.path.join(args.shared, "imagenet-sample")
os.makedirs(args.work, exist_ok=True)
threads = os.cpu_count() or 1
torch.set_num_threads(threads)
stages = {}


def log(msg):
    print(f"[{args.model}] {msg}", file=sys.stderr, flush=True)


class Stage:
    """Times a step into `stages` and says so on stderr."""

    def __init__(self, name):
        self.name = name

    def __enter__(self):
        log(f"{self.name} ...")
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        stages[self.name] = time.perf_counter() - self.start
        if exc[0] is None:
            log(f"{self.name}: {stages[self.name]:.1f} s")


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


# --- the model -----------------------------------------------------------------------------

with Stage("build"):
    if args.model == "vit_tiny":
        folder = os.path.join(args.shared, "weights", f"{args.timm}.augreg_in21k_ft_in1k")
        files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
        if not files:
            sys.exit(f"no *.safetensors in {folder}: ViT-Tiny's real weights are needed")
        model = timm.create_model(args.timm, pretrained=False)
        model.load_state_dict(load_file(files[0]))
        weights = os.path.relpath(files[0], args.shared)
    else:
        # Random weights, as `fqvit-cli bench`'s: speed does not depend on them.
        torch.manual_seed(0)
        model = timm.create_model(args.timm, pretrained=False)
        weights = "random (seed 0)"
    model.eval()

# timm's eval transform for this model's pretrained config (crop_pct 0.9 for ViT AugReg and
# Swin, 0.875 for DeiT; bicubic; the model's mean/std): what `fqvit-cli` reproduces.
data_config = timm.data.resolve_data_config({}, model=model)
transform = timm.data.create_transform(**data_config)


def load(paths):
    return torch.stack([transform(Image.open(p).convert("RGB")) for p in paths]).numpy()


# The CLI's `--calib-order sorted`: every train file in sorted path order, the first N.
train = sorted(glob.glob(os.path.join(data, "train", "*", "*")))
if len(train) < args.calib_images:
    sys.exit(f"--calib-images {args.calib_images}: {data}/train has only {len(train)} images")
calib_paths = train[: args.calib_images]

# --- ONNX export and ORT quantization ---------------------------------------------------------

fp32_path = os.path.join(args.work, "fp32.onnx")
pre_path = os.path.join(args.work, "fp32.pre.onnx")
int8_paths = {
    "ort_int8_default": os.path.join(args.work, "int8.default.onnx"),
    "ort_int8_matmul": os.path.join(args.work, "int8.matmul.onnx"),
}

with Stage("export"), warnings.catch_warnings():
    # Its warnings (the exporter's deprecation, the tracer's Python booleans) are expected.
    warnings.simplefilter("ignore")
    # The TorchScript exporter: opset 17 for every model and no onnxscript to pin; the default
    # torch.export one needs onnxscript and keeps Swin at opset 18 (no Pad adapter down to 17).
    torch.onnx.export(
        model,
        (torch.randn(1, 3, 224, 224),),
        fp32_path,
        input_names=["input"],
        output_names=["logits"],
        opset_version=17,
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        dynamo=False,
    )
    onnx.checker.check_model(fp32_path)

with Stage("pre-process"):
    # ORT's recommended step before quantize_static: symbolic shape inference and graph
    # optimisation, so that the quantizer sees fused, shaped ops. Swin's traced window padding
    # leaves symbolic sizes it cannot compare ("Incomplete symbolic shape inference"):
    # auto_merge, ORT's own remedy, merges them (it says so per dimension: quietened).
    logging.getLogger("onnxruntime.tools.symbolic_shape_infer").setLevel(logging.ERROR)
    # When it gives up it saves sym_shape_infer_temp.onnx and a copy of the weights in the
    # working folder: a scratch one, removed after.
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as scratch:
        os.chdir(scratch)
        try:
            quant_pre_process(fp32_path, pre_path)
            pre_process = "quant_pre_process defaults"
        except Exception as e:
            log(f"quant_pre_process failed ({e}); again with auto_merge=True")
            quant_pre_process(fp32_path, pre_path, auto_merge=True)
            pre_process = "quant_pre_process auto_merge=True"
        finally:
            os.chdir(cwd)


class Reader(CalibrationDataReader):
    """The calibration images, one per batch."""

    def __init__(self, images):
        self.images = images
        self.i = 0

    def get_next(self):
        if self.i == len(self.images):
            return None
        self.i += 1
        return {"input": self.images[self.i - 1 : self.i]}

    def rewind(self):
        self.i = 0


with Stage("calibration images"):
    calib = load(calib_paths)

with Stage("quantize (defaults)"):
    quantize_static(pre_path, int8_paths["ort_int8_default"], Reader(calib))

with Stage("quantize (MatMul/Gemm/Conv)"):
    quantize_static(
        pre_path,
        int8_paths["ort_int8_matmul"],
        Reader(calib),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["MatMul", "Gemm", "Conv"],
    )


def session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


sessions = {"ort_fp32": session(fp32_path)}
sessions.update({k: session(v) for k, v in int8_paths.items()})

# --- throughput ------------------------------------------------------------------------------


def throughput(forward, x, batch):
    """Images/s over `iters` timed runs after one warm-up, and the warm-up's output."""
    out = forward(x)  # warm-up: allocations, oneDNN/MLAS kernel selection
    start = time.perf_counter()
    for _ in range(args.iters):
        forward(x)
    return batch * args.iters / (time.perf_counter() - start), out


images_per_s = {}
agreement = {}
rng = np.random.default_rng(0)
for batch in batches:
    x = rng.standard_normal((batch, 3, 224, 224), dtype=np.float32)
    row = {}
    with Stage(f"time batch {batch}"), torch.inference_mode():
        row["torch_fp32"], ref = throughput(model, torch.from_numpy(x), batch)
        ref = ref.numpy()
        diff = {}
        for name, s in sessions.items():
            row[name], out = throughput(lambda x, s=s: s.run(None, {"input": x})[0], x, batch)
            diff[name] = float(np.abs(out - ref).max())
    # The exported graph must compute timm's logits at every batch size (a traced size baked
    # into a Reshape would not): ORT fp32 within float rounding, int8 for reference.
    if diff["ort_fp32"] > 1e-3 * max(1.0, float(np.abs(ref).max())):
        sys.exit(f"ORT fp32 differs from timm at batch {batch}: max |diff| {diff['ort_fp32']:.3g}")
    log(f"batch {batch}: " + ", ".join(f"{k} {v:.1f} img/s" for k, v in row.items()))
    images_per_s[str(batch)] = row
    agreement[str(batch)] = diff

# --- top-1 -----------------------------------------------------------------------------------

top1 = None
if args.accuracy:
    with Stage("top-1"):
        with open(os.path.join(data, "synset_words.txt")) as f:
            wnids = [line.split()[0] for line in f if line.strip()]
        # ImageNet-1k's class index is the sorted wnid's position; check the file is that
        # order and timm's own list agrees, so labels mean what the model's logits mean.
        if len(wnids) != 1000 or wnids != sorted(wnids):
            sys.exit("synset_words.txt is not the 1000 ImageNet-1k wnids in sorted order")
        timm_wnids = timm.data.ImageNetInfo().label_names()
        if list(timm_wnids) != wnids:
            sys.exit("synset_words.txt's order differs from timm's ImageNet-1k class order")
        index = {w: i for i, w in enumerate(wnids)}
        val = sorted(glob.glob(os.path.join(data, "val", "*", "*")))
        labels = np.array([index[os.path.basename(os.path.dirname(p))] for p in val])
        hits = {k: 0 for k in ["torch_fp32", *sessions]}
        for start in range(0, len(val), 100):
            x = load(val[start : start + 100])
            y = labels[start : start + 100]
            with torch.inference_mode():
                hits["torch_fp32"] += int((model(torch.from_numpy(x)).argmax(1).numpy() == y).sum())
            for name, s in sessions.items():
                hits[name] += int((s.run(None, {"input": x})[0].argmax(1) == y).sum())
            log(f"top-1: {start + len(y)}/{len(val)}")
        top1 = {k: 100.0 * v / len(val) for k, v in hits.items()}
        top1["images"] = len(val)
        log("top-1: " + ", ".join(f"{k} {v:.2f}" for k, v in top1.items()))

result = {
    "model": args.model,
    "timm": args.timm,
    "weights": weights,
    "data_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in data_config.items()},
    "cpu": cpu_name(),
    "threads": threads,
    "env": {k: os.environ[k] for k in ["ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA"] if k in os.environ},
    "versions": {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "timm": timm.__version__,
        "numpy": np.__version__,
    },
    "opset": 17,
    "exporter": "torchscript (dynamo=False)",
    "pre_process": pre_process,
    "calibration": {"images": len(calib_paths), "first": os.path.relpath(calib_paths[0], data), "last": os.path.relpath(calib_paths[-1], data), "method": "MinMax", "batch": 1},
    "quantization": {
        "ort_int8_default": "quantize_static defaults: QDQ, QInt8 activations and weights, per tensor, every op type",
        "ort_int8_matmul": "quantize_static defaults, op_types_to_quantize=[MatMul, Gemm, Conv]",
    },
    "onnx_bytes": {"ort_fp32": os.path.getsize(fp32_path), **{k: os.path.getsize(v) for k, v in int8_paths.items()}},
    "iters": args.iters,
    "images_per_s": images_per_s,
    "max_abs_diff_to_torch": agreement,
    "top1": top1,
    "stage_seconds": stages,
}
with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
    f.write("\n")
log(f"wrote {args.out}")
