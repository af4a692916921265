"""Model cards of real tiny checkpoints: `dlo expand` -> the SFT recipe (routed final/) -> `dlo export`, each card
checked against the files it was made from (config.json, summary.json, export.json) and the models themselves."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM

import dlo
from dlo.cli import main
from dlo.model_card import ATTRIBUTION_HEADING, DISTRIBUTION, read_card, write_model_card
from dlo.tiny.__main__ import base_card

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "assets" / "tiny" / "base"
EVAL = ROOT / "assets" / "tiny" / "sft" / "eval.jsonl"
TRAIN = "assets/tiny/sft/train.jsonl"
needs_the_chain = pytest.mark.slow  # the expand -> recipe -> export chain runs the recipe in a subprocess
RECIPE = ["training.max_steps=4", "training.per_device_train_batch_size=4", "training.logging_steps=2",
          "training.save_steps=100", "routing.anneal_steps=2", "data.max_length=64", "data.max_train_samples=64",
          "data.max_eval_samples=16", "calibration_samples=16"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The demo's chain at a few steps: expanded, routed (recipe final/), exported."""
    out = tmp_path_factory.mktemp("cards")
    assert main(["expand", "--model", str(BASE), "--strategy", "llama-pro", "--groups", "2", "--init", "zero",
                 "--output", str(out / "expanded")]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("TENSORBOARD_LOGGING_DIR", None)
    cmd = [sys.executable, str(ROOT / "recipes" / "sft.py"), "--config", str(ROOT / "recipes/configs/tiny.yaml"),
           f"output_dir={out / 'sft'}", f"model.path={out / 'expanded'}", "model.expansion=null", *RECIPE]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert main(["export", "--model", str(out / "sft" / "final"), "--output", str(out / "exported"),
                 "--num-layers", "7", "--data", str(EVAL), "--max-samples", "16"]) == 0
    return {"expanded": out / "expanded", "routed": out / "sft" / "final", "exported": out / "exported"}


def card(directory: Path) -> tuple[dict, str]:
    text = (directory / "README.md").read_text()
    assert text.startswith("---\n")
    metadata, body = read_card(str(directory / "README.md"))
    assert metadata == yaml.safe_load(text.split("---\n")[1])
    return metadata, body


def section(body: str, heading: str) -> str:
    return body.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]


def tables(text: str) -> list[list[dict]]:
    """The markdown tables in ``text``, each a list of rows keyed by the header."""
    found = []
    for block in text.split("\n\n"):
        lines = [line for line in block.splitlines() if line.startswith("|")]
        if lines:
            header = [cell.strip() for cell in lines[0].strip("|").split("|")]
            found.append([dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]])
    return found


def table(text: str) -> list[dict]:
    return tables(text)[0]


def config(directory: Path) -> dict:
    return json.loads((directory / "config.json").read_text())


def base_attribution() -> str:
    return read_card(str(BASE / "README.md"))[1].split(ATTRIBUTION_HEADING, 1)[1].split("\n## ")[0].strip()


def check_common(metadata: dict, body: str, tags: set):
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "text-generation"
    assert tags <= set(metadata["tags"]) and "dlo" in metadata["tags"]
    # The tiny default's license and attribution travel down the chain; a local base is no Hub id.
    assert metadata["license"] == "cc-by-2.5" and "base_model" not in metadata
    assert section(body, "License and attribution").strip() == base_attribution()
    assert "Creative Commons Attribution 2.5" in base_attribution()
    assert "Open Knowledge Foundation" in base_attribution()


@needs_the_chain
def test_expanded_card(runs):
    metadata, body = card(runs["expanded"])
    check_common(metadata, body, {"layer-expansion", "llama-pro"})
    assert "dynamic-depth" not in metadata["tags"]
    expansion = config(runs["expanded"])["dlo_expansion"]
    rows = table(section(body, "Layers"))
    assert [(int(r["base layer"]), r["init"], r["new"] == "yes") for r in rows] == [
        (e["source"], e["init"], e["new"]) for e in expansion["layers"]]
    assert "strategy `llama-pro` (groups=2, init=zero), 6 -> 8 layers" in section(body, "Layers")
    counts = {r[""]: int(r["parameters"].replace(",", "")) for r in table(section(body, "Parameters"))}
    expanded = AutoModelForCausalLM.from_pretrained(runs["expanded"])
    base = AutoModelForCausalLM.from_pretrained(BASE)
    assert counts == {"this model": expanded.num_parameters(), "base model (6 layers)": base.num_parameters()}
    assert f"AutoModelForCausalLM.from_pretrained({str(runs['expanded'])!r})" in section(body, "How to load")


@needs_the_chain
def test_routed_card(runs):
    metadata, body = card(runs["routed"])
    check_common(metadata, body, {"layer-expansion", "dynamic-depth", "token-routing"})
    routing = config(runs["routed"])["dlo_routing"]
    summary = json.loads((runs["routed"] / "summary.json").read_text())
    realised = {row["layer"]: row["realised_capacity"] for row in summary["layers"]}
    rows = table(section(body, "Routing"))
    assert [int(r["layer"]) for r in rows] == routing["routed_layers"] == [3, 7]
    for row, target, threshold in zip(rows, routing["capacities"], routing["thresholds"]):
        assert float(row["target capacity"]) == pytest.approx(target, abs=5e-4)
        assert float(row["realised capacity"]) == pytest.approx(realised[int(row["layer"])], abs=5e-4)
        assert float(row["threshold"]) == pytest.approx(threshold, abs=5e-5)
    assert [r["routed"] for r in table(section(body, "Layers"))] == ["yes" if i in (3, 7) else "no" for i in range(8)]
    figures = {r[""]: r["value"] for r in table(section(body, "Training and evaluation"))}
    assert float(figures["eval loss"]) == summary["eval_loss"] and float(figures["eval perplexity"]) == pytest.approx(
        summary["eval_perplexity"], rel=1e-5)
    assert int(figures["optimizer steps"]) == summary["steps"] == 4
    assert {r[""]: r["value"] for r in table(section(body, "Details"))} == {"training data": TRAIN}
    model = dlo.load_model(str(runs["routed"]))
    counts = {r[""]: int(r["parameters"].replace(",", "")) for r in table(section(body, "Parameters"))}
    routers = sum(p.numel() for name, p in model.named_parameters() if ".router." in name)
    assert counts["this model"] == model.num_parameters() and counts["of which routers"] == routers > 0
    loading = section(body, "How to load")
    assert f"dlo.load_model({str(runs['routed'])!r})" in loading
    assert f"AutoModelForCausalLM.from_pretrained({str(runs['routed'])!r}, trust_remote_code=True)" in loading
    assert f"pip install {DISTRIBUTION}" in loading and DISTRIBUTION == "dynamic-layer-operation"
    assert "needs transformers and torch only" in loading  # the checkpoint carries its modeling code


@needs_the_chain
def test_exported_card(runs):
    metadata, body = card(runs["exported"])
    check_common(metadata, body, {"layer-expansion", "layer-pruning"})
    record = json.loads((runs["exported"] / "export.json").read_text())
    info = config(runs["exported"])["dlo_export"]
    assert record["kept"] == info["kept"] and len(info["kept"]) == 7
    text = section(body, "Export")
    assert f"Kept layers {info['kept']} and dropped {info['dropped']} of the 8 layers" in text
    rows = table(section(body, "Layers"))
    assert [int(r["source layer"]) for r in rows] == info["kept"]
    expansion = config(runs["exported"])["dlo_expansion"]["layers"]
    assert [int(r["base layer"]) for r in rows] == [expansion[i]["source"] for i in info["kept"]]
    dropped, losses = tables(text)
    assert [(int(r["dropped layer"]), float(r["capacity"])) for r in dropped] == [
        (i, pytest.approx(info["usage"][str(i)], abs=5e-4)) for i in info["dropped"]]
    losses = {r[""]: r for r in losses}
    before, after = record["eval"]["before"], record["eval"]["after"]
    assert losses["loss"]["routed model"] == f"{before['loss']:.4f}"
    assert losses["loss"]["export"] == f"{after['loss']:.4f}"
    assert losses["perplexity"]["export"] == f"{after['perplexity']:.2f}"
    assert f"Measured on {record['eval']['tokens']} predicted tokens" in text
    loading = section(body, "How to load")
    assert f"AutoModelForCausalLM.from_pretrained({str(runs['exported'])!r})\n" in loading
    assert "trust_remote_code" not in loading and "without dlo" in loading
    exported = AutoModelForCausalLM.from_pretrained(runs["exported"])
    assert int(table(section(body, "Parameters"))[0]["parameters"].replace(",", "")) == exported.num_parameters()


@needs_the_chain
def test_base_from_the_hub_cache_and_without_a_license(runs, tmp_path):
    snapshot = tmp_path / "hub" / "models--some-org--some-model" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "README.md").write_text("---\nlicense: llama3.2\ndatasets:\n- some-org/some-data\n---\n# card\n")
    target = tmp_path / "expanded"
    target.mkdir()
    for name in ("config.json", "model.safetensors"):
        (target / name).symlink_to(runs["expanded"] / name)
    write_model_card(str(target), base_model=str(snapshot))
    metadata, body = card(target)
    assert metadata["base_model"] == "some-org/some-model" and metadata["license"] == "llama3.2"
    assert metadata["datasets"] == ["some-org/some-data"]
    assert "carry its license, `llama3.2`." in section(body, "License and attribution")

    plain = tmp_path / "plain-base"
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    write_model_card(str(target), base_model=str(plain))
    metadata, body = card(target)
    assert metadata["license"] == "other" and "base_model" not in metadata
    assert "name no license" in section(body, "License and attribution")

    write_model_card(str(target), base_model="some-org/not-cached")
    assert card(target)[0]["base_model"] == "some-org/not-cached"


def test_a_peft_adapter_directory_keeps_peft_s_own_card(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    assert write_model_card(str(tmp_path)) is None and not (tmp_path / "README.md").exists()


def test_the_tiny_default_s_card_is_the_builder_s():
    info = json.loads((ROOT / "assets" / "tiny" / "build_info.json").read_text())
    assert (BASE / "README.md").read_text() == base_card(info)
    metadata, _ = read_card(str(BASE / "README.md"))
    assert metadata["license"] == "cc-by-2.5" and "dlo" in metadata["tags"]
