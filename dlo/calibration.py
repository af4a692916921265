"""Fit inference thresholds on calibration text so realised capacity matches the targets.

Layers are calibrated in order: layer l's scores are collected with layers < l already routing
by their fitted thresholds, exactly as at inference. Each pass stops right after layer l.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tqdm.auto import tqdm

from dlo.batching import MODEL_INPUTS, batches, pad_token_id, text_examples, to_device
from dlo.losses import quantiles
from dlo.modeling import routed_layers
from dlo.routing import NUM_QUANTILES


class _StopForward(Exception):
    pass


def _batches(data, tokenizer, batch_size: int, max_length: int, device) -> list[dict]:
    """Model inputs on ``device``: texts batched as training batches them (dlo/batching.py), or given batches."""
    data = list(data)
    if data and isinstance(data[0], str):
        if tokenizer is None:
            raise ValueError("calibrate() got raw texts: pass tokenizer= to tokenise them")
        data = batches(text_examples(tokenizer, data, max_length), batch_size, pad_token_id(tokenizer))
    if not data:
        raise ValueError("calibrate() needs at least one text or batch")
    return [to_device(b, device, MODEL_INPUTS) for b in data]


@torch.no_grad()
def calibrate(model, data: Iterable, tokenizer=None, batch_size: int = 8, max_length: int = 512,
              progress: bool = True) -> list[float]:
    """Set every routed layer's score quantiles from ``data`` (texts with ``tokenizer``, or batches
    of ``input_ids``/``attention_mask``). Returns the resulting thresholds, one per routed layer."""
    layers = routed_layers(model)
    if not layers:
        raise ValueError("model has no routed layers; call dlo.attach_routers first")
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
