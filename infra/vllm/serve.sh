#!/usr/bin/env bash
# vLLM servers for the captioning and judging models, one per GPU machine (or per GPU with
# CUDA_VISIBLE_DEVICES), in vLLM's own environment (`pip install "vllm>=0.33"` or the
# vllm/vllm-openai image): vLLM pins its own torch, so it never shares the project's.
#
#   infra/vllm/serve.sh captioner   # Qwen2.5-VL-7B-Instruct on :8000 (configs/sdxl.yaml's captioner)
#   infra/vllm/serve.sh judge       # InternVL3-8B on :8001 (second IFS judge; InternVL captioner)
#
# Both speak the OpenAI-compatible API the project's `openai_http` backend and judges use;
# structured output (`structured_outputs: {"json": ...}`) needs no flag. Requests carry images
# as data URIs: --limit-mm-per-prompt bounds the images per request (crops grouped by
# `instances_per_request`). VLLM_API_KEY must be set here and in every Ray worker that sends.
set -euo pipefail

role="${1:?usage: serve.sh captioner|judge}"
: "${VLLM_API_KEY:?set VLLM_API_KEY (the same value the Ray workers get)}"

case "$role" in
  captioner)
    exec vllm serve Qwen/Qwen2.5-VL-7B-Instruct \
      --host 0.0.0.0 --port "${PORT:-8000}" --api-key "$VLLM_API_KEY" \
      --max-model-len 16384 --limit-mm-per-prompt '{"image": 5}' \
      --gpu-memory-utilization 0.90 --enable-prefix-caching
    ;;
  judge)
    exec vllm serve OpenGVLab/InternVL3-8B-hf \
      --host 0.0.0.0 --port "${PORT:-8001}" --api-key "$VLLM_API_KEY" \
      --max-model-len 16384 --limit-mm-per-prompt '{"image": 5}' \
      --gpu-memory-utilization 0.90 --enable-prefix-caching
    ;;
  *)
    echo "serve.sh: unknown role $role (captioner or judge)" >&2
    exit 2
    ;;
esac
