"""Recipe YAML + key=value overrides."""

import pytest
import yaml

from dlo.recipe_config import RecipeConfig, apply_overrides, changed_settings, load_recipe_config, training_arguments

BASE = {
    "output_dir": "runs/x",
    "model": {"path": "m"},
    "data": {"train_file": "t.jsonl"},
    "routing": {"capacity": 0.5},
    "training": {"max_steps": 10},
}


def test_overrides_reach_sections_and_parse_scalars():
    raw = apply_overrides(BASE, ["routing.capacity=0.25", "training.max_steps=3", "output_dir=runs/y",
                                 "training.learning_rate=1e-4", "lora.r=4", "data.eval_file=null"])
    cfg = RecipeConfig.from_dict(raw)
    assert cfg.routing.capacity == 0.25
    assert cfg.training == {"max_steps": 3, "learning_rate": 1e-4}
    assert cfg.output_dir == "runs/y"
    assert cfg.lora.r == 4
    assert cfg.data.eval_file is None
    assert BASE["routing"]["capacity"] == 0.5  # the input mapping is not mutated


@pytest.mark.parametrize(
    "override, match",
    [
        ("routing.capacty=0.3", "unknown config key 'routing.capacty'.*did you mean 'capacity'"),
        ("model.pth=x", "unknown config key 'model.pth'.*did you mean 'path'"),
        ("outptu_dir=x", "did you mean 'output_dir'"),
        ("routing.capacity=2", r"capacity=2: must be in \(0, 1\]"),
        ("model.dtype=fp8", "model.dtype='fp8'"),
        ("noequals", "expected key=value"),
    ],
)
def test_bad_keys_and_values_are_named(override, match):
    with pytest.raises(ValueError, match=match):
        RecipeConfig.from_dict(apply_overrides(BASE, [override]))


def test_bundled_configs_parse():
    from pathlib import Path

    # study_*.yaml configure recipes/study.py (tests/test_study.py parses them); the rest are sft.py configs.
    configs = sorted(p for p in (Path(__file__).resolve().parents[1] / "recipes" / "configs").glob("*.yaml")
                     if not p.name.startswith("study_"))
    assert len(configs) >= 5
    for path in configs:
        cfg = load_recipe_config(str(path))
        assert cfg.routing is not None and cfg.model.expansion["strategy"] in ("llama-pro", "dus")


def test_training_arguments_errors_name_the_key():
    cfg = RecipeConfig.from_dict(apply_overrides(BASE, ["training.load_best_model_at_end=true"]))
    with pytest.raises(ValueError, match=r"^training.load_best_model_at_end=True: .*save and eval strategy"):
        training_arguments(cfg)
    assert training_arguments(RecipeConfig.from_dict(BASE)).max_steps == 10


def test_resume_compares_settings_against_training_defaults():
    recorded = yaml.safe_load(yaml.safe_dump(RecipeConfig.from_dict(BASE).to_dict()))
    # Explicit defaults are no change; run length, cadence and eval data may change on resume.
    same = apply_overrides(BASE, ["training.weight_decay=0.0", "training.report_to=[tensorboard]",
                                  "training.max_steps=99", "training.logging_steps=3", "data.eval_file=e.jsonl"])
    assert changed_settings(recorded, RecipeConfig.from_dict(same)) == []
    other = apply_overrides(BASE, ["training.weight_decay=0.1", "routing.beta=0.2"])
    assert changed_settings(recorded, RecipeConfig.from_dict(other)) == [
        ("routing.beta", 0.05, 0.2), ("training.weight_decay", 0.0, 0.1)]
    dense = RecipeConfig.from_dict(apply_overrides(BASE, ["routing=null"]))
    routing_keys = [f"routing.{key}" for key in sorted(recorded["routing"])]
    assert [key for key, _, _ in changed_settings(recorded, dense)] == routing_keys
