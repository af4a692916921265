"""Bad input to recipes/sft.py: every mistake is one message naming the key, file, line or value, exit code 2,
no traceback, and an output_dir that is absent or as it was (restartable).

Most rows fail while the inputs are checked, before any model loads, by calling the recipe's ``main`` in this
process; a few go through a real ``python`` / ``accelerate launch`` subprocess.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dlo.errors import run_entry_point

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "recipes" / "configs" / "tiny.yaml"
# Small enough that the rows which reach the data read little of it.
BASE = ["data.max_length=64", "data.max_train_samples=16", "data.max_eval_samples=8", "calibration_samples=8",
        "training.per_device_train_batch_size=4", "training.disable_tqdm=true"]


def chat(*, answer="Hamlet", user="Who speaks?"):
    return json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]})


def train_file(name):
    return f"data.train_file={{tmp}}/{name}"


@pytest.fixture(scope="module")
def sft():
    spec = importlib.util.spec_from_file_location("sft_recipe", ROOT / "recipes" / "sft.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def in_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the bundled config names its files relative to the repository
    # The recipe sets TENSORBOARD_LOGGING_DIR for its run; setting it first makes monkeypatch remove it afterwards.
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", "")
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR")
    monkeypatch.delenv("DLO_DEBUG", raising=False)


def run_main(sft, capsys, *args):
    code = run_entry_point(lambda: sft.main([str(a) for a in args]), "sft.py")
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def snapshot(path: Path):
    """What a path holds (names and modification times), or None when it does not exist."""
    if not path.exists():
        return None
    if path.is_file():
        return path.stat().st_mtime_ns
    return sorted((str(p.relative_to(path)), p.stat().st_mtime_ns) for p in path.rglob("*"))


# -- prepared output directories --------------------------------------------------------------------------------


def record_run(sft, out: Path, *overrides):
    """An output_dir as a run leaves it: its recorded config (the rows' BASE settings plus ``overrides``)."""
    sft.record_run_config(sft.load_recipe_config(str(CONFIG), [f"output_dir={out}", *BASE, *overrides]))


def fake_checkpoint(out: Path, step: int, complete: bool = True):
    folder = out / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"\0" * 16)
    if complete:
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))


def prepare_files(tmp: Path, sft, kind: str) -> Path:
    out = tmp / "out"
    if kind == "file":
        out.write_text("not a directory")
    elif kind == "other files":
        out.mkdir()
        (out / "notes.txt").write_text("another project")
    elif kind == "checkpointed run":
        record_run(sft, out)
        fake_checkpoint(out, 2)
    elif kind == "finished run":
        record_run(sft, out)
        (out / "final").mkdir()
        fake_checkpoint(out, 2, complete=False)
    elif kind == "unreadable run config":
        out.mkdir()
        (out / "recipe_config.yaml").write_text("model: [unclosed\n")
        fake_checkpoint(out, 2)
    return out


DATA_FILES = {
    "not_json.json": "this is not JSON\n",
    "object.json": json.dumps({"messages": []}),
    "bad_line.jsonl": chat() + "\n" + chat() + "\n{'messages': oops}\n",
    "columns.jsonl": json.dumps({"text": "to be or not to be"}) + "\n",
    "mixed.jsonl": chat() + "\n" + json.dumps({"prompt": "a", "completion": "b"}) + "\n",
    "empty_answer.jsonl": chat() + "\n" + chat(answer="") + "\n",
    "null_answer.jsonl": chat(answer=None) + "\n",
    "blank_answer.jsonl": chat() + "\n" + chat() + "\n" + chat(answer="   ") + "\n",
    "image.jsonl": chat(user=[{"type": "image", "url": "x.png"}]) + "\n",
    "no_reply.jsonl": json.dumps({"messages": [{"role": "user", "content": "hello"}]}) + "\n",
    "bad_role.jsonl": json.dumps({"messages": [{"role": "bot", "content": "hi"}]}) + "\n",
    "not_object.jsonl": chat() + "\n[1, 2]\n",
    "empty_completion.jsonl": json.dumps({"prompt": "Who speaks?", "completion": ""}) + "\n",
    "number_prompt.jsonl": json.dumps({"prompt": 7, "completion": "Hamlet"}) + "\n",
    "empty.jsonl": "\n\n",
    "long.jsonl": chat(user="words " * 200) + "\n",
    "data.csv": "messages\n",
}

# (overrides, what the message must name, prepared output_dir); "{tmp}" is the test's directory.
ROWS = [
    # typed config: the dotted key, the value and the valid range
    (["routing.capacity=abc"], ["routing.capacity='abc': expected a number in (0, 1]"], None),
    (["routing.capacity=true"], ["routing.capacity=True: expected a number in (0, 1]"], None),
    (["routing.capacity=1.5"], ["routing.capacity=1.5: must be in (0, 1]"], None),
    (["routing.capacity=[0.5, 0]"], ["routing.capacity[1]=0: must be in (0, 1]"], None),
    (["routing.layers=3"], ["routing.layers=3: expected one of 'new', 'all' or a list of layer indices"], None),
    (["routing.layers=[3, 3]"], ["routing.layers=[3, 3]: lists an item twice"], None),
    (["routing.similarity_every=0.5"], ["routing.similarity_every=0.5: expected an integer >= 1"], None),
    (["routing.label=dot"], ["routing.label='dot': expected one of 'self', 'cos', 'cos-global'"], None),
    (["routing.capacty=0.3"], ["unknown config key 'routing.capacty'; did you mean 'capacity'?"], None),
    (["routing=0.5"], ["routing=0.5: expected a section"], None),
    (["data.max_length=abc"], ["data.max_length='abc': expected an integer >= 8"], None),
    (["data.max_length=4"], ["data.max_length=4: must be >= 8"], None),
    (["data.max_train_samples=0"], ["data.max_train_samples=0: must be >= 1"], None),
    (["data.packing=2"], ["data.packing=2: expected true or false"], None),
    (["model.dtype=fp8"], ["model.dtype='fp8': expected one of 'float32', 'bfloat16', 'float16'"], None),
    (["model.expansion={groups: 2}"], ["model.expansion={'groups': 2}: needs a 'strategy'"], None),
    (["model.pth=x"], ["unknown config key 'model.pth'; did you mean 'path'?"], None),
    (["model.expansion.group=2"], ["model.expansion: ", "unexpected keyword argument 'group'"], None),
    (["lora.r=0"], ["lora.r=0: must be >= 1"], None),
    (["lora.target_modules=q_proj"], ["lora.target_modules='q_proj': expected a non-empty list"], None),
    (["seed=-1"], ["seed=-1: must be in [0, 4294967295]"], None),
    (["calibration_samples=1.5"], ["calibration_samples=1.5: expected an integer >= 0"], None),
    (["outptu_dir=x"], ["unknown config key 'outptu_dir'; did you mean 'output_dir'?"], None),
    (["noequals"], ["override 'noequals': expected key=value"], None),
    (["routing.layers=[1,"], ["override 'routing.layers=[1,': the value is not valid YAML"], None),
    (["resume=maybe"], ["resume='maybe': expected true or false"], None),
    # TrainingArguments: known keys, their types, and its own errors named by the key
    (["training.max_step=3"], ["unknown config key 'training.max_step'; did you mean 'max_steps'?"], None),
    (["training.learning_rate=abc"], ["training.learning_rate='abc': expected a number >= 0"], None),
    (["training.eval_strategy=sometimes"], ["training.eval_strategy='sometimes': expected one of 'no'"], None),
    (["training.bf16=1"], ["training.bf16=1: expected true or false"], None),
    (["training.max_steps=0"], ["training.max_steps=0: must be >= 1 or -1"], None),
    (["training.seed=1"], ["training.seed is set by the recipe; use the top-level 'seed'"], None),
    (["training.load_best_model_at_end=true"],
     ["training.load_best_model_at_end=True: --load_best_model_at_end requires the save and eval strategy"], None),
    # data files: the file, the line (or record) and what is wrong with it
    ([train_file("missing.jsonl")], ["data file", "missing.jsonl' does not exist"], None),
    ([train_file("not_json.json")], ["not_json.json:1: not valid JSON (Expecting value at column 1)"], None),
    ([train_file("object.json")], ["object.json: expected a JSON array of records, found an object"], None),
    ([train_file("bad_line.jsonl")], ["bad_line.jsonl:3: not valid JSON"], None),
    ([train_file("columns.jsonl")], ["columns.jsonl:1: records need a 'messages' column", "['text']"], None),
    ([train_file("mixed.jsonl")], ["mixed.jsonl:2: the record lacks ['messages']"], None),
    ([train_file("empty_answer.jsonl")], ["empty_answer.jsonl:2: messages[1] is an assistant turn with empty"],
     None),
    ([train_file("null_answer.jsonl")], ["null_answer.jsonl:1: messages[1] is an assistant turn with empty"], None),
    ([train_file("blank_answer.jsonl")], ["blank_answer.jsonl:3: messages[1] is an assistant turn with empty"],
     None),
    ([train_file("image.jsonl")], ["image.jsonl:1: messages[0].content is a list: only text content"], None),
    ([train_file("no_reply.jsonl")], ["no_reply.jsonl:1: no trainable tokens: the conversation has no assistant"],
     None),
    ([train_file("bad_role.jsonl")], ["bad_role.jsonl:1: messages[0]: role 'bot' is not one of"], None),
    ([train_file("not_object.jsonl")], ["not_object.jsonl:2: expected a JSON object (one record), found a list"],
     None),
    ([train_file("empty_completion.jsonl")], ["empty_completion.jsonl:1: the completion is empty"], None),
    ([train_file("number_prompt.jsonl")], ["number_prompt.jsonl:1: prompt is a number: only text"], None),
    ([train_file("empty.jsonl")], ["empty.jsonl': no records found"], None),
    ([train_file("long.jsonl")], ["long.jsonl: all 1 examples are dropped", "data.max_length=64"], None),
    ([train_file("data.csv")], ["data.csv': unsupported data format"], None),
    (["data.eval_file={tmp}/bad_line.jsonl"], ["bad_line.jsonl:3: not valid JSON"], None),
    # output_dir and resume: refused without touching what is there
    ([], ["output_dir", "is a file, not a directory"], "file"),
    ([], ["already holds other files"], "other files"),
    (["resume=true"], ["resume=true but", "holds no dlo run to resume"], "other files"),
    ([], ["already holds a dlo run (checkpoint-2); pass resume=true"], "checkpointed run"),
    (["resume=true"], ["resume=true but", "holds no dlo run to resume"], None),
    (["resume=true", "routing.capacity=0.25", "routing.label=cos"],
     ["settings differ", "routing.capacity: 0.5 -> 0.25", "routing.label: 'cos-global' -> 'cos'"],
     "checkpointed run"),
    (["resume=true", "training.learning_rate=0.01", "data.max_length=96"],
     ["training.learning_rate: 0.001 -> 0.01", "data.max_length: 64 -> 96"], "checkpointed run"),
    (["resume=true"], ["holds a finished run (final/) and no complete checkpoint"], "finished run"),
    (["resume=true"], ["recipe_config.yaml: the run's recorded config cannot be read"], "unreadable run config"),
]


@pytest.mark.parametrize("overrides, expected, prepared", ROWS,
                         ids=[" ".join(r[0]) + (f" [{r[2]}]" if r[2] else "") or str(r[2]) for r in ROWS])
def test_bad_input_is_one_message_and_leaves_output_dir_alone(sft, in_root, capsys, tmp_path, overrides, expected,
                                                              prepared):
    for name, text in DATA_FILES.items():
        (tmp_path / name).write_text(text)
    out = prepare_files(tmp_path, sft, prepared) if prepared else tmp_path / "out"
    before = snapshot(out)
    code, output = run_main(sft, capsys, "--config", CONFIG, f"output_dir={out}", *BASE,
                            *(o.replace("{tmp}", str(tmp_path)) for o in overrides))
    assert code == 2, output
    assert output.count("sft.py: error:") == 1, output
    for text in expected:
        assert text in output, output
    assert "Traceback" not in output
    assert snapshot(out) == before  # absent stays absent, a prepared directory is untouched


def test_config_file_errors(sft, in_root, capsys, tmp_path):
    (tmp_path / "broken.yaml").write_text("model:\n  path: [unclosed\n")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    for config, expected in [(tmp_path / "absent.yaml", "absent.yaml' does not exist"),
                             (tmp_path / "broken.yaml", "broken.yaml: not valid YAML (line 3"),
                             (tmp_path / "list.yaml", "list.yaml: a recipe config must be a YAML mapping")]:
        code, output = run_main(sft, capsys, "--config", config)
        assert code == 2 and expected in output and "Traceback" not in output, output


def test_debug_keeps_the_traceback(sft, in_root, monkeypatch, tmp_path):
    monkeypatch.setenv("DLO_DEBUG", "1")
    with pytest.raises(ValueError, match=r"routing.capacity='abc'"):
        run_entry_point(lambda: sft.main(["--config", str(CONFIG), f"output_dir={tmp_path / 'o'}",
                                          "routing.capacity=abc"]), "sft.py")


# -- output directories a rerun or resume accepts -------------------------------------------------------------


def test_a_run_that_saved_no_checkpoint_is_restartable(sft, in_root, tmp_path):
    out = tmp_path / "out"
    record_run(sft, out)  # it failed after recording its config
    (out / "tb").mkdir()
    fake_checkpoint(out, 1, complete=False)  # and was killed while saving its first checkpoint
    cfg = sft.load_recipe_config(str(CONFIG), [f"output_dir={out}", *BASE, "routing.capacity=0.25"])
    assert sft.check_output_dir(cfg, resume=False) is None  # a rerun starts over, with any settings
    assert sft.check_output_dir(cfg, resume=True) is None  # so does resume=true: there is nothing to continue


def test_resume_takes_the_newest_complete_checkpoint(sft, in_root, tmp_path):
    out = tmp_path / "out"
    record_run(sft, out)
    fake_checkpoint(out, 1)
    fake_checkpoint(out, 10)
    fake_checkpoint(out, 2, complete=False)  # killed while saving
    fake_checkpoint(out, 12)
    (out / "checkpoint-12" / "trainer_state.json").write_text('{"global_st')  # cut off while writing the state
    cfg = sft.load_recipe_config(str(CONFIG), [f"output_dir={out}", *BASE, "training.max_steps=400",
                                               "training.save_steps=7", "data.max_eval_samples=4"])
    assert sft.check_output_dir(cfg, resume=True) == str(out / "checkpoint-10")  # step order, not name order


# -- end to end: data counts in summary.json, resuming past a checkpoint cut off while saving ----------------


def test_summary_counts_data_and_resume_skips_a_cut_off_checkpoint(sft, in_root, capsys, tmp_path):
    lines = [chat(), chat(user="words " * 80), chat(answer="long answer " * 40)] * 4
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    args = ["--config", CONFIG, f"output_dir={out}", *BASE, f"data.train_file={tmp_path / 'train.jsonl'}",
            "training.max_steps=2", "training.save_steps=1", "training.logging_steps=1", "routing.anneal_steps=2"]
    code, output = run_main(sft, capsys, *args)
    assert code == 0, output
    summary = json.loads((out / "final" / "summary.json").read_text())
    assert summary["data"]["train"] == {"records": 12, "examples": 8, "truncated": 4, "dropped_too_long": 4,
                                        "packed_blocks": None}
    assert summary["data"]["eval"]["records"] == 8
    assert "12 records -> 8 examples, 4 dropped (no answer token within max_length=64), 4 truncated" in output

    # Killed while saving checkpoint-2: its trainer state never got written, and no final model.
    (out / "checkpoint-2" / "trainer_state.json").unlink()
    for path in (out / "final").iterdir():
        path.unlink()
    (out / "final").rmdir()
    code, output = run_main(sft, capsys, *args, "resume=true")
    assert code == 0, output
    assert "skipping checkpoint-2: saving was cut off" in output
    assert json.loads((out / "final" / "summary.json").read_text())["steps"] == 2


# -- through real launchers: one message, exit code --------------------------------------------------------------


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", ACCELERATE_USE_CPU="1")
    env.pop("DLO_DEBUG", None)
    return env


LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
          "--dynamo_backend", "no"]


@pytest.mark.parametrize("launch, quiet", [
    (["-q", "--num_processes", "1"], True),
    (["--multi_gpu", "--num_processes", "2", "--main_process_port", "29541"], False),
], ids=["one-process-quiet", "two-processes"])
def test_launched_recipe_reports_once(tmp_path, launch, quiet):
    out = tmp_path / "out"
    proc = subprocess.run([*LAUNCH, *launch, str(ROOT / "recipes" / "sft.py"), "--config", str(CONFIG),
                           f"output_dir={out}", "routing.capacity=abc"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]  # the launcher's code for a failed process
    assert proc.stderr.count("sft.py: error: routing.capacity='abc'") == 1, proc.stderr[-3000:]
    assert 'sft.py", line' not in proc.stderr  # no frame of the recipe; two processes add the launcher's report
    if quiet:
        assert "Traceback" not in proc.stderr
    assert not out.exists()
