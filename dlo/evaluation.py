"""Evaluation data and one instrumented pass over it (shared by ``dlo report`` and ``dlo export``).

Data: JSONL, one record a line, one of
- ``{"messages": [{"role", "content"}, ...]}``: rendered with the tokenizer's chat template; the
  loss counts the assistant turns only (every token when there is no assistant turn);
- ``{"prompt": ..., "completion": ...}``: the loss counts the completion and EOS;
- ``{"text": ...}``: every next-token prediction counts.
These are the SFT data conventions (dlo/data.py), so eval losses compare with training's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dlo.batching import IGNORE_INDEX as IGNORE
from dlo.batching import MODEL_INPUTS, batches, pad_token_id, to_device
from dlo.data import load_records, tokenize_record
from dlo.modeling import decoder_layers, routed_layers


def read_eval_records(path: str, max_samples: int | None = None) -> list[dict]:
    """Records of an eval file (the formats ``dlo.data.load_records`` reads), each of a kind we can score."""
    records = load_records(path, max_samples)
    for i, record in enumerate(records, 1):
        known = isinstance(record, dict) and ("messages" in record or "text" in record
                                              or ("prompt" in record and "completion" in record))
        if not known:
            raise ValueError(f"{path}: record {i} needs 'messages', 'text', or 'prompt' and 'completion'")
    return records


def encode(record: dict, tokenizer, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids and loss labels (IGNORE where no loss) of one record, truncated to ``max_length``.

    Chat and prompt/completion records go through the SFT tokenisation itself (dlo/data.py).
    """
    if "messages" in record and any(m.get("role") == "assistant" for m in record["messages"]):
        example = tokenize_record(tokenizer, record, "messages", max_length)
    elif "prompt" in record:
        example = tokenize_record(tokenizer, record, "prompt_completion", max_length)
    else:  # plain text, or a conversation without a reply to score: every prediction counts
        if "messages" in record:
            text, special = tokenizer.apply_chat_template(record["messages"], tokenize=False), False
        else:
            text, special = record["text"], True
        ids = tokenizer(text, add_special_tokens=special)["input_ids"][:max_length]
        example = {"input_ids": ids, "labels": list(ids)}
    return example["input_ids"], example["labels"]


def load_batches(path: str, tokenizer, batch_size: int, max_length: int, max_samples: int | None = None):
    """Right-padded batches of an eval file's records, built as training builds them (dlo/batching.py)."""
    records = read_eval_records(path, max_samples)
    encoded = [encode(r, tokenizer, max_length) for r in records]
    examples = [{"input_ids": ids, "labels": labels} for ids, labels in encoded if ids]
    if not examples:
        raise ValueError(f"{path}: every record tokenises to nothing")
    return batches(examples, batch_size, pad_token_id(tokenizer))


@dataclass
class EvalResult:
    loss: float  # mean next-token NLL over counted tokens
    tokens: int  # tokens that entered the model (not padding)
    loss_tokens: int  # predictions the loss counts
    mean_seq_len: float
    # Per routed layer, keyed by layer index:
    capacity: dict[int, float] = field(default_factory=dict)  # share of valid tokens that ran
    mean_score: dict[int, float] = field(default_factory=dict)
    scores: dict[int, torch.Tensor] = field(default_factory=dict)  # sampled router scores (for plots)
    # Per decoder layer: mean cos(h_in, h_out) over valid tokens (1 = the layer changes nothing).
    similarity: list[float] = field(default_factory=list)
    # (layers, T) bool run/skip of the first sequences, with their token ids.
    examples: list[dict] = field(default_factory=list)

    @property
    def perplexity(self) -> float:
        return perplexity(self.loss)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))  # capped so a diverged model reports a finite number


def _token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token NLL and number of counted predictions."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    nll = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                          ignore_index=IGNORE, reduction="sum")
    return nll, (shift_labels != IGNORE).sum()


@torch.no_grad()
def evaluate(model, batches: list[dict], num_examples: int = 0, max_scores: int = 20000,
             progress: bool = True, desc: str = "evaluating") -> EvalResult:
    """Loss and routing statistics of ``model`` (eval mode, causal thresholds) over ``batches``."""
    device = next(model.parameters()).device
    layers = list(decoder_layers(model))
    routed = routed_layers(model)
    sim_sum = torch.zeros(len(layers), dtype=torch.float64)
    valid_now: dict[str, torch.Tensor] = {}

    def similarity_hook(index):
        def hook(module, args, kwargs, output):
            h = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            cos = F.cosine_similarity(h.float(), y.float(), dim=-1)
            sim_sum[index] += float((cos * valid_now["mask"]).sum())
        return hook

    handles = [layer.register_forward_hook(similarity_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    selected = {layer.layer_index: 0 for layer in routed}
    score_sum = {layer.layer_index: 0.0 for layer in routed}
    scores: dict[int, list[torch.Tensor]] = {layer.layer_index: [] for layer in routed}
    nll_total, counted, tokens, sequences, examples = 0.0, 0, 0, 0, []
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(batches, desc=desc, disable=not progress):
            batch = to_device(batch, device)
            # Packed blocks (data.packing) have no padding: position ids keep their examples apart.
            mask = batch["attention_mask"].bool() if "attention_mask" in batch else batch["input_ids"] >= 0
            valid_now["mask"] = mask.float()
            out = model(**to_device(batch, device, MODEL_INPUTS), use_cache=False,
                        **({"output_router_logits": True} if routed else {}))
            logits = out.logits
            records = dict(zip((layer.layer_index for layer in routed), out.routing)) if routed else {}
            nll, n = _token_nll(logits, batch["labels"])
            nll_total += float(nll)
            counted += int(n)
            tokens += int(mask.sum())
            sequences += mask.shape[0]
            for i, record in records.items():
                selected[i] += int((record.selected & record.valid).sum())
                s = torch.sigmoid(record.logits)[record.valid].float().cpu()
                score_sum[i] += float(s.sum())
                if sum(x.numel() for x in scores[i]) < max_scores:
                    scores[i].append(s)
            for row in range(mask.shape[0]):
                if len(examples) >= num_examples:
                    break
                length = int(mask[row].sum())
                run = torch.ones(len(layers), length, dtype=torch.bool)
                for i, record in records.items():
                    run[i] = record.selected[row, :length].cpu()
                examples.append({"input_ids": batch["input_ids"][row, :length].tolist(), "run": run})
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if counted == 0:
        raise ValueError("no token carries a loss label (every record truncated to its prompt?)")
    return EvalResult(
        loss=nll_total / counted, tokens=tokens, loss_tokens=counted, mean_seq_len=tokens / sequences,
        capacity={i: selected[i] / tokens for i in selected},
        mean_score={i: score_sum[i] / tokens for i in score_sum},
        scores={i: torch.cat(v)[:max_scores] if v else torch.empty(0) for i, v in scores.items()},
        similarity=(sim_sum / tokens).tolist(),
        examples=examples,
    )
