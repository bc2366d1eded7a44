"""Writes the timm parity fixtures of fqvit-models (run by `cargo xtask timm-fixtures`).

usage: timm_fixtures.py OUT_DIR SHARED_DIR

- `<variant>.safetensors` for small random-initialised variants of each family: the state dict
  (timm key names) plus `fixture.input` and `fixture.logits` (timm's float logits);
- `manifest.json`: timm's parameter names and shapes for every full-size model, and the
  variants' hyper-parameters;
- `vit_tiny_shared.safetensors`: timm's preprocessed input and logits for the real ViT-Tiny
  weights on two shared validation images.
"""

import json
import os
import sys

import timm
import torch
from safetensors.torch import load_file, save_file

OUT, SHARED = sys.argv[1], sys.argv[2]
os.makedirs(OUT, exist_ok=True)
# The unfused attention is the original's operation order (and ours).
timm.layers.set_fused_attn(False)
torch.use_deterministic_algorithms(True)

FULL = {
    "vit_tiny": "vit_tiny_patch16_224",
    "deit_tiny": "deit_tiny_patch16_224",
    "deit_small": "deit_small_patch16_224",
    "deit_base": "deit_base_patch16_224",
    "vit_base": "vit_base_patch16_224",
    "vit_large": "vit_large_patch16_224",
    "swin_tiny": "swin_tiny_patch4_window7_224",
    "swin_small": "swin_small_patch4_window7_224",
    "swin_base": "swin_base_patch4_window7_224",
}

# Small variants: every structural path of the full models (for Swin: shifted windows and the
# mask in stages 0-1, the stage-4 rule in stages 2-3, patch merging) at a fraction of the size.
VARIANTS = {
    "vit_variant": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)),
    "deit_variant": ("deit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10)),
    "swin_variant": ("swin_tiny_patch4_window7_224", dict(img_size=64, window_size=4, embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2), num_classes=10)),
}

manifest = {"timm": timm.__version__, "torch": torch.__version__, "models": {}, "variants": {}}
for name, timm_name in FULL.items():
    with torch.device("meta"):
        model = timm.create_model(timm_name, pretrained=False)
    manifest["models"][name] = {
        "timm": timm_name,
        "parameters": [[k, list(v.shape)] for k, v in model.state_dict().items()],
    }

for seed, (variant, (timm_name, kwargs)) in enumerate(VARIANTS.items()):
    torch.manual_seed(seed)
    model = timm.create_model(timm_name, pretrained=False, **kwargs).eval()
    # timm's init leaves LayerNorms at identity and biases at zero: randomise everything so
    # every parameter matters to the logits.
    with torch.no_grad():
        for key, p in model.named_parameters():
            base = 1.0 if key.endswith("norm.weight") or ".norm1.weight" in key or ".norm2.weight" in key else 0.0
            p.copy_(base + 0.2 * torch.randn_like(p))
    x = torch.randn(2, 3, kwargs["img_size"], kwargs["img_size"])
    with torch.no_grad():
        logits = model(x)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    tensors["fixture.input"] = x.contiguous()
    tensors["fixture.logits"] = logits.contiguous()
    save_file(tensors, os.path.join(OUT, f"{variant}.safetensors"))
    manifest["variants"][variant] = {"timm": timm_name, "kwargs": kwargs}

# The real ViT-Tiny on two shared validation images, through timm's own preprocessing.
weights = os.path.join(SHARED, "weights/vit_tiny_patch16_224.augreg_in21k_ft_in1k/model.safetensors")
model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
model.load_state_dict(load_file(weights))
config = timm.data.resolve_data_config({}, model=model)
transform = timm.data.create_transform(**config)
val = os.path.join(SHARED, "imagenet-sample/val")
images = []
for wnid in sorted(os.listdir(val))[:2]:
    first = sorted(os.listdir(os.path.join(val, wnid)))[0]
    images.append(os.path.join("val", wnid, first))
from PIL import Image

x = torch.stack([transform(Image.open(os.path.join(SHARED, "imagenet-sample", p)).convert("RGB")) for p in images])
with torch.no_grad():
    logits = model(x)
save_file(
    {"input": x.contiguous(), "logits": logits.contiguous()},
    os.path.join(OUT, "vit_tiny_shared.safetensors"),
    metadata={"images": json.dumps(images), "data_config": json.dumps({k: str(v) for k, v in config.items()})},
)

with open(os.path.join(OUT, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=1)
    f.write("\n")
print(f"wrote fixtures for {len(FULL)} models, {len(VARIANTS)} variants and the shared ViT-Tiny to {OUT}")
