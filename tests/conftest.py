"""Shared test setup.

The Triton interpreter must be switched on before any ``@triton.jit`` function is
defined, so it is set here, at import time, ahead of every dlo import.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

SEED = 1234


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(SEED)
    torch.manual_seed(SEED)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def tiny_llama_config():
    """A 4-layer Llama small enough for fp32 CPU tests (GQA on, so d_kv < d)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
