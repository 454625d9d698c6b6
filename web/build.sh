#!/usr/bin/env bash
# Builds the browser demo into web/dist/: the wasm bundle (cargo for wasm32, then wasm-bindgen-cli;
# nothing that downloads binaries), the page, and the demo model. Serve web/dist/ with any static
# file server. `--dev` builds the wasm unoptimized (faster to build, for tests).
set -euo pipefail
cd "$(dirname "$0")"

profile=release
if [ "${1:-}" = "--dev" ]; then profile=dev; fi
cargo build --profile "$profile" --target wasm32-unknown-unknown -p bitnet-web
out_dir=$([ "$profile" = dev ] && echo debug || echo release)
target_dir=${CARGO_TARGET_DIR:-$PWD/../target}

rm -rf dist
mkdir -p dist/pkg dist/models/demo
wasm-bindgen --target web --no-typescript --out-dir dist/pkg \
  "$target_dir/wasm32-unknown-unknown/$out_dir/bitnet_web.wasm"
cp www/index.html www/main.js www/worker.js www/style.css dist/
cp ../models/demo/config.json ../models/demo/model.safetensors ../models/demo/tokenizer.json \
  dist/models/demo/
printf '{"name": "%s", "files": ["config.json", "model.safetensors", "tokenizer.json"]}\n' \
  "$(cat ../models/demo/NAME)" > dist/models/demo/manifest.json
echo "built web/dist ($profile); serve it with: python3 -m http.server --directory web/dist 8080"
