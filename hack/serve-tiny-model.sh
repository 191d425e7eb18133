#!/usr/bin/env bash
# Serve the in-pod runtime (presets/inference) on this machine over a tiny random model built on the spot
# (nothing is downloaded), so the seed's /chat call and the OpenAI API can be tried with curl:
#   bash hack/serve-tiny-model.sh            # listens on 127.0.0.1:${PORT:-5000}; Ctrl-C stops it
#   curl -X POST http://127.0.0.1:5000/chat -H "Content-Type: application/json" -d '{"prompt":"Hello"}'
# The answer is random text (the weights are random); everything else is the real server.
set -euo pipefail
cd "$(dirname "$0")/.."
make --no-print-directory runtime-venv >&2

model_dir=$(mktemp -d -t kaito-tiny-model-XXXXXX)
trap 'rm -rf "$model_dir"' EXIT
.venv-runtime/bin/python hack/tiny_model.py "$model_dir"
echo "serving a tiny random Llama from $model_dir on http://127.0.0.1:${PORT:-5000}" >&2
.venv-runtime/bin/python presets/inference/inference_api.py --pipeline=text-generation \
  --pretrained_model_name_or_path="$model_dir" --served_model_name=tiny-llama --torch_dtype=float32 \
  --device_map=cpu --host=127.0.0.1 --port="${PORT:-5000}"
