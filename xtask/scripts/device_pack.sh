#!/usr/bin/env bash
# Packs what the GPU check needs into target/device-check/ (about 52 MiB; the device tool
# carries at most 64 MiB): the stripped release CLI, the ViT-Tiny weights, the first 300 val
# and 100 train images of the shared sample in sorted order. Then, with the device tool:
#   run(carry=["target/device-check"], command="bash xtask/scripts/device_check.sh target/device-check")
set -euo pipefail
cd "$(dirname "$0")/../.."
shared=${FQVIT_SHARED_DIR:-../shared}
pack=target/device-check
cargo build --release -p fqvit-cli
rm -rf "$pack"
mkdir -p "$pack/weights" "$pack/data"
strip -o "$pack/fqvit-cli" target/release/fqvit-cli
cp -r "$shared/weights/vit_tiny_patch16_224.augreg_in21k_ft_in1k" "$pack/weights/"
copy_first() { # split count
    (cd "$shared/imagenet-sample" && find "$1" -type f | LC_ALL=C sort | head -n "$2") |
        while read -r f; do
            mkdir -p "$pack/data/$(dirname "$f")"
            cp "$shared/imagenet-sample/$f" "$pack/data/$f"
        done
}
copy_first val 300
copy_first train 100
du -sh "$pack"
