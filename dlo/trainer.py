"""Trainer business for routed models: logging, per-layer learning rates, graceful SIGTERM.

The routed model computes its own loss (task + lambda * router) and its RoutingState advances after
every optimizer step, so any loop trains it correctly. What is left here is what only a trainer knows:

- ``RoutingLogCallback`` adds the routing terms to the Trainer's logs (tensorboard and console):
  ``task_loss``, ``router_loss``, per layer
  ``routing/capacity|score|score_std|agreement|label_agreement|label_run_share|threshold|target_capacity``,
  ``flops/routed_over_dense_expanded`` and ``tokens_per_second``, reduced over ranks and micro-batches.
  ``add_routing_callback(trainer)`` installs it on a plain ``Trainer`` or TRL ``SFTTrainer``.
- ``DloTrainer`` = ``Trainer`` + that callback + optional per-layer learning rates scaled by capacity +
  SIGTERM handling (finish the step, save a checkpoint, stop; the previous handler is restored after).
"""

from __future__ import annotations

import os
import signal
import time

import torch
from transformers import Trainer, TrainerCallback

from dlo.distributed import all_reduce_sum, any_rank
from dlo.flops import routed_over_dense_ratio
from dlo.modeling import routed_layers, routing_state
from dlo.validation import Boolean, Number, check_instance


def find_routed_model(model):
    """The routed model under DDP / accelerate / peft wrappers, or None for a plain model (``TypeError`` for
    anything that is no ``torch.nn.Module``)."""
    check_instance("model", model, torch.nn.Module, "a model (torch.nn.Module), possibly wrapped")
    for module in model.modules():
        if hasattr(module, "dlo_routing_config") and hasattr(module, "get_decoder"):
            return module
    return None


def routing_log_entries(model) -> dict[str, float]:
    """Flat log entries (``routing/capacity/layer_3``, ...) of what the model's routing did since the last call.
    Raises ``ValueError`` for a model without routers."""
    state = routing_state(check_instance("model", model, torch.nn.Module, "a routed model (torch.nn.Module)"))
    means = state.pop_logs()
    if not means:
        return {}
    logs: dict[str, float] = {"router_loss": round(means.pop("router_loss"), 6)}
    if "task_loss" in means:
        logs["task_loss"] = round(means.pop("task_loss"), 6)
    for key, values in means.items():
        for layer, value in zip(state.layers, values):
            logs[f"{key}/layer_{layer.layer_index}"] = round(float(value), 5)
    realised = means["routing/capacity"]
    logs["routing/mean_capacity"] = round(sum(realised) / len(realised), 5)
    return logs


def routing_console_line(logs: dict) -> str:
    """One readable line per log: step loss terms and per-layer realised capacity and agreement. ``logs`` is
    a Trainer log holding ``routing_log_entries`` (``ValueError`` names what is missing)."""
    check_instance("logs", logs, dict, "a Trainer log (a dict) with routing entries")
    if "router_loss" not in logs:
        raise ValueError(f"logs has no 'router_loss' (keys: {sorted(logs)[:8]}); pass a log that "
                         "routing_log_entries filled")
    layers = sorted(int(k.rsplit("_", 1)[1]) for k in logs if k.startswith("routing/capacity/layer_"))
    cells = " ".join(f"L{i}:{logs[f'routing/capacity/layer_{i}']:.2f}/{logs[f'routing/agreement/layer_{i}']:.2f}"
                     for i in layers)
    task = f"task {logs['task_loss']:.4f}  " if "task_loss" in logs else ""
    return f"{task}router {logs['router_loss']:.4f}  capacity/agreement {cells}"


class RoutingLogCallback(TrainerCallback):
    """Adds routing terms to every training log, before tensorboard and the console see it.

    Must run before the Trainer's reporting callbacks: use ``add_routing_callback(trainer)``.
    """

    def __init__(self, print_line: bool = True):
        self.print_line = Boolean()("print_line", print_line)
        self._tokens: torch.Tensor | None = None  # real tokens since the last log, on the model's device
        self._rows = 0
        self._last_time = time.perf_counter()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._last_time = time.perf_counter()

    def count_batch(self, inputs: dict):
        """Note a micro-batch's real tokens (for tokens/s and the FLOPs ratio at the mean length)."""
        mask = inputs.get("attention_mask")
        if mask is None and inputs.get("position_ids") is not None:  # packed blocks: no padding, every token is real
            mask = torch.ones_like(inputs["input_ids"])
        if mask is not None:
            count = mask.sum().double()  # stays on the device: no host sync per micro-batch
            self._tokens = count if self._tokens is None else self._tokens + count
            self._rows += mask.shape[0]

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs is None or "loss" not in logs or model is None:
            return
        routed = find_routed_model(model)
        now = time.perf_counter()
        device = next(model.parameters()).device
        local = torch.stack([self._tokens.to(device) if self._tokens is not None
                             else torch.zeros((), dtype=torch.float64, device=device),
                             torch.tensor(float(self._rows), dtype=torch.float64, device=device)])
        tokens, rows = all_reduce_sum(local).tolist()
        if rows:  # counted by DloTrainer; a plain Trainer does not show the callback its batches
            logs["tokens_per_second"] = round(tokens / max(now - self._last_time, 1e-9), 2)
        self._tokens, self._rows, self._last_time = None, 0, now
        if routed is None:
            return
        entries = routing_log_entries(routed)
        if not entries:
            return
        if rows:
            realised = [entries[f"routing/capacity/layer_{layer.layer_index}"] for layer in routed_layers(routed)]
            entries["flops/routed_over_dense_expanded"] = round(
                routed_over_dense_ratio(routed, tokens / rows, realised), 5)
        logs.update(entries)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(entries)
        if self.print_line and state.is_world_process_zero:
            print(f"[step {state.global_step}] {routing_console_line(logs)}", flush=True)


def add_routing_callback(trainer: Trainer, print_line: bool = True) -> RoutingLogCallback:
    """Install ``RoutingLogCallback`` first in ``trainer``'s callbacks, so every reporter sees its entries.
    Raises ``TypeError`` unless ``trainer`` is a transformers ``Trainer`` (TRL's trainers are) and ``print_line``
    a bool."""
    check_instance("trainer", trainer, Trainer, "a transformers Trainer (or TRL SFTTrainer)")
    callback = RoutingLogCallback(print_line=print_line)
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback


class GracefulStopCallback(TrainerCallback):
    """On SIGTERM: finish the current step, save a checkpoint, stop. The run then resumes exactly."""

    def __init__(self):
        self.stop_requested = False
        self._previous = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._previous = signal.signal(signal.SIGTERM, self._request_stop)

    def on_step_end(self, args, state, control, **kwargs):
        # The signal reaches each rank at its own moment; every rank must stop after the same step (they save
        # the checkpoint together), so the ranks agree: one all-reduce of one number per optimizer step.
        if any_rank(self.stop_requested, args.device):
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _request_stop(self, signum, frame):
        self.stop_requested = True


class DloTrainer(Trainer):
    """``Trainer`` with routing logs, optional capacity-scaled learning rates and graceful SIGTERM."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.routing_logs = add_routing_callback(self, print_line=not self.args.disable_tqdm)
        self.graceful_stop = GracefulStopCallback()
        self.add_callback(self.graceful_stop)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.routing_logs.count_batch(inputs)
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def create_optimizer(self, *args, **kwargs):
        """With ``capacity_scaled_lr``, each routed layer's parameters get lr * its target capacity."""
        routed = find_routed_model(self.model)
        if self.optimizer is not None or routed is None or not routed.dlo_routing_config.capacity_scaled_lr:
            return super().create_optimizer(*args, **kwargs)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
        base_lr = optimizer_kwargs.pop("lr", self.args.learning_rate)
        assigned, groups = set(), []
        for layer in routed_layers(routed):
            # A shared repetition's weights are its source's: they go with the first routed layer that uses them.
            params = [p for p in layer.parameters() if p.requires_grad and id(p) not in assigned]
            assigned.update(id(p) for p in params)
            groups.append({"params": params, "lr": base_lr * layer.target_capacity,
                           "weight_decay": self.args.weight_decay})
        rest = [p for p in self.model.parameters() if p.requires_grad and id(p) not in assigned]
        groups.append({"params": rest, "lr": base_lr, "weight_decay": self.args.weight_decay})
        self.optimizer = optimizer_cls([g for g in groups if g["params"]], **optimizer_kwargs)
        return self.optimizer


class CapacityImageCallback(TrainerCallback):
    """Every ``every`` optimizer steps, draws per-layer realised vs target capacity into tensorboard."""

    def __init__(self, log_dir: str, every: int):
        self.log_dir = check_instance("log_dir", log_dir, (str, os.PathLike), "a directory path")
        self.every = Number(low=1, integer=True)("every", every)
        self.writer = None

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        routed = find_routed_model(model) if model is not None else None
        if routed is None or not state.is_world_process_zero or not logs or state.global_step % self.every:
            return
        layers = routed_layers(routed)
        realised = [logs.get(f"routing/capacity/layer_{layer.layer_index}") for layer in layers]
        if any(v is None for v in realised):
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from torch.utils.tensorboard import SummaryWriter

        if self.writer is None:
            self.writer = SummaryWriter(log_dir=self.log_dir)
        names = [str(layer.layer_index) for layer in layers]
        fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(names) + 2), 3))
        ax.bar(names, realised, label="realised (top-k)", alpha=0.8)
        ax.plot(names, [layer.target_capacity for layer in layers], "k_", markersize=18, label="target")
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("layer")
        ax.set_ylabel("share of tokens run")
        ax.legend(loc="lower right", fontsize=7)
        fig.tight_layout()
        self.writer.add_figure("routing/capacity_per_layer", fig, global_step=state.global_step)
        self.writer.flush()
        plt.close(fig)

    def on_train_end(self, args, state, control, **kwargs):
        if self.writer is not None:
            self.writer.close()
