"""DloTrainer: the HF Trainer with router loss, capacity annealing and routing telemetry.

Loss = task loss + lambda * router loss. Both are logged apart (``task_loss``, ``router_loss``),
with per-layer routing statistics (``routing/capacity/layer_{i}``, ``routing/agreement/...``,
``routing/threshold/...``), analytic FLOPs per token relative to the dense expanded model, and
tokens/s. Routing state that is not in the weights (the similarity refresh phase) is saved with
every checkpoint so a resumed run continues exactly.
"""

from __future__ import annotations

import json
import os
import signal
import time

import torch
from transformers import Trainer, TrainerCallback

from dlo.flops import routed_over_dense_ratio
from dlo.losses import router_loss
from dlo.modeling import routed_layers
from dlo.schedules import apply_capacity_schedule

ROUTING_STATE_FILE = "dlo_routing_state.json"


def _base_model(model):
    """The Dlo model under DDP/accelerate wrappers and peft."""
    model = getattr(model, "module", model)
    while hasattr(model, "base_model") and model.base_model is not model and not hasattr(model, "_dlo_state"):
        model = model.base_model
    while not hasattr(model, "_dlo_state") and hasattr(model, "model"):
        model = model.model
    return model if hasattr(model, "_dlo_state") else None


class DloTrainer(Trainer):
    """``Trainer`` that adds the router loss of a routed model (a plain model trains as usual)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Sums since the last log, kept on device (no host sync per micro-batch).
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0
        self._rows = 0  # sequences since the last log (with "tokens": the mean length for the FLOPs ratio)
        self._last_log_time = time.perf_counter()
        self.add_callback(RoutingCallback(self))

    def _accumulate(self, name: str, value: torch.Tensor):
        value = value.detach().float()
        self._sums[name] = self._sums[name] + value if name in self._sums else value.clone()

    @property
    def routed_model(self):
        return _base_model(self.model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        task_loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                  num_items_in_batch=num_items_in_batch)
        routed = self.routed_model
        loss = task_loss
        if routed is not None and model.training:
            weight = routed.dlo_routing_config.router_loss_weight
            out = router_loss(routed)
            rl = out.loss
            # When the task loss is already normalised over the accumulated batch (num_items_in_batch),
            # the Trainer will not divide by the accumulation steps: do it for the router term.
            if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
                rl = rl / self.current_gradient_accumulation_steps
                task_for_log = task_loss.detach() * self.current_gradient_accumulation_steps
            else:
                task_for_log = task_loss.detach()
            loss = task_loss + weight * rl
            self._accumulate("task_loss", task_for_log)
            self._accumulate("router_loss", out.loss)
            for name, values in out.stats.items():
                self._accumulate(f"routing/{name}", values)
            self._count += 1
        if "attention_mask" in inputs and model.training:
            self._accumulate("tokens", inputs["attention_mask"].sum())
            self._rows += inputs["attention_mask"].shape[0]
        return (loss, outputs) if return_outputs else loss

    def create_optimizer(self, *args, **kwargs):
        """With ``capacity_scaled_lr``, each routed layer's parameters get lr * its target capacity."""
        routed = self.routed_model
        if self.optimizer is not None or routed is None or not routed.dlo_routing_config.capacity_scaled_lr:
            return super().create_optimizer(*args, **kwargs)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
        base_lr = optimizer_kwargs.pop("lr", self.args.learning_rate)
        assigned, groups = set(), []
        for layer in routed_layers(routed):
            params = [p for p in layer.parameters() if p.requires_grad]
            assigned.update(id(p) for p in params)
            groups.append({"params": params, "lr": base_lr * layer.target_capacity,
                           "weight_decay": self.args.weight_decay})
        rest = [p for p in self.model.parameters() if p.requires_grad and id(p) not in assigned]
        groups.append({"params": rest, "lr": base_lr, "weight_decay": self.args.weight_decay})
        self.optimizer = optimizer_cls([g for g in groups if g["params"]], **optimizer_kwargs)
        return self.optimizer

    def log(self, logs: dict, *args, **kwargs):
        if "loss" in logs:  # a training log: flush what accumulated since the last one
            sums = {k: v.cpu() for k, v in self._sums.items()}
            self._sums = {}
            now = time.perf_counter()
            tokens = float(sums.pop("tokens", 0.0))
            rows, self._rows = self._rows, 0
            logs["tokens_per_second"] = round(tokens / max(now - self._last_log_time, 1e-9), 2)
            self._last_log_time = now
            if self._count:
                routed = self.routed_model
                layers = routed_layers(routed)
                for key, total in sums.items():
                    mean = total / self._count
                    if mean.ndim == 0:
                        logs[key] = round(float(mean), 6)
                        continue
                    for layer, value in zip(layers, mean.tolist()):
                        logs[f"{key}/layer_{layer.layer_index}"] = round(value, 5)
                logs["routing/mean_capacity"] = round(float(sums["routing/capacity"].mean() / self._count), 5)
                if rows:  # analytic FLOPs at the capacities realised since the last log and the mean length
                    realised = (sums["routing/capacity"] / self._count).tolist()
                    ratio = routed_over_dense_ratio(routed, tokens / rows, realised)
                    logs["flops/routed_over_dense_expanded"] = round(ratio, 5)
                self._count = 0
        super().log(logs, *args, **kwargs)


class RoutingCallback(TrainerCallback):
    """Capacity annealing per optimizer step, routing state in checkpoints, graceful SIGTERM."""

    def __init__(self, trainer: DloTrainer):
        self.trainer = trainer
        self.stop_requested = False

    def on_train_begin(self, args, state, control, **kwargs):
        signal.signal(signal.SIGTERM, self._request_stop)
        routed = self.trainer.routed_model
        if routed is None:
            return
        for layer in routed_layers(routed):  # python mirrors of buffers restored from a checkpoint
            layer.target_capacity = float(layer.capacity)
        resume = getattr(self.trainer, "_dlo_resume_dir", None)
        if resume and os.path.isfile(os.path.join(resume, ROUTING_STATE_FILE)):
            with open(os.path.join(resume, ROUTING_STATE_FILE)) as fh:
                saved = json.load(fh)
            routed._dlo_state.forward_count = saved["forward_count"]
            for layer, quantiles, capacity in zip(routed_layers(routed), saved["score_quantiles"],
                                                  saved["capacities"]):
                layer.score_quantiles.copy_(torch.tensor(quantiles))
                layer.set_target_capacity(capacity)

    def on_step_begin(self, args, state, control, **kwargs):
        routed = self.trainer.routed_model
        if routed is not None:
            apply_capacity_schedule(routed, state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.stop_requested:
            control.should_save = True
            control.should_training_stop = True

    def on_save(self, args, state, control, **kwargs):
        routed = self.trainer.routed_model
        if routed is None or not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        layers = routed_layers(routed)
        payload = {
            "forward_count": routed._dlo_state.forward_count,
            "score_quantiles": [layer.score_quantiles.tolist() for layer in layers],
            "capacities": [layer.target_capacity for layer in layers],
        }
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, ROUTING_STATE_FILE), "w") as fh:
            json.dump(payload, fh)

    def _request_stop(self, signum, frame):
        # Finish the current step, save a checkpoint, exit cleanly: the run resumes exactly.
        self.stop_requested = True


class CapacityImageCallback(TrainerCallback):
    """Every ``every`` optimizer steps, draws per-layer realised vs target capacity into tensorboard."""

    def __init__(self, trainer: DloTrainer, log_dir: str, every: int):
        self.trainer, self.log_dir, self.every = trainer, log_dir, every
        self.writer = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        routed = self.trainer.routed_model
        if routed is None or not state.is_world_process_zero or not logs or state.global_step % self.every:
            return
        realised = [logs.get(f"routing/capacity/layer_{layer.layer_index}") for layer in routed_layers(routed)]
        if any(v is None for v in realised):
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from torch.utils.tensorboard import SummaryWriter

        if self.writer is None:
            self.writer = SummaryWriter(log_dir=self.log_dir)
        layers = routed_layers(routed)
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
