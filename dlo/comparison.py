"""One table that answers "was routing worth it?": models measured on the same held-out data.

The SFT recipe's ``compare`` section fills it with the base model as loaded, the dense expanded model trained the
same way, the routed model (causal thresholds, and with every layer forced to run) and its statically pruned
export. Each row is a ``ComparedModel``: the loss on the held-out chat answers, optionally the language-modelling
loss on held-out plain text, and the forward FLOPs per token relative to the base model (analytic, dlo/flops.py).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass

from dlo.evaluation import evaluate, perplexity
from dlo.flops import base_num_layers, model_flops
from dlo.modeling import forced_routing, routed_layers


@dataclass
class ComparedModel:
    name: str
    layers: int  # decoder layers the model holds
    eval_loss: float  # mean NLL of the held-out answer tokens
    text_loss: float | None  # mean NLL of held-out plain text (None: no text given)
    flops: float  # forward FLOPs per token over the base model's (realised capacities for routed layers)

    def to_dict(self) -> dict:
        return {key: round(value, 4) if isinstance(value, float) else value for key, value in asdict(self).items()}


def measure(name: str, model, answer_batches: list[dict], text_batches: list[dict] | None = None,
            run_every_layer: bool = False) -> ComparedModel:
    """``model`` on the held-out answers (batches with loss labels on the answers) and plain texts;
    ``run_every_layer`` forces its routed layers to run every token."""
    routed = routed_layers(model)
    mode = forced_routing(model, "run") if routed and run_every_layer else nullcontext()
    with mode:
        answers = evaluate(model, answer_batches, progress=False)
        text = evaluate(model, text_batches, progress=False) if text_batches else None
    capacities = {} if run_every_layer else answers.capacity
    seq_len = answers.mean_seq_len
    base_layers = base_num_layers(model.config)
    base = model_flops(model.config, seq_len, num_layers=base_layers)["total"]
    granularity = model.dlo_routing_config.granularity if routed else "block"
    cost = model_flops(model.config, seq_len, capacities, granularity)["total"]
    return ComparedModel(name, model.config.num_hidden_layers, answers.loss, text.loss if text else None, cost / base)


def comparison_table(rows: list[ComparedModel]) -> str:
    has_text = any(row.text_loss is not None for row in rows)
    width = max(len(row.name) for row in rows)
    head = f"{'model':<{width}}  layers  eval loss    ppl" + ("  text loss" if has_text else "") + "  FLOPs/base"
    lines = [head]
    for row in rows:
        line = f"{row.name:<{width}}  {row.layers:>6}  {row.eval_loss:>9.4f}  {perplexity(row.eval_loss):>5.2f}"
        if has_text:
            line += f"  {row.text_loss:>9.4f}" if row.text_loss is not None else f"  {'-':>9}"
        lines.append(line + f"  {row.flops:>10.3f}")
    return "\n".join(lines)
