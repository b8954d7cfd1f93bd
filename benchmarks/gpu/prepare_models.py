"""Model directories for dummy-weight engines on the GPU machine (no hub there): each is
a committed config (configs/NAME.json) plus the embedded SmolLM2 tokenizer, whose ids all
fit every config's vocabulary. Run on the CPU side; carry the output folder.

    .venv/bin/python benchmarks/gpu/prepare_models.py .gpu_models
"""
import json
import shutil
import sys
from pathlib import Path

from vllm_kvflow.model import default_model_path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def main(dest: str) -> None:
    src = Path(default_model_path())
    for cfg in sorted((Path(__file__).parent / "configs").glob("*.json")):
        out = Path(dest) / cfg.stem
        out.mkdir(parents=True, exist_ok=True)
        config = json.loads(cfg.read_text())
        (out / "config.json").write_text(json.dumps(config, indent=1))
        for name in TOKENIZER_FILES:
            if (src / name).exists():
                shutil.copy(src / name, out / name)
        print(out)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".gpu_models")
