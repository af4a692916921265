"""Any training loop trains a routed model the same way: HF Trainer, TRL SFTTrainer, a plain accelerate loop.

The routed model's loss already holds the weighted router loss and its RoutingState advances after each
optimizer step, so the three loops reach the same weights; each can log the router loss. A compiled model
trains like the eager one and stops recompiling after warm-up.
"""

import copy
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import LlamaForCausalLM, Trainer, TrainingArguments

import dlo
from dlo.batching import SFTCollator

ROOT = Path(__file__).resolve().parents[1]
STEPS, BATCH, LR = 5, 4, 0.2


def _examples(vocab: int, n: int = 8) -> list[dict]:
    """Chat-like examples of different lengths (padding in every batch), a prompt without loss each."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        length = 9 + (i * 5) % 8
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * 4 + ids[4:]})
    return out


@pytest.fixture
def routed(tiny_llama_config):
    torch.manual_seed(0)
    model = dlo.attach_routers(LlamaForCausalLM(tiny_llama_config), dlo.RoutingConfig(
        layers=[1, 3], capacity=0.5, label="cos-global", anneal_steps=3, router_loss_weight=0.5))
    for layer in dlo.routed_layers(model):
        torch.nn.init.normal_(layer.router.weight, std=0.5)
    return model


def _args(tmp_path, name, cls=TrainingArguments, **extra):
    return cls(output_dir=str(tmp_path / name), per_device_train_batch_size=BATCH, max_steps=STEPS,
               learning_rate=LR, optim="sgd", lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
               max_grad_norm=0.0, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0,
               remove_unused_columns=False, disable_tqdm=True, train_sampling_strategy="sequential",
               dataloader_drop_last=True, **extra)


def _hf_trainer(model, data, tmp_path):
    trainer = Trainer(model=model, args=_args(tmp_path, "hf"), train_dataset=data,
                      data_collator=SFTCollator(pad_token_id=0))
    dlo.add_routing_callback(trainer, print_line=False)
    trainer.train()
    return [h["router_loss"] for h in trainer.state.log_history if "router_loss" in h]


def _trl_trainer(model, data, tmp_path):
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    # The data is tokenised already; SFTTrainer still wants a tokenizer to hold (the bundled one).
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "assets" / "tiny" / "base")
    # SFTConfig turns bf16 on by default; the three loops compare in fp32.
    args = _args(tmp_path, "trl", cls=SFTConfig, dataset_kwargs={"skip_prepare_dataset": True}, bf16=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(data),
                         data_collator=SFTCollator(pad_token_id=0), processing_class=tokenizer)
    dlo.add_routing_callback(trainer, print_line=False)
    trainer.train()
    return [h["router_loss"] for h in trainer.state.log_history if "router_loss" in h]


def _accelerate_loop(model, data, tmp_path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, mixed_precision="no")
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=False, drop_last=True,
                                         collate_fn=SFTCollator(pad_token_id=0))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    model.train()
    logged, step = [], 0
    while step < STEPS:
        for batch in loader:
            out = model(**batch)
            accelerator.backward(out.loss)  # task loss + weighted router loss
            optimizer.step()
            optimizer.zero_grad()
            logged.append(out.router_loss.item())
            step += 1
            if step == STEPS:
                break
    return logged


@pytest.mark.slow
def test_three_loops_reach_the_same_weights_and_log_the_router_loss(routed, tiny_llama_config, tmp_path):
    data = _examples(tiny_llama_config.vocab_size)
    results = {}
    for name, loop in (("hf", _hf_trainer), ("trl", _trl_trainer), ("accelerate", _accelerate_loop)):
        model = copy.deepcopy(routed)
        logged = loop(model, data, tmp_path)
        assert len(logged) == STEPS and all(v > 0 for v in logged), (name, logged)
        assert int(dlo.routing_state(model).step) == STEPS, name  # annealed and re-allocated once per step
        results[name] = (model.state_dict(), logged)
    reference, ref_logged = results["accelerate"]
    moved = [k for k in reference if k.endswith(("router.weight", "capacity", "score_quantiles"))]
    assert not all(torch.equal(reference[k], routed.state_dict()[k]) for k in moved)
    for name in ("hf", "trl"):
        weights, logged = results[name]
        assert logged == pytest.approx(ref_logged, abs=1e-5), name
        for key, tensor in reference.items():
            torch.testing.assert_close(weights[key].float(), tensor.float(), atol=1e-6, rtol=1e-5,
                                       msg=lambda m, key=key, name=name: f"{name} {key}: {m}")


@pytest.mark.slow
def test_compiled_training_equals_eager_and_stops_recompiling(routed, tiny_llama_config):
    import torch._dynamo

    data = _examples(tiny_llama_config.vocab_size)
    batches = [SFTCollator(pad_token_id=0)(data[i:i + BATCH]) for i in (0, BATCH)]
    steps, warmup = 8, 3  # annealing changes the packed width every step until step 3

    def train(model, compiled):
        run = torch.compile(model, backend="aot_eager", dynamic=None) if compiled else model
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        losses, graphs = [], []
        for step in range(steps):
            out = run(**batches[step % 2])
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(out.loss.item())
            graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        return losses, graphs

    torch._dynamo.reset()
    eager, _ = train(copy.deepcopy(routed).train(), compiled=False)
    compiled, graphs = train(copy.deepcopy(routed).train(), compiled=True)
    assert compiled == pytest.approx(eager, abs=1e-5)
    assert graphs[warmup:] == [graphs[warmup]] * (steps - warmup), graphs  # no recompiles after warm-up
