"""The mixed-depth testbed (dlo/tiny/mixed_depth.py) and its pre-registered criterion (dlo/study/preregistered.py)."""

import json
from pathlib import Path

import pytest

from dlo.chat import assistant_token_mask
from dlo.study.config import load_study_config
from dlo.study.preregistered import preregistered
from dlo.tiny import depth_tasks
from dlo.tiny.mixed_depth import MixedDepthSpec

CONFIG = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "study_mixed.yaml"


def successor_map(prompt: str) -> dict[str, str]:
    words = prompt.split()
    return {key: value for key, value, _ in zip(*[iter(words[:-2])] * 3)}  # "key value ," triples


def test_walk_letters_move_one_or_two_steps_by_the_letter_they_leave():
    spec = MixedDepthSpec()
    tokenizer = depth_tasks.build_tokenizer(spec)
    seen = set()
    for record in depth_tasks.generate(spec, 50, seed=5):
        ids, mask = assistant_token_mask(tokenizer, record["messages"])
        assert tokenizer.unk_token_id not in ids
        assert sum(mask) == len(record["token_classes"]) == spec.walk + 3  # path, start, walk, <|end|>
        f = successor_map(record["messages"][0]["content"])
        words = record["answer"].split()
        assert words[0] == "path" and record["messages"][0]["content"].endswith(f"? {words[1]}")
        for before, letter, cls in zip(words[1:], words[2:], record["token_classes"][2:]):
            double = "bdfhjlnprtvxz".find(before) >= 0  # every second letter of the alphabet
            assert letter == (f[f[before]] if double else f[before])
            assert cls == ("hop2" if double else "hop1")
            seen.add(cls)
        assert record["token_classes"][:2] == ["format", "copy"] and record["token_classes"][-1] == "format"
    assert seen == {"hop1", "hop2"}
    assert depth_tasks.generate(spec, 3, seed=5) == depth_tasks.generate(spec, 3, seed=5)
    with pytest.raises(ValueError, match="walk=0: must be in"):
        MixedDepthSpec(walk=0)


def test_the_build_reports_every_token_class(tmp_path):
    info = depth_tasks.build(tmp_path, seed=1, task=MixedDepthSpec(), base=depth_tasks.BaseSpec(pretrain_steps=2),
                             train_records=64, eval_records=16)
    assert set(info["base_eval_class_loss"]) == {"format", "copy", "hop1", "hop2"}
    assert info["settings"]["task"]["kind"] == "mixed"
    first = json.loads((tmp_path / "data" / "eval.jsonl").read_text().splitlines()[0])
    assert first["task"] == "mixed-depth"


def rows_for(dlo_minus_static: dict[str, list[float]], dense_two_hop_acc: float = 0.95,
             llama_pro_two_hop_loss: float = 2.0) -> list[dict]:
    """Synthetic study rows of three seeds: static models at eval loss 1.0, DLO below them by the given margins."""
    def row(name, seed, loss, layers, two_hop_loss=None, acc=0.5):
        return {"name": name, "seed": seed, "eval_loss": loss, "num_layers": layers, "loss_easy": 0.0,
                "loss_two-hop": loss if two_hop_loss is None else two_hop_loss, "accuracy_two-hop": acc,
                "gain_share": 0.5, "compute_share": 0.5, "label": "cos-global"}

    rows = []
    for seed in range(3):
        rows += [row("base", seed, 2.0 + 0.01 * seed, 1, two_hop_loss=2.5, acc=0.1),
                 row("dense", seed, 0.1, 3, two_hop_loss=0.1, acc=dense_two_hop_acc),
                 row("llama-pro", seed, 1.0, 2, two_hop_loss=llama_pro_two_hop_loss),
                 row("shortgpt-2L", seed, 1.0, 2)]
        for arm, margins in dlo_minus_static.items():
            rows += [row(arm, seed, 1.0 - margins[seed], 3), row(f"{arm}/usage-2L", seed, 1.0, 2)]
    return rows


def test_mixed_depth_criterion_asks_for_a_margin_of_two_seed_sds():
    cfg = load_study_config(str(CONFIG), ["study_dir=unused"])
    groups = ["prompt", "easy", "one-hop", "two-hop"]
    # dlo-c050-s8 beats every static model by 0.5-0.7 (mean 0.6, sd 0.1: 6 sd); dlo-c050-cos by 0.1-0.9 (1.25 sd).
    verdict = preregistered(rows_for({"dlo-c050-s8": [0.5, 0.6, 0.7], "dlo-c050-cos": [0.1, 0.5, 0.9]}), cfg, groups)
    assert verdict["testbed"]["holds"], verdict["testbed"]["checks"]
    answers = {q["arm"]: q for q in verdict["question"]}
    assert set(answers["dlo-c050-s8"]["versus"]) == {"shortgpt-2L", "dlo-c050-s8/usage-2L", "llama-pro"}
    assert answers["dlo-c050-s8"]["yes"] and not answers["dlo-c050-cos"]["yes"]
    assert all("more than 2 seed sd" in name for name in answers["dlo-c050-cos"]["checks"])

    # The testbed fails when dense does not learn the deep tokens, or the 2-layer model learns them too.
    checks = preregistered(rows_for({"dlo-c050-s8": [0.6] * 3}, dense_two_hop_acc=0.5), cfg, groups)["testbed"]
    assert not checks["holds"] and not checks["checks"]["dense two-hop accuracy >= 0.8"]
    checks = preregistered(rows_for({"dlo-c050-s8": [0.6] * 3}, llama_pro_two_hop_loss=0.5), cfg, groups)["testbed"]
    assert not checks["holds"] and not checks["checks"]["llama-pro two-hop loss >= dense's + 1 nat"]
