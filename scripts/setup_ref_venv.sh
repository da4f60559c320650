#!/usr/bin/env bash
# Create (or reuse) the reference Python environment used by scripts/gen_fixtures.py (and the
# other scripts/gen_*_fixtures.py; gen_vit_fixtures.py also needs onnx and onnxruntime;
# gen_decoder_fixtures.py and gen_gemma3_fixtures.py need sentencepiece and llama-cpp-python, which
# builds llama.cpp from source: several minutes).
# Idempotent: re-running only installs what is missing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-ref"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "creating $VENV"
    "$PY" -m venv "$VENV"
fi

if "$VENV/bin/python" -c "import torch, transformers, peft, safetensors, tokenizers, numpy, gguf, onnx, onnxruntime, sentencepiece, google.protobuf, llama_cpp" 2>/dev/null; then
    echo "reference venv already complete"
else
    "$VENV/bin/python" -m pip install --upgrade pip
    # Prefer the CPU-only torch wheel; fall back to plain PyPI if that index is unreachable.
    if ! "$VENV/bin/python" -m pip install --timeout 20 --retries 1 --index-url https://download.pytorch.org/whl/cpu torch 2>/dev/null; then
        echo "CPU torch index unreachable; installing torch from PyPI"
        "$VENV/bin/python" -m pip install torch
    fi
    "$VENV/bin/python" -m pip install transformers peft safetensors tokenizers numpy gguf onnx onnxruntime sentencepiece protobuf
    "$VENV/bin/python" -m pip install llama-cpp-python
fi

"$VENV/bin/python" -c "import torch, transformers, peft, safetensors, tokenizers; print('torch', torch.__version__); print('transformers', transformers.__version__); print('peft', peft.__version__); print('safetensors', safetensors.__version__); print('tokenizers', tokenizers.__version__)"
