"""DloTrainer: the router loss is added with its weight and stays correctly normalised under gradient accumulation."""

import pytest
import torch
from transformers import LlamaForCausalLM, TrainingArguments

import dlo
from dlo.batching import SFTCollator
from dlo.trainer import DloTrainer

LAMBDA = 0.5


def _examples(vocab: int, n: int = 4, length: int = 12) -> list[dict]:
    """Equal-length examples (no padding), the first 4 tokens of each are the prompt (no loss)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * 4 + ids[4:]})
    return out


def _train_one_step(config, tmp_path, batch: int, accumulation: int, similarity_source: str = "packed"):
    torch.manual_seed(0)
    model = dlo.attach_routers(LlamaForCausalLM(config),
                               dlo.RoutingConfig(layers=[1, 3], capacity=0.5, label="cos", router_loss_weight=LAMBDA,
                                                 anneal_steps=0, similarity_source=similarity_source))
    for layer in dlo.routed_layers(model):  # distinct scores, so the selection does not hinge on ties
        torch.nn.init.normal_(layer.router.weight, std=0.5)
    args = TrainingArguments(output_dir=str(tmp_path / f"ga{accumulation}"), per_device_train_batch_size=batch,
                             gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=0.1,
                             optim="sgd", lr_scheduler_type="constant", logging_steps=1, report_to=[],
                             save_strategy="no", use_cpu=True, seed=0, remove_unused_columns=False,
                             disable_tqdm=True)
    trainer = DloTrainer(model=model, args=args, train_dataset=_examples(config.vocab_size),
                         data_collator=SFTCollator(pad_token_id=0))
    trainer.train()
    log = next(h for h in trainer.state.log_history if "task_loss" in h)
    return model, log


@pytest.mark.parametrize("accumulation", [1, 2, 4])
def test_logged_loss_is_task_plus_weighted_router_loss(tiny_llama_config, tmp_path, accumulation):
    _, log = _train_one_step(tiny_llama_config, tmp_path, batch=4 // accumulation, accumulation=accumulation)
    assert log["router_loss"] > 0
    assert log["loss"] == pytest.approx(log["task_loss"] + LAMBDA * log["router_loss"], abs=2e-3)


def test_gradient_accumulation_matches_one_large_batch(tiny_llama_config, tmp_path):
    # Dense-pass labels: the packed source's soft targets come from a fit over each forward's batch, so an
    # accumulated micro-batch labels its unmeasured tokens from its own fit (DESIGN.md §2.4).
    full, full_log = _train_one_step(tiny_llama_config, tmp_path, batch=4, accumulation=1, similarity_source="dense")
    accumulated, acc_log = _train_one_step(tiny_llama_config, tmp_path, batch=2, accumulation=2,
                                           similarity_source="dense")
    for key in ("task_loss", "router_loss", "loss"):
        assert acc_log[key] == pytest.approx(full_log[key], abs=2e-3), key
    # One SGD step from the same init: the same update, so the same weights, routers included. (The running
    # score quantiles are buffers updated per micro-batch, not trained weights.)
    a, b = dict(full.named_parameters()), dict(accumulated.named_parameters())
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4, msg=key)


def test_flops_ratio_is_logged_and_matches_a_hand_count(tiny_llama_config, tmp_path):
    model, log = _train_one_step(tiny_llama_config, tmp_path, batch=4, accumulation=1)
    # layers 1 and 3 of 4 routed at c=0.5: the routed model costs less than dense, more than half of it
    assert 0.5 < log["flops/routed_over_dense_expanded"] < 1.0
    from dlo.flops import routed_over_dense_ratio

    # d=64, 4 heads of 16 (d_q=64), 2 KV heads (d_kv=32), d_ff=128, V=97, T=8. Per token, dense layer:
    # projections 2*64*(64+2*32) + 2*64*64 = 24576, scores 2*64*(8+1) = 1152, MLP 6*64*128 = 49152;
    # lm_head 2*64*97 = 12416. A block-routed layer at c=0 keeps only its router, 2*64 = 128.
    dense = 4 * (24576 + 1152 + 49152) + 12416
    skipping = 2 * (24576 + 1152 + 49152) + 2 * 128 + 12416
    assert routed_over_dense_ratio(model, seq_len=8, capacities=[0.0, 0.0]) == pytest.approx(skipping / dense)
    assert routed_over_dense_ratio(model, seq_len=8, capacities=[1.0, 1.0]) == pytest.approx((dense + 256) / dense)


def test_the_process_sigterm_handler_is_restored_after_training(tiny_llama_config, tmp_path):
    import signal

    def own_handler(signum, frame):  # what the process had installed before training
        pass

    previous = signal.signal(signal.SIGTERM, own_handler)
    try:
        _train_one_step(tiny_llama_config, tmp_path, batch=4, accumulation=1)
        assert signal.getsignal(signal.SIGTERM) is own_handler
    finally:
        signal.signal(signal.SIGTERM, previous)
