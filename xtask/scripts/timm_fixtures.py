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

# The paper's original checkpoint formats, written from the variants and checked with timm's
# own converters, for `fqvit-cli convert`: a DeiT `.pth` ({"model": state dict}, timm's keys),
# a Swin `.pth` in Microsoft's layout (patch merging at the end of a stage, `head.*`, the
# derived buffers), and a ViT AugReg `.npz` (spec section 10).
import numpy as np
from timm.models import swin_transformer, vision_transformer


def variant_state(variant):
    tensors = load_file(os.path.join(OUT, f"{variant}.safetensors"))
    return {k: v for k, v in tensors.items() if not k.startswith("fixture.")}


def model_of(variant):
    timm_name, kwargs = VARIANTS[variant]
    return timm.create_model(timm_name, pretrained=False, **kwargs).eval()


torch.save({"model": variant_state("deit_variant")}, os.path.join(OUT, "deit_variant.pth"))

timm_sd = variant_state("swin_variant")
swin = model_of("swin_variant")
original = {}
for key, value in timm_sd.items():
    if ".downsample." in key:
        stage = int(key.split(".")[1])
        key = key.replace(f"layers.{stage}.downsample", f"layers.{stage - 1}.downsample")
    original[key.replace("head.fc.", "head.")] = value
for s, layer in enumerate(swin.layers):
    for b, block in enumerate(layer.blocks):
        original[f"layers.{s}.blocks.{b}.attn.relative_position_index"] = block.attn.relative_position_index.clone()
        if block.attn_mask is not None:
            original[f"layers.{s}.blocks.{b}.attn_mask"] = block.attn_mask.clone()
back = swin_transformer.checkpoint_filter_fn({"model": original}, swin)
assert back.keys() == timm_sd.keys() and all(torch.equal(back[k], timm_sd[k]) for k in back), "Swin layout"
torch.save({"model": original}, os.path.join(OUT, "swin_variant.pth"))

vit_sd = variant_state("vit_variant")
vit = model_of("vit_variant")
heads = vit.blocks[0].attn.num_heads
d = vit_sd["cls_token"].shape[-1]
hd = d // heads
npz = {
    "embedding/kernel": vit_sd["patch_embed.proj.weight"].permute(2, 3, 1, 0),
    "embedding/bias": vit_sd["patch_embed.proj.bias"],
    "cls": vit_sd["cls_token"],
    "Transformer/posembed_input/pos_embedding": vit_sd["pos_embed"],
    "Transformer/encoder_norm/scale": vit_sd["norm.weight"],
    "Transformer/encoder_norm/bias": vit_sd["norm.bias"],
    "head/kernel": vit_sd["head.weight"].T,
    "head/bias": vit_sd["head.bias"],
}
for i in range(len(vit.blocks)):
    b, p = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
    npz[p + "LayerNorm_0/scale"], npz[p + "LayerNorm_0/bias"] = vit_sd[b + "norm1.weight"], vit_sd[b + "norm1.bias"]
    npz[p + "LayerNorm_2/scale"], npz[p + "LayerNorm_2/bias"] = vit_sd[b + "norm2.weight"], vit_sd[b + "norm2.bias"]
    qkv_w, qkv_b = vit_sd[b + "attn.qkv.weight"], vit_sd[b + "attn.qkv.bias"]
    for j, n in enumerate(("query", "key", "value")):
        npz[p + f"MultiHeadDotProductAttention_1/{n}/kernel"] = qkv_w[j * d:(j + 1) * d].T.reshape(d, heads, hd)
        npz[p + f"MultiHeadDotProductAttention_1/{n}/bias"] = qkv_b[j * d:(j + 1) * d].reshape(heads, hd)
    npz[p + "MultiHeadDotProductAttention_1/out/kernel"] = vit_sd[b + "attn.proj.weight"].T.reshape(heads, hd, d)
    npz[p + "MultiHeadDotProductAttention_1/out/bias"] = vit_sd[b + "attn.proj.bias"]
    for r in range(2):
        npz[p + f"MlpBlock_3/Dense_{r}/kernel"] = vit_sd[b + f"mlp.fc{r + 1}.weight"].T
        npz[p + f"MlpBlock_3/Dense_{r}/bias"] = vit_sd[b + f"mlp.fc{r + 1}.bias"]
npz_path = os.path.join(OUT, "vit_variant.npz")
np.savez(npz_path, **{k: v.contiguous().numpy() for k, v in npz.items()})
check = model_of("vit_variant")
with torch.no_grad():
    vision_transformer._load_weights(check, npz_path)
assert all(torch.equal(v, vit_sd[k]) for k, v in check.state_dict().items()), "AugReg layout"

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
