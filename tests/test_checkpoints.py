"""Finding checkpoints (directories, hub ids from an offline Hugging Face cache, LoRA bases), checking their
files, and writing outputs atomically."""

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from dlo.checkpoints import (
    adapter_base_dir,
    atomic_output_dir,
    check_output_dir,
    check_weights,
    read_config,
    resolve_model_dir,
    safetensors_keys,
    weight_files,
)
from dlo.cli import main
from dlo.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "assets" / "tiny" / "base"


# -- resolving model references ----------------------------------------------------------------------------------


def test_a_local_directory_comes_first(tmp_path, offline_hub, monkeypatch):
    assert resolve_model_dir(str(TINY)) == str(TINY)
    # A directory that happens to look like a hub id wins over the cache, as in transformers.
    (tmp_path / offline_hub.repo).mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_model_dir(offline_hub.repo) == str(tmp_path / offline_hub.repo)


def test_a_hub_id_resolves_offline_from_the_cache(offline_hub):
    repo, snapshot = offline_hub.repo, str(offline_hub.snapshot)
    assert resolve_model_dir(repo) == snapshot
    assert resolve_model_dir(repo, "main") == resolve_model_dir(repo, offline_hub.commit) == snapshot
    assert read_config(resolve_model_dir(repo))["model_type"] == "llama"


@pytest.mark.parametrize("ref, revision, expected", [
    ("dlo-test/missing", None, ["'dlo-test/missing' not found", "no local directory", "{hub} has no "
                                "models--dlo-test--missing", "revision 'main'", "HF_HUB_OFFLINE is set"]),
    ("{repo}", "v9", ["{hub}/models--dlo-test--tiny has no revision 'v9'", "cached: main, {commit}",
                      "HF_HUB_OFFLINE is set"]),
    ("a/b/c", None, ["no local directory", "not a hub id"]),
])
def test_not_found_names_what_was_tried(offline_hub, ref, revision, expected):
    names = {"repo": offline_hub.repo, "hub": offline_hub.hub, "commit": offline_hub.commit}
    with pytest.raises(UserError) as err:
        resolve_model_dir(ref.format(**names), revision)
    message = str(err.value)
    for part in expected:
        assert part.format(**names) in message, message
    assert "\n" not in message


def test_a_file_is_not_a_model_directory(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match=r"is a file, not a model directory"):
        resolve_model_dir(str(tmp_path / "model.safetensors"))


def test_a_lora_adapter_on_a_hub_model_resolves_its_base(offline_hub, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": offline_hub.repo,
                                                             "revision": None}))
    assert adapter_base_dir(str(adapter)) == str(offline_hub.snapshot)
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "dlo-test/gone"}))
    with pytest.raises(UserError, match=r"LoRA adapter whose base model cannot be found: model 'dlo-test/gone'"):
        adapter_base_dir(str(adapter))
    assert adapter_base_dir(str(TINY)) is None


# -- checking files ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, match", [
    (None, r"config.json: missing; .* is not a saved model directory"),
    ("{not json", r"config.json: not valid JSON \(line 1, column 2"),
    ("[1, 2]", r"config.json: expected a JSON object, got list"),
    ('{"hidden_size": 8}', r"config.json: no 'model_type' key"),
])
def test_read_config_names_the_file(tmp_path, text, match):
    if text is not None:
        (tmp_path / "config.json").write_text(text)
    with pytest.raises(UserError, match=match):
        read_config(str(tmp_path))


@pytest.fixture
def weights(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(TINY, folder)
    return folder


def test_intact_weights_pass(weights):
    keys = safetensors_keys(str(weights / "model.safetensors"))
    assert "model.embed_tokens.weight" in keys
    assert set(weight_files(str(weights))) == set(keys)
    check_weights(str(weights))


@pytest.mark.parametrize("damage, match", [
    (lambda data: data[:-100], r"truncated safetensors file: its header describes \d+ bytes"),
    (lambda data: data[:1000], r"not a complete safetensors file"),
    (lambda data: data[:5], r"not a complete safetensors file \(a 5-byte file"),
    (lambda data: data + b"\0" * 16, r"corrupt safetensors file: 16 bytes after the last tensor"),
    (lambda data: data[:8] + b"#" * (len(data) - 8), r"corrupt safetensors header"),
    (lambda data: b"version https://git-lfs.github.com/spec/v1\n", r"not a complete safetensors file"),
])
def test_a_broken_safetensors_file_is_named(weights, damage, match):
    path = weights / "model.safetensors"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(UserError, match=match) as err:
        check_weights(str(weights))
    assert str(path) in str(err.value)


def test_a_sharded_checkpoint_is_checked_against_its_index(weights):
    (weights / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(UserError, match=r"names the shard model-00001-of-00002.safetensors, which .* does not hold"):
        weight_files(str(weights))
    (weights / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"not.a.tensor": "model.safetensors"}}))
    with pytest.raises(UserError, match=r"1 tensors are not in the shard it names for them, e.g. 'not.a.tensor'"):
        check_weights(str(weights))


def test_no_weights_at_all(weights):
    (weights / "model.safetensors").unlink()
    with pytest.raises(UserError, match=r"no weights \(expected one of model.safetensors"):
        check_weights(str(weights))


# -- writing outputs atomically ------------------------------------------------------------------------------------


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_output_permissions_follow_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        with atomic_output_dir(tmp_path / "new" / "out") as tmp:
            (Path(tmp) / "sub").mkdir()
    finally:
        os.umask(previous)
    assert _mode(tmp_path / "new" / "out") == _mode(tmp_path / "new") == 0o777 & ~umask
    assert _mode(tmp_path / "new" / "out" / "sub") == 0o777 & ~umask


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_failure_leaves_nothing_behind(tmp_path, error):
    with pytest.raises(type(error)):
        with atomic_output_dir(tmp_path / "a" / "b" / "out") as tmp:
            (Path(tmp) / "half.bin").write_bytes(b"x")
            raise error
    assert os.listdir(tmp_path) == []  # the parents made for it are gone too

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "previous.txt").write_text("kept")
    with pytest.raises(type(error)):
        with atomic_output_dir(tmp_path / "out", force=True) as tmp:
            raise error
    assert os.listdir(tmp_path) == ["out"] and os.listdir(tmp_path / "out") == ["previous.txt"]


def test_existing_output_needs_force_and_is_replaced_whole(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.png").write_text("an older run")
    with pytest.raises(UserError, match=rf"output '{out}' exists and is not empty; pass --force to replace it"):
        with atomic_output_dir(out):
            pass
    with atomic_output_dir(out, force=True) as tmp:
        (Path(tmp) / "new.json").write_text("{}")
    assert os.listdir(out) == ["new.json"]
    assert os.listdir(tmp_path) == ["out"]  # no hidden temporary or old directory left
    with atomic_output_dir(tmp_path / "empty_ok") as tmp:
        pass
    assert (tmp_path / "empty_ok").is_dir()


def test_output_checks(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"exists and is not a directory"):
        check_output_dir(tmp_path / "file")
    with pytest.raises(UserError, match=r"file is a file, so no directory can be made under it"):
        check_output_dir(tmp_path / "file" / "out")
    (tmp_path / "model").mkdir()
    with pytest.raises(UserError, match=r"holds the input .* which replacing it would delete"):
        check_output_dir(tmp_path, force=True, inputs=[str(tmp_path / "model")])
    assert check_output_dir(tmp_path / "x" / "y") == str(tmp_path / "x" / "y")


# -- the commands on a hub id -------------------------------------------------------------------------------------


def test_commands_take_a_hub_id(offline_hub, tmp_path, capsys):
    repo = offline_hub.repo
    data = ROOT / "assets" / "tiny" / "sft" / "eval.jsonl"
    expanded = tmp_path / "expanded"
    assert main(["expand", "--model", repo, "--strategy", "llama-pro", "--groups", "2",
                 "--output", str(expanded)]) == 0
    assert AutoModelForCausalLM.from_pretrained(expanded).config.num_hidden_layers == 8
    assert (expanded / "tokenizer.json").is_file() and not (expanded / "tokenizer.json").is_symlink()
    assert main(["report", "--model", repo, "--revision", offline_hub.commit, "--data", str(data), "--output",
                 str(tmp_path / "report"), "--max-samples", "4", "--repeats", "1", "--warmup", "0"]) == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["model"]["path"] == repo
    assert main(["export", "--model", repo, "--output", str(tmp_path / "export"), "--num-layers", "5",
                 "--data", str(data), "--max-samples", "4"]) == 0
    assert json.loads((tmp_path / "export" / "export.json").read_text())["source"] == repo
    capsys.readouterr()
    assert main(["generate", "--model", repo, "--prompt", "To be", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip()


def test_commands_on_a_lora_adapter_over_a_hub_model(offline_hub, tmp_path):
    from peft import LoraConfig, get_peft_model

    repo = offline_hub.repo
    base = AutoModelForCausalLM.from_pretrained(resolve_model_dir(repo))
    adapter = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    adapter.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**config,
                                                                         "base_model_name_or_path": repo}))
    assert main(["generate", "--model", str(tmp_path / "adapter"), "--prompt", "To be", "--max-new-tokens", "2"]) == 0


def _offline(hub_cache) -> dict:
    """Environment of a child process that finds hub ids in ``hub_cache`` (through HF_HOME) only."""
    return {"HF_HOME": str(hub_cache.home), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": None}


def test_end_to_end_with_the_environment_set(hub_cache, run_dlo, tmp_path):
    """A fresh process reads HF_HOME and HF_HUB_OFFLINE from the environment, as users set them."""
    repo = hub_cache.repo
    out = tmp_path / "expanded"
    proc = run_dlo("expand", "--model", repo, "--strategy", "dus", "--overlap", "1", "--output", out,
                   **_offline(hub_cache))
    assert proc.returncode == 0, proc.stderr
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 10

    for argv, expected in [
        (["generate", "--model", repo, "--revision", "v9", "--prompt", "x"], ["revision 'v9'", "HF_HUB_OFFLINE"]),
        (["expand", "--model", "dlo-test/unknown", "--strategy", "dus", "--overlap", "1", "--output",
          str(tmp_path / "never")], ["'dlo-test/unknown' not found", str(hub_cache.hub), "HF_HUB_OFFLINE"]),
    ]:
        proc = run_dlo(*argv, **_offline(hub_cache))
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        assert proc.stderr.startswith(f"dlo {argv[0]}: error: model ")
        for part in expected:
            assert part in proc.stderr, proc.stderr
    assert not (tmp_path / "never").exists()


@pytest.mark.slow
def test_the_recipe_trains_a_hub_model(hub_cache, tmp_path):
    repo = hub_cache.repo
    env = {**os.environ, **_offline(hub_cache), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "TENSORBOARD_LOGGING_DIR": None}
    env = {name: value for name, value in env.items() if value is not None}
    out = tmp_path / "sft"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "sft.py"), "--config", str(ROOT / "recipes/configs/tiny.yaml"),
         f"model.path={repo}", f"output_dir={out}", "training.max_steps=2", "data.max_train_samples=8",
         "data.max_eval_samples=8", "data.max_length=64", "calibration_samples=8",
         "training.per_device_train_batch_size=4", "training.save_steps=100"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "final" / "config.json").is_file()
