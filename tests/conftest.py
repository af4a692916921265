"""Shared test setup.

On a machine without CUDA the Triton kernels run in the interpreter, which must be switched on
before any ``@triton.jit`` function is defined: it is set here, at import time, ahead of every
dlo import. On a CUDA machine it stays off, so the gpu-marked tests run compiled kernels, and the
interpreter tests (CPU tensors through Triton) are left to CPU machines.
"""

import os

import torch

ON_CUDA = torch.cuda.is_available()
if not ON_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hashlib  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

SEED = 1234


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(SEED)
    torch.manual_seed(SEED)
    yield


def pytest_collection_modifyitems(config, items):
    if ON_CUDA:
        skip = pytest.mark.skip(reason="runs Triton on CPU tensors in the interpreter (CPU machines); "
                                       "tests/test_kernels_gpu.py runs the compiled kernels here")
        marker = "interpreter"
    else:
        skip = pytest.mark.skip(reason="needs a CUDA device")
        marker = "gpu"
    for item in items:
        if marker in item.keywords:
            item.add_marker(skip)


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


# -- a Hugging Face hub cache holding the tiny default, for tests of hub ids ---------------------------------------

TINY_BASE = Path(__file__).resolve().parents[1] / "assets" / "tiny" / "base"


@dataclass
class HubCache:
    home: Path  # what HF_HOME points at
    hub: Path  # the cache itself, HF_HOME/hub
    repo: str  # the id of the cached model
    commit: str  # its commit; refs/main names it
    snapshot: Path


def cache_model(hf_home: Path, source: Path, repo_id: str, commit: str, ref: str = "main") -> Path:
    """Put ``source`` into a hub cache laid out as huggingface_hub writes it: blobs named by content,
    ``snapshots/<commit>/`` holding symlinks to them, ``refs/<ref>`` holding the commit."""
    storage = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = storage / "snapshots" / commit
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for file in sorted(source.iterdir()):
        blob = storage / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="session")
def hub_cache(tmp_path_factory) -> HubCache:
    home = tmp_path_factory.mktemp("hf_home")
    repo, commit = "dlo-test/tiny", "0123456789abcdef0123456789abcdef01234567"
    return HubCache(home, home / "hub", repo, commit, cache_model(home, TINY_BASE, repo, commit))


@pytest.fixture
def offline_hub(hub_cache, monkeypatch) -> HubCache:
    """This process resolves hub ids from ``hub_cache`` only, never the network. huggingface_hub reads
    HF_HOME and HF_HUB_OFFLINE at import, so its constants are patched as well as the environment."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HOME", str(hub_cache.home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache.hub))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return hub_cache


@pytest.fixture(scope="session")
def run_dlo():
    """``run_dlo(*argv, **env)``: the ``dlo`` command in a fresh process importing this checkout, with
    ``env`` added to the environment (``None`` removes a variable); returns the CompletedProcess."""
    import subprocess
    import sys

    root = TINY_BASE.parents[2]

    def run(*argv, **env):
        merged = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root), **env}
        full_env = {name: value for name, value in merged.items() if value is not None}
        entry = "import sys; from dlo.cli import main; sys.exit(main())"
        return subprocess.run([sys.executable, "-c", entry, *map(str, argv)], cwd=root, env=full_env,
                              capture_output=True, text=True, timeout=300)

    return run


def _logits_and_grads(model, batch, train: bool):
    """One forward of ``batch`` (training: and backward): the logits, and every parameter's gradient by name."""
    model.train(train)
    model.zero_grad(set_to_none=True)
    out = model(**batch, use_cache=False)
    if train:
        out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def logits_and_grads():
    """``fn(model, batch, train) -> (logits, {name: grad})``, for comparing two attention paths."""
    return _logits_and_grads
