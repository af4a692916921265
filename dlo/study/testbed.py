"""The testbed a study trains and measures on: its section of the config and its build (cached by settings)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dlo.study.jsonfiles import read_json
from dlo.tiny import depth_tasks
from dlo.tiny.mixed_depth import MixedDepthSpec

if TYPE_CHECKING:
    from dlo.study.config import StudyConfig


TESTBED_PLACEHOLDER = "{testbed}"


TASK_KINDS = ("walk", "mixed")


@dataclass
class TestbedSection:
    kind: str = "walk"  # walk: dlo/tiny/depth_tasks.py; mixed: dlo/tiny/mixed_depth.py (1 or 2 hops by letter)
    seed: int = 0
    nodes: int = depth_tasks.TaskSpec.nodes
    walk: int = depth_tasks.TaskSpec.walk  # steps per answer
    alphabet: int = depth_tasks.TaskSpec.alphabet
    train_records: int = 40000
    eval_records: int = 512
    pretrain_steps: int = depth_tasks.BaseSpec.pretrain_steps

    def __post_init__(self):
        if self.kind not in TASK_KINDS:
            raise ValueError(f"testbed.kind={self.kind!r}: expected one of {list(TASK_KINDS)}")
        for name in ("train_records", "eval_records", "pretrain_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"testbed.{name}={getattr(self, name)}: must be >= 1")

    def task(self):
        """The task spec of ``kind`` (validated by it)."""
        if self.kind == "walk":
            return depth_tasks.TaskSpec(nodes=self.nodes, walk=self.walk, alphabet=self.alphabet)
        return MixedDepthSpec(nodes=self.nodes, walk=self.walk, alphabet=self.alphabet)

    def build_settings(self) -> tuple[dict, dict]:
        """The builder's keyword arguments and the settings its build_info records for them."""
        task = self.task()
        base = depth_tasks.BaseSpec(pretrain_steps=self.pretrain_steps)
        kwargs = {"seed": self.seed, "task": task, "base": base, "train_records": self.train_records,
                  "eval_records": self.eval_records}
        return kwargs, depth_tasks.settings(**kwargs)


def with_testbed_paths(node, testbed_dir: str):
    """``node`` with ``{testbed}`` in its strings replaced by the testbed directory."""
    if isinstance(node, dict):
        return {k: with_testbed_paths(v, testbed_dir) for k, v in node.items()}
    if isinstance(node, str):
        return node.replace(TESTBED_PLACEHOLDER, testbed_dir)
    return node


def ensure_testbed(cfg: StudyConfig):
    """Build the testbed unless ``<study_dir>/testbed`` holds one built with the same settings."""
    if cfg.testbed is None:
        return
    kwargs, expected = cfg.testbed.build_settings()
    info_path = os.path.join(cfg.testbed_dir, "build_info.json")
    info = read_json(info_path)
    if info is not None and info["settings"] == expected:
        print(f"[study] testbed: {cfg.testbed_dir} (built before)", flush=True)
        return
    print(f"[study] building the testbed in {cfg.testbed_dir}", flush=True)
    shutil.rmtree(cfg.testbed_dir, ignore_errors=True)
    info = depth_tasks.build(cfg.testbed_dir, **kwargs)
    losses = ", ".join(f"{k} {v:.3f}" for k, v in info["base_eval_class_loss"].items())
    print(f"  base: {info['parameters']:,} parameters; eval loss per token class: {losses}", flush=True)
