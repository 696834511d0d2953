"""megachat: nanochat's ChatGPT recipe as a tensor x pipeline x data parallel DeepSpeed trainer.

Install with `make setup` (or `pip install -e '.[dev]'` inside an environment that already has torch):
the torch requirement is a range, so a CUDA torch already present on a GPU box is left alone, and on a
CPU box `make setup` first installs the CPU wheel `torch==2.13.0`.
"""
from setuptools import setup

setup(
    name="megachat",
    version="0.1.0",
    description="nanochat's full-stack ChatGPT recipe on DeepSpeed: TP x PP x DP, ZeRO, Muon, Triton kernels",
    python_requires=">=3.10",
    packages=["megachat", "megachat.kernels", "megachat.evaluation", "megachat.tasks"],
    package_dir={"megachat.kernels": "kernels"},
    package_data={"megachat": ["chat_ui.html"]},  # the chat page scripts/chat_web.py serves
    install_requires=[
        "torch>=2.4",  # a range: keeps an installed CUDA torch; `make setup` puts the CPU wheel on a CPU box
        "deepspeed>=0.19.8,<0.20",  # megachat/deepspeed_internals.py: tested on this range
        "triton>=3.0",
        "tiktoken>=0.9",  # 0.9 added the buffer encoder (encode_to_numpy) that preprocessing calls
        "rustbpe>=0.1",
        "pyarrow>=14",
        "numpy>=1.24",
        "tensorboard>=2.14",
        "tqdm>=4.60",
        "safetensors>=0.4",  # sharded layout-free checkpoints, final weights and exports (megachat/sharded.py)
        "matplotlib>=3.5",  # scripts/report.py: the loss and val-bpb curves
        "fastapi>=0.110",  # scripts/chat_web.py
        "uvicorn>=0.29",
        "httptools>=0.6,<0.10",  # uvicorn's C HTTP parser (else pure-Python h11): per-token SSE chunks under load
    ],
    extras_require={
        # GPU-only extras: none of them installs on a CPU box; everything runs without them. flash-attn:
        # kernels.attention; Transformer Engine: --fp8 (tensor_parallel.use_fp8). (PyPI's `apex` is an unrelated
        # web toolkit, not NVIDIA's; megachat uses no apex.)
        "gpu": ["flash-attn>=2.5", "transformer-engine[pytorch]>=1.8"],
        # tools/export_checkpoint.py --format hf writes the tokenizer with transformers' tiktoken converter
        "hf": ["transformers>=5.23,<5.24"],
        "dev": ["pytest>=8", "pytest-timeout>=2.2", "pytest-xdist>=3.6,<4", "megatron-core==0.16.1",
                "httpx>=0.27", "openai>=1.0", "selenium>=4.10",  # tests/test_chat_web.py: HTTP, SDK, browser
                "transformers==5.23.0", "lm-eval[hf]==0.4.13",  # tests/test_hf.py: NanoChatForCausalLM, lm_eval
                "schemathesis==4.32.5"],  # tests/test_chat_web.py: the server against its /openapi.json
    },
)
