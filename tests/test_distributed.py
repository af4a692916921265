"""Routed training on several CPU ranks (gloo) against one process with the same global batch.

- 2 DDP ranks take the routing decisions of one process (score quantiles, cos-global cut, re-allocated
  capacities over the global batch), log the same losses and reach the same weights; ranks stay bitwise equal.
- A model sharded with FSDP2 (and, where DeepSpeed is installed, ZeRO-2/3) trains the same way and saves,
  through the recipe's own save path, a routed checkpoint that ``dlo.load_model`` loads in one process.
- The recipe launched as documented on 2 processes equals 1 process with the doubled per-device batch, also
  when stopped with SIGTERM and resumed; sharded launches the machine cannot run are refused.
"""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import dlo
from dlo.distributed import save_pretrained_gathered
from dlo.errors import UserError
from dlo.losses import router_labels

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # every test starts processes
WORLD = 2
STEPS, MICRO, GLOBAL_ROWS, SEQ = 12, 2, 8, 16  # 12 optimizer steps of 2 micro-batches of 8 rows (4 per rank)
SAVE_STEPS = 6  # the sharded-save tests train this many steps


def tiny_routed_model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, attn_implementation="sdpa")
    # Fast-moving statistics, so 12 steps anneal the capacity and re-allocate it between the two layers.
    routing = dlo.RoutingConfig(layers=[1, 3], capacity=0.5, label="cos-global", anneal_steps=6,
                                threshold_momentum=0.5, capacity_momentum=0.5)
    return dlo.attach_routers(LlamaForCausalLM(config), routing)


def global_batches(steps: int) -> list[list[dict]]:
    """Per optimizer step, MICRO micro-batches of GLOBAL_ROWS right-padded rows (the first 3 tokens unlabelled)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        micro = []
        for _ in range(MICRO):
            ids = torch.randint(0, 97, (GLOBAL_ROWS, SEQ), generator=g)
            lengths = torch.randint(6, SEQ + 1, (GLOBAL_ROWS,), generator=g)
            mask = (torch.arange(SEQ) < lengths[:, None]).long()
            labels = ids.masked_fill(mask == 0, -100)
            labels[:, :3] = -100
            micro.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
        out.append(micro)
    return out


def train(model, net, optimizer, rank: int, world: int, steps: int, backward=None, step=None) -> list[dict]:
    """HF Trainer's convention: ``num_items_in_batch`` counts the label tokens of the whole step on every rank
    and the loss is multiplied by the number of ranks (the gradient reduction averages them). Returns, per
    optimizer step, what routing decided and what the routing state logged and holds after the step."""
    state = dlo.routing_state(model)
    rows = GLOBAL_ROWS // world
    trace = []
    for step_batches in global_batches(steps):
        n_items = sum((b["labels"][:, 1:] != -100).sum() for b in step_batches)
        decisions = []
        for batch in step_batches:
            local = {k: v[rank * rows:(rank + 1) * rows] for k, v in batch.items()}
            out = net(**local, num_items_in_batch=n_items)
            (backward or torch.Tensor.backward)(out.loss * world)
            if step is not None:
                step()
            decisions.append({"selected": torch.stack([r.selected for r in out.routing]),
                              "labels": torch.stack(router_labels(list(out.routing), "cos-global"))})
        if step is None:
            optimizer.step()
            optimizer.zero_grad()
        trace.append({"decisions": decisions, "logs": state.pop_logs(), "step": int(state.step),
                      "capacity": torch.stack([layer.capacity.clone() for layer in state.layers]),
                      "quantiles": torch.stack([layer.score_quantiles.clone() for layer in state.layers])})
    return trace


@contextmanager
def one_thread():
    """The single-process reference computes as each rank does (one thread: no split reductions)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, work, port: int, out: str, args: tuple):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))  # as torchrun: DeepSpeed reads them
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.save(work(rank, out, *args), os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def on_two_ranks(work, out: Path, *args) -> list:
    """Run ``work(rank, out, *args)`` on 2 spawned gloo ranks; the list of what each returned."""
    mp.spawn(_rank_main, args=(work, free_port(), str(out), args), nprocs=WORLD)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- 2 DDP ranks vs 1 process ----------------------------------------------------------------------------------------


def _ddp_rank(rank, out):
    model = tiny_routed_model().train()
    # broadcast_buffers=False: rank 0's routing state is not copied to the others, so they must keep it equal.
    ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    trace = train(model, ddp, torch.optim.AdamW(model.parameters(), lr=3e-3), rank, WORLD, STEPS)
    return {"trace": trace, "weights": weights(model)}


def merged_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cat([a, b], dim=1)  # (L, B, T): rank 0's rows, then rank 1's, as the global batch orders them


def test_two_ranks_route_log_and_train_as_one_process(tmp_path):
    ranks = on_two_ranks(_ddp_rank, tmp_path)
    with one_thread():
        model = tiny_routed_model().train()
        reference = train(model, model, torch.optim.AdamW(model.parameters(), lr=3e-3), 0, 1, STEPS)
    one = weights(model)

    r0, r1 = ranks
    for key in one:
        assert torch.equal(r0["weights"][key], r1["weights"][key]), key  # ranks bitwise equal
        torch.testing.assert_close(r0["weights"][key], one[key], atol=1e-5, rtol=0, msg=key)
    for step, (a, b, ref) in enumerate(zip(r0["trace"], r1["trace"], reference)):
        assert a["logs"] == b["logs"] and torch.equal(a["capacity"], b["capacity"]), step
        assert torch.equal(a["quantiles"], b["quantiles"]), step
        for m in range(MICRO):  # which tokens ran, and the cos-global labels over the global batch
            for key in ("selected", "labels"):
                assert torch.equal(merged_rows(a["decisions"][m][key], b["decisions"][m][key]),
                                   ref["decisions"][m][key]), (step, m, key)
        assert a["step"] == ref["step"] == step + 1
        torch.testing.assert_close(a["capacity"], ref["capacity"], atol=1e-6, rtol=0)
        torch.testing.assert_close(a["quantiles"], ref["quantiles"], atol=1e-6, rtol=0)
        assert a["logs"].keys() == ref["logs"].keys()
        for key, value in ref["logs"].items():
            assert a["logs"][key] == pytest.approx(value, rel=1e-6, abs=1e-7), (step, key)
    # The run exercised what must agree: capacity annealed (all tokens ran at step 0, not at the end) and
    # cos-global moved the layers' targets apart.
    batches = global_batches(STEPS)
    valid_first, valid_last = (int(batches[i][0]["attention_mask"].sum()) for i in (0, -1))
    ran_first, ran_last = (reference[i]["decisions"][0]["selected"].sum(dim=(1, 2)) for i in (0, -1))  # per layer
    assert ran_first.tolist() == [valid_first, valid_first]  # capacity 1.0 at step 0
    assert int(ran_last.sum()) < 0.8 * 2 * valid_last  # annealed towards a mean of 0.5
    assert abs(float(reference[-1]["capacity"][0] - reference[-1]["capacity"][1])) > 0.1


# -- sharded models save routed checkpoints ---------------------------------------------------------------------------


def calibration_batch():
    batch = global_batches(1)[0][0]
    return [{"input_ids": batch["input_ids"][:4], "attention_mask": batch["attention_mask"][:4]}]


def _fsdp2_rank(rank, out):
    from torch.distributed.fsdp import fully_shard

    model = tiny_routed_model().train()
    for layer in model.model.layers:  # every decoder layer, routed or not, is one unit; the root holds the rest
        fully_shard(layer)
    fully_shard(model)
    train(model, model, torch.optim.AdamW(model.parameters(), lr=3e-3), rank, WORLD, SAVE_STEPS)
    dlo.calibrate(model, calibration_batch(), progress=False)
    save_pretrained_gathered(model, os.path.join(out, "sharded"))
    return {"class": type(model).__name__}


@pytest.fixture(scope="module")
def unsharded_checkpoint(tmp_path_factory):
    """The reference: the same training in one process, saved through the same path."""
    out = tmp_path_factory.mktemp("unsharded") / "model"
    with one_thread():
        model = tiny_routed_model().train()
        train(model, model, torch.optim.AdamW(model.parameters(), lr=3e-3), 0, 1, SAVE_STEPS)
        dlo.calibrate(model, calibration_batch(), progress=False)
        save_pretrained_gathered(model, str(out))
    return out


def assert_same_routed_checkpoint(saved: Path, reference: Path, atol: float):
    config, expected = (json.loads((d / "config.json").read_text()) for d in (saved, reference))
    for key in ("architectures", "auto_map"):
        assert config[key] == expected[key], key
    assert config["dlo_routing"]["base_architecture"] == "LlamaForCausalLM"  # the stock class, not FSDP's subclass
    assert (saved / "modeling_dlo.py").read_text() == (reference / "modeling_dlo.py").read_text()
    model, ref = dlo.load_model(str(saved)).eval(), dlo.load_model(str(reference)).eval()
    assert int(dlo.routing_state(model).step) == SAVE_STEPS  # every step was committed while sharded
    for layer, expected_layer in zip(dlo.routed_layers(model), dlo.routed_layers(ref)):
        torch.testing.assert_close(layer.capacity, expected_layer.capacity, atol=1e-6, rtol=0)
        torch.testing.assert_close(layer.threshold(), expected_layer.threshold(), atol=1e-5, rtol=0)
    batch = global_batches(2)[1][0]
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        expected_logits = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(logits, expected_logits, atol=atol, rtol=0)


def test_fsdp2_sharded_training_saves_a_routed_checkpoint(tmp_path, unsharded_checkpoint):
    ranks = on_two_ranks(_fsdp2_rank, tmp_path)
    assert ranks[0]["class"] == "FSDPDloLlamaForCausalLM"  # FSDP2 put its class in the model's MRO
    assert_same_routed_checkpoint(tmp_path / "sharded", unsharded_checkpoint, atol=1e-5)


def _zero_rank(rank, out, stage):
    import deepspeed

    model = tiny_routed_model().train()
    config = {"train_micro_batch_size_per_gpu": GLOBAL_ROWS // WORLD, "gradient_accumulation_steps": MICRO,
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
              "gradient_clipping": 0.0}  # DeepSpeed clips at 1.0 unless told; the reference does not clip
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=3e-3),
                                      config=config)
    routers = [p for layer in dlo.routed_layers(model) for p in layer.router.parameters()]
    if stage == 3:
        partitioned = all(p.ds_tensor.numel() < p.ds_numel for p in routers if p.ds_numel >= WORLD)
    else:  # ZeRO-2 partitions gradients and optimizer state over the flattened groups that hold every weight
        grouped = {id(p) for group in engine.optimizer.bit16_groups for p in group}
        partitioned = all(id(p) in grouped for p in routers)
    # As HF Trainer does under DeepSpeed: the loss is not divided again by the accumulation steps.
    train(model, engine, None, rank, WORLD, SAVE_STEPS,
          backward=lambda loss: engine.backward(loss, scale_wrt_gas=False), step=engine.step)
    dlo.calibrate(model, calibration_batch(), progress=False)
    save_pretrained_gathered(model, os.path.join(out, "sharded"))
    return {"routers_partitioned": partitioned}


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_partitions_routers_and_saves_a_routed_checkpoint(tmp_path, unsharded_checkpoint, stage):
    pytest.importorskip("deepspeed")  # runs on the CPU through DeepSpeed's CPU accelerator (gloo)
    ranks = on_two_ranks(_zero_rank, tmp_path, stage)
    assert all(r["routers_partitioned"] for r in ranks)
    # The optimizer steps DeepSpeed's flattened copies, none of the model's tensors: the step hook still
    # committed once per optimizer step (the loaded state's step is checked), routing as one process.
    assert_same_routed_checkpoint(tmp_path / "sharded", unsharded_checkpoint, atol=1e-5)


# -- the recipe on 2 processes ---------------------------------------------------------------------------------------

CONFIG = ROOT / "recipes" / "configs" / "tiny.yaml"
# A few steps of the tiny default. Copies of the base layers (init=copy) rather than zero-init identities: an
# identity layer's similarities all lie within float32 rounding of 1 for the first steps, so which tokens
# the cos-global cut labels would follow rounding, which differs between batch shapes (2 x 2 rows vs 4 rows).
# 6 steps of 4 rows stay inside one epoch (about 80 examples fit in 64 tokens): at an epoch's end one process
# takes a short batch where 2 ranks wrap around to keep their batches even.
RECIPE = ["model.expansion.init=copy", "training.max_steps=6", "training.logging_steps=2", "training.save_steps=100",
          "routing.anneal_steps=4", "data.max_length=64", "data.max_train_samples=256", "data.max_eval_samples=16",
          "calibration_samples=16"]


def recipe_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.pop("TENSORBOARD_LOGGING_DIR", None)
    return env


def recipe_command(out: Path, *overrides, accelerate_config: Path | None = None, processes: int | None = None):
    """The documented launch: ``accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml ...``."""
    args = ["recipes/sft.py", "--config", str(CONFIG), f"output_dir={out}", *RECIPE, *overrides]
    if accelerate_config is None:
        return [sys.executable, *args]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config),
              "--main_process_port", str(free_port())]
    if processes is not None:
        launch += ["--num_processes", str(processes)]
    return [*launch, *args]


TWO_CPU = ROOT / "recipes" / "accelerate" / "cpu_2proc.yaml"


def start(cmd) -> subprocess.Popen:
    # A session of its own: SIGTERM goes to the launcher and its ranks together, as a scheduler sends it.
    return subprocess.Popen(cmd, cwd=ROOT, env=recipe_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def finished(proc: subprocess.Popen) -> str:
    output = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, output[-5000:]
    return output


@pytest.fixture(scope="module")
def recipe_runs(tmp_path_factory):
    """The tiny recipe on 2 CPU ranks (2 rows each) and in 1 process (4 rows), run side by side."""
    root = tmp_path_factory.mktemp("recipe")
    two = start(recipe_command(root / "two", "training.per_device_train_batch_size=2", accelerate_config=TWO_CPU))
    one = start(recipe_command(root / "one", "training.per_device_train_batch_size=4"))
    return SimpleNamespace(root=root, two_output=finished(two), one_output=finished(one))


def summary(run: Path) -> dict:
    return json.loads((run / "final" / "summary.json").read_text())


def assert_same_weights(a: Path, b: Path, atol: float):
    wa, wb = (load_file(str(d / "final" / "model.safetensors")) for d in (a, b))
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=atol, rtol=0, msg=key)


def test_recipe_two_ranks_equal_one_process_at_the_same_global_batch(recipe_runs):
    assert "launch: 2 process(es), MULTI_CPU on cpu" in recipe_runs.two_output
    assert "launch: 1 process(es), NO on cpu" in recipe_runs.one_output
    two, one = recipe_runs.root / "two", recipe_runs.root / "one"
    assert_same_weights(two, one, atol=1e-5)
    s2, s1 = summary(two), summary(one)
    assert s2["steps"] == s1["steps"] == 6
    assert s2["train_task_loss"] == pytest.approx(s1["train_task_loss"], abs=1e-5)
    for a, b in zip(s2["layers"], s1["layers"]):
        assert a["target_capacity"] == pytest.approx(b["target_capacity"], abs=1e-4)
    assert dlo.routed_layers(dlo.load_model(str(two / "final")))


def test_recipe_two_ranks_stopped_with_sigterm_resume_to_the_same_weights(recipe_runs):
    out = recipe_runs.root / "interrupted"
    cmd = recipe_command(out, "training.per_device_train_batch_size=2", accelerate_config=TWO_CPU)
    proc = start(cmd)
    seen = []
    for line in proc.stdout:  # the first training log (step 2) means the run is mid-way
        seen.append(line)
        if "'task_loss'" in line:
            os.killpg(proc.pid, signal.SIGTERM)
            break
    output = "".join(seen) + proc.communicate(timeout=600)[0]
    assert "Resume with" in output, output[-4000:]  # both ranks stopped after the same step and saved
    assert not (out / "final").exists() and list(out.glob("checkpoint-*")), output[-4000:]
    finished(start([*cmd, "resume=true"]))
    assert_same_weights(out, recipe_runs.root / "two", atol=1e-6)


def test_recipe_refuses_launches_this_machine_cannot_run(tmp_path):
    one_process_multi_cpu = tmp_path / "multi_cpu.yaml"  # what cpu_2proc.yaml used to be
    one_process_multi_cpu.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_CPU\n"
                                     "num_processes: 2\nnum_machines: 1\nmixed_precision: 'no'\nuse_cpu: true\n")
    fsdp = start(recipe_command(tmp_path / "fsdp", accelerate_config=ROOT / "recipes/accelerate/fsdp.yaml",
                                processes=1))
    multi_cpu = start(recipe_command(tmp_path / "cpu", accelerate_config=one_process_multi_cpu))
    for proc, message in ((fsdp, "asks for FSDP, which accelerate sets up on GPUs only"),
                          (multi_cpu, "accelerate started one process for a config that asks for several")):
        output = proc.communicate(timeout=600)[0]
        assert proc.returncode != 0 and message in output, output[-3000:]
    assert not (tmp_path / "fsdp").exists() and not (tmp_path / "cpu").exists()  # refused before writing


def load_recipe_module():
    spec = importlib.util.spec_from_file_location("dlo_sft_recipe", ROOT / "recipes" / "sft.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recipe_refuses_deepspeed_on_cpu_and_partitioned_loading(monkeypatch):
    check_launch = load_recipe_module().check_launch
    gpu = SimpleNamespace(device=torch.device("cuda", 0), use_cpu=False, deepspeed_plugin=None)
    check_launch(gpu)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(UserError, match="asks for DeepSpeed, which accelerate sets up on GPUs only.*use_cpu=true"):
        check_launch(SimpleNamespace(device=torch.device("cpu"), use_cpu=True, deepspeed_plugin=None))
    with pytest.raises(UserError, match="zero3_init_flag: false"):
        check_launch(SimpleNamespace(**{**vars(gpu), "deepspeed_plugin": SimpleNamespace(zero3_init_flag=True)}))
    check_launch(SimpleNamespace(**{**vars(gpu), "deepspeed_plugin": SimpleNamespace(zero3_init_flag=False)}))
