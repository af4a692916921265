"""Fit inference thresholds on calibration text so realised capacity matches the targets.

Layers are calibrated in order: layer l's scores are collected with layers < l already routing
by their fitted thresholds, exactly as at inference. Each pass stops right after layer l.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from tqdm.auto import tqdm

from dlo.batching import MODEL_INPUTS, batches, pad_token_id, text_examples, to_device
from dlo.losses import quantiles
from dlo.modeling import routed_layers
from dlo.routing import NUM_QUANTILES
from dlo.validation import ArgumentTypeError, Boolean, Number, Shown, check_model


class _StopForward(Exception):
    pass


def _check_data(data) -> list:
    """``data`` as a list, once it is known to be texts (none blank) or batches holding 2-D ``input_ids``."""
    if isinstance(data, (str, bytes, dict)) or not isinstance(data, Iterable):
        raise ArgumentTypeError("data", Shown(data), "expected a list of texts or of batches (dicts with input_ids); "
                                                     "a single text goes in a list: [text]")
    data = list(data)
    if not data:
        raise ValueError("data=[]: calibrate() needs at least one text or batch")
    for i, item in enumerate(data):
        if isinstance(item, str) and isinstance(data[0], str):
            if not item.strip():
                raise ValueError(f"data[{i}]={item!r}: a blank text has no tokens to calibrate on")
        elif isinstance(item, Mapping) and isinstance(data[0], Mapping):
            ids = item.get("input_ids")
            if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.numel() == 0:
                raise ArgumentTypeError(f"data[{i}]['input_ids']", Shown(ids), "expected a non-empty (batch, "
                                                                               "tokens) tensor of token ids")
        else:
            first = "a text" if isinstance(data[0], str) else "a batch"
            raise ArgumentTypeError(f"data[{i}]", Shown(item), f"expected {first} like data[0] (a list of texts or "
                                                               "of batches, each a dict with input_ids)")
    return data


def _batches(data: list, tokenizer, batch_size: int, max_length: int, device) -> list[dict]:
    """Model inputs on ``device``: texts batched as training batches them (dlo/batching.py), or given batches."""
    if isinstance(data[0], str):
        if tokenizer is None:
            raise ValueError("calibrate() got raw texts: pass tokenizer= to tokenise them")
        data = batches(text_examples(tokenizer, data, max_length), batch_size, pad_token_id(tokenizer))
    return [to_device(b, device, MODEL_INPUTS) for b in data]


@torch.no_grad()
def calibrate(model, data: Iterable, tokenizer=None, batch_size: int = 8, max_length: int = 512,
              progress: bool = True) -> list[float]:
    """Set every routed layer's score quantiles from ``data`` (texts with ``tokenizer``, or batches
    of ``input_ids``/``attention_mask``). Returns the resulting thresholds, one per routed layer.

    Every argument is checked before the model runs: ``TypeError`` for a model that is not one, ``data`` that is
    not a list of texts or batches (a lone string is refused, not read as its characters), a tokenizer that
    cannot be called or ``batch_size``/``max_length``/``progress`` of the wrong kind; ``ValueError`` for a model
    without routers, no data, a blank text or sizes below 1.
    """
    check_model(model)
    layers = routed_layers(model)
    if not layers:
        raise ValueError("model has no routed layers; call dlo.attach_routers first")
    data = _check_data(data)
    if tokenizer is not None and (isinstance(tokenizer, str) or not callable(tokenizer)):
        raise ArgumentTypeError("tokenizer", Shown(tokenizer), "expected a tokenizer (e.g. AutoTokenizer."
                                                               "from_pretrained(path)) or None")
    batch_size = Number(low=1, integer=True)("batch_size", batch_size)
    max_length = Number(low=1, integer=True)("max_length", max_length)
    Boolean()("progress", progress)
    device = next(model.parameters()).device
    batches = _batches(data, tokenizer, batch_size, max_length, device)
    was_training = model.training
    model.eval()
    levels = torch.linspace(0, 1, NUM_QUANTILES, device=device)
    try:
        for layer in tqdm(layers, desc="calibrating thresholds", disable=not progress):
            scores: list[torch.Tensor] = []

            def stop(module, args, kwargs, output, scores=scores):
                # The layer's decisions come back in its routing inputs; nothing after it needs to run.
                record = kwargs["dlo_routing"].records[module.layer_index]
                scores.append(torch.sigmoid(record.logits)[record.valid].float())
                raise _StopForward

            handle = layer.register_forward_hook(stop, with_kwargs=True)
            try:
                for batch in batches:
                    try:
                        model(**batch, use_cache=False, output_router_logits=True)
                    except _StopForward:
                        pass
            finally:
                handle.remove()
            layer.score_quantiles.copy_(quantiles(torch.cat(scores), levels))
    finally:
        model.train(was_training)
    return [float(layer.threshold()) for layer in layers]
