"""Pretrain the tiny Llama base model on the corpus (CPU, fp32, seeded).

Training samples random ``seq_len`` windows from one token stream (each play wrapped in
``<s> ... </s>``); validation uses fixed windows of the held-out speeches, which the model
never trains on. AdamW with linear warmup then cosine decay to ``min_lr_ratio`` of the peak.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from dlo.tiny.tokenizer import END


@dataclass
class PretrainConfig:
    steps: int = 1000
    seq_len: int = 256
    batch_size: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 60
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_windows: int = 32
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "seq_len", "batch_size", "eval_every", "eval_windows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps}: must be in [0, steps={self.steps})")


def tiny_llama_config(tokenizer, **overrides) -> LlamaConfig:
    """The bundled base architecture: 6 layers, d=192, 6 heads (2 KV heads), d_ff=512, tied embeddings."""
    kwargs = dict(
        vocab_size=len(tokenizer), hidden_size=192, intermediate_size=512, num_hidden_layers=6,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All texts as one 1-D id tensor, each wrapped in bos/eos."""
    # The backend tokenizer skips the HF wrapper's "longer than model_max_length" warning:
    # the stream is cut into windows afterwards.
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    ids = []
    for enc in encodings:
        ids += [tokenizer.bos_token_id, *enc.ids, tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


def _lr_factor(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _windows(stream: torch.Tensor, seq_len: int, count: int) -> torch.Tensor:
    """``count`` evenly spaced windows (deterministic validation batches)."""
    if len(stream) < seq_len:
        raise ValueError(f"token stream of {len(stream)} tokens is shorter than seq_len={seq_len}")
    starts = torch.linspace(0, len(stream) - seq_len, count).long()
    return torch.stack([stream[s:s + seq_len] for s in starts])


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch_size: int) -> float:
    model.eval()
    losses = [model(input_ids=b, labels=b).loss.item() for b in windows.split(batch_size)]
    model.train()
    return sum(losses) / len(losses)


def pretrain(model: LlamaForCausalLM, train: torch.Tensor, val: torch.Tensor, cfg: PretrainConfig,
             progress: bool = True) -> dict:
    """Train in place; returns the log: config, per-step train loss and lr, periodic val loss, timing."""
    if len(train) <= cfg.seq_len:
        raise ValueError(f"train stream has {len(train)} tokens; need more than seq_len={cfg.seq_len}")
    gen = torch.Generator().manual_seed(cfg.seed)
    val_windows = _windows(val, cfg.seq_len, cfg.eval_windows)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
    log = {"config": asdict(cfg), "train_tokens": len(train), "val_tokens": len(val), "step": [], "loss": [],
           "lr": [], "val_step": [0], "val_loss": [evaluate(model, val_windows, cfg.batch_size)]}
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="pretrain", disable=not progress)
    for step in bar:
        starts = torch.randint(0, len(train) - cfg.seq_len, (cfg.batch_size,), generator=gen)
        batch = torch.stack([train[s:s + cfg.seq_len] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        log["step"].append(step + 1)
        log["loss"].append(loss.item())
        log["lr"].append(sched.get_last_lr()[0])
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            log["val_step"].append(step + 1)
            log["val_loss"].append(evaluate(model, val_windows, cfg.batch_size))
        bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{log['val_loss'][-1]:.3f}")
    log["seconds"] = time.perf_counter() - start
    log["tokens_per_second"] = cfg.steps * cfg.batch_size * cfg.seq_len / log["seconds"]
    return log


def final_train_loss(log: dict, last: int = 50) -> float:
    """Mean of the last ``last`` step losses (a single step's loss is noisy)."""
    tail = log["loss"][-last:]
    return sum(tail) / len(tail)


def generation_config(tokenizer) -> GenerationConfig:
    """Stop on </s> and on the chat template's <|end|>, so chat replies end after one turn."""
    return GenerationConfig(bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END)])


def save_log_and_plot(log: dict, out_dir: str | Path) -> None:
    """``pretrain_log.json`` and ``pretrain_loss.png`` (train loss, its running mean, val loss)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on CI/CPU machines
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    (out_dir / "pretrain_log.json").write_text(json.dumps(log, indent=1))
    losses = torch.tensor(log["loss"])
    k = min(25, len(losses))
    smooth = torch.nn.functional.avg_pool1d(losses[None, None], k, stride=1).flatten()
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    ax.plot(log["step"], log["loss"], color="0.75", lw=0.8, label="train (per step)")
    ax.plot(log["step"][k - 1:], smooth.tolist(), color="C0", label=f"train ({k}-step mean)")
    ax.plot(log["val_step"], log["val_loss"], "o-", color="C1", ms=3, label="held-out speeches")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("tiny Llama pretraining on Shakespeare (CPU, fp32)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "pretrain_loss.png")
    plt.close(fig)
