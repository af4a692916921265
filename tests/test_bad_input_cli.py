"""User mistakes on the ``dlo expand|report|export|generate`` command line and in mergekit YAML.

Every row is one mistake: the command must exit with code 2, name what was wrong on stderr (the
option, file or value), print no traceback and leave its output directory as it was (absent, or
unchanged when it existed). The commands run in-process (fast); two rows also run in a fresh process.
"""

import json
import os
import shutil
from pathlib import Path

import pytest

from dlo.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "assets" / "tiny" / "base"  # 6 layers, 512 positions, a tokenizer with a chat template
EVAL = ROOT / "assets" / "tiny" / "sft" / "eval.jsonl"


def variant(path: Path, replace: dict[str, bytes | None] | None = None, config: dict | None = None) -> Path:
    """A model directory of links to the tiny default's files, with ``replace``d files (``None`` drops one)
    and ``config`` entries merged into its config.json."""
    replace = dict(replace or {})
    if config is not None:
        replace["config.json"] = json.dumps({**json.loads((TINY / "config.json").read_text()), **config}).encode()
    path.mkdir()
    for file in sorted(TINY.iterdir()):
        if file.name not in replace:
            (path / file.name).symlink_to(file)
    for name, content in replace.items():
        if content is not None:
            (path / name).write_bytes(content)
    return path


MERGEKIT = {
    "empty": "",
    "bad-yaml": "slices: [\n  - sources: {",
    "slerp": "merge_method: slerp\nslices:\n - sources: [{model: M, layer_range: [0, 4]}]\n",
    "no-method": "slices:\n - sources: [{model: M, layer_range: [0, 4]}]\n",
    "no-slices": "merge_method: passthrough\n",
    "no-range": "merge_method: passthrough\nslices:\n - sources: [{model: M}]\n",
    "two-models": "merge_method: passthrough\nslices:\n - sources: [{model: M, layer_range: [0, 4]}]\n"
                  " - sources: [{model: other/model, layer_range: [2, 6]}]\n",
    "two-sources": "merge_method: passthrough\nslices:\n - sources: [{model: M, layer_range: [0, 4]},"
                   " {model: M, layer_range: [2, 6]}]\n",
    "parameters": "merge_method: passthrough\nslices:\n - sources: [{model: M, layer_range: [0, 4],"
                  " parameters: {scale: 0.0}}]\n",
    "out-of-range": "merge_method: passthrough\nslices:\n - sources: [{model: M, layer_range: [0, 40]}]\n",
    "range-string": "merge_method: passthrough\nslices:\n - sources: [{model: M, layer_range: '0-4'}]\n",
    "int8": "merge_method: passthrough\ndtype: int8\nslices:\n - sources: [{model: M, layer_range: [0, 4]}]\n",
    "models-key": "merge_method: passthrough\nmodels: [{model: M}]\nslices:\n"
                  " - sources: [{model: M, layer_range: [0, 4]}]\n",
    "unknown-model": "merge_method: passthrough\nslices:\n"
                     " - sources: [{model: dlo-test/nowhere, layer_range: [0, 4]}]\n",
    "good": "merge_method: passthrough\nslices:\n - sources: [{model: M, layer_range: [0, 4]}]\n"
            " - sources: [{model: M, layer_range: [2, 6]}]\n",
}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Models, data, mergekit files and existing outputs the rows refer to as {name}."""
    root = tmp_path_factory.mktemp("bad_input")
    safetensors = (TINY / "model.safetensors").read_bytes()
    variant(root / "base")
    variant(root / "routed", config={"dlo_routing": {"routed_layers": [3], "capacities": [0.5]}})
    variant(root / "expanded", config={"dlo_expansion": {"strategy": "dus", "layers": []}})
    variant(root / "gpt2", config={"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    variant(root / "garbage_config", {"config.json": b"{\"model_type\": \"llama\", oops"})
    variant(root / "no_config", {"config.json": None})
    variant(root / "truncated", {"model.safetensors": safetensors[:-4096]})
    variant(root / "no_weights", {"model.safetensors": None})
    variant(root / "no_tokenizer", {"tokenizer.json": None, "tokenizer_config.json": None})
    variant(root / "bad_tokenizer", {"tokenizer.json": b"not a tokenizer"})
    variant(root / "no_chat", {"chat_template.jinja": None})
    (root / "adapter").mkdir()
    (root / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "dlo-test/gone"}))
    (root / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    shutil.copy(EVAL, root / "data.jsonl")
    (root / "bad.jsonl").write_text(EVAL.read_text().splitlines()[0] + "\nnot json\n")
    (root / "data_dir").mkdir()
    (root / "old_report").mkdir()
    (root / "old_report" / "capacity.png").write_text("the previous model's plot")
    (root / "a_file").write_text("not a directory")
    (root / "mk").mkdir()
    for name, text in MERGEKIT.items():
        (root / "mk" / f"{name}.yml").write_text(text.replace(" M,", f" {root / 'base'},"))
    return root


def state(path: Path):
    """What is at ``path``: None, a file's bytes, or a directory's {relative name: bytes}."""
    if not os.path.lexists(path):
        return None
    if path.is_file():
        return path.read_bytes()
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else None for p in sorted(path.rglob("*"))}


def row(argv: str, *expected: str, output: str | None = None, id: str):
    return pytest.param(argv, expected, output, id=id)


EXPAND = "expand --model {base} --output {out}/x"
MK = "expand --model {base} --output {out}/x --mergekit {mk}/"
REPORT = "report --model {base} --data {data} --output {out}/r"
EXPORT = "export --model {routed} --output {out}/e"
GENERATE = "generate --model {base} --prompt To_be"

ROWS = [
    # expand: strategies and their parameters
    row(EXPAND + " --strategy deep", "--strategy 'deep'", "llama-pro, dus, idus, slices", id="expand-unknown-strategy"),
    row(EXPAND, "--strategy is required", id="expand-no-strategy"),
    row(EXPAND + " --strategy llama-pro", "--strategy llama-pro needs --groups G", id="expand-llama-pro-no-groups"),
    row(EXPAND + " --strategy llama-pro --groups 4", "groups=4", "[1, 2, 3, 6]", id="expand-groups-not-divisor"),
    row(EXPAND + " --strategy llama-pro --groups 0", "groups=0", id="expand-groups-zero"),
    row(EXPAND + " --strategy llama-pro --groups two", "--groups", "invalid int value: 'two'", id="expand-groups-text"),
    row(EXPAND + " --strategy dus --overlap 3", "overlap=3", "num_layers/2 = 3", id="expand-overlap-too-big"),
    row(EXPAND + " --strategy dus --overlap -1", "overlap=-1", id="expand-overlap-negative"),
    row(EXPAND + " --strategy dus --overlap 1 --groups 2", "--groups does not apply to dus", id="expand-extra-option"),
    row(EXPAND + " --strategy idus --overlap 1", "needs --group-size g", id="expand-idus-no-group-size"),
    row(EXPAND + " --strategy idus --overlap 1 --group-size 0", "group_size=0", "[1, 5]", id="expand-group-size-0"),
    row(EXPAND + " --strategy slices --slices 0-4,2-9", "slice 2-9", "6-layer", id="expand-slice-out-of-range"),
    row(EXPAND + " --strategy slices --slices 3-1", "slice 3-1", "empty or reversed", id="expand-slice-reversed"),
    row(EXPAND + " --strategy slices --slices 0-4,x", "START-STOP", "got 'x'", id="expand-slice-garbage"),
    row(EXPAND + " --strategy dus --overlap 1 --init ones", "--init='ones'", "copy, zero, merge-linear, slerp",
        id="expand-unknown-init"),
    row(EXPAND + " --strategy llama-pro --groups 6 --init slerp", "init='slerp'", "base layer 0 has none",
        id="expand-slerp-on-layer-0"),
    # expand: the model
    row("expand --output {out}/x --strategy dus --overlap 1", "--model is required", id="expand-no-model"),
    row("expand --model {ws}/a/b/c --output {out}/x --strategy dus --overlap 1", "no local directory",
        "/a/b/c", "not a hub id", id="expand-model-missing-path"),
    row("expand --model dlo-test/nowhere --output {out}/x --strategy dus --overlap 1",
        "'dlo-test/nowhere' not found", "models--dlo-test--nowhere", "HF_HUB_OFFLINE is set",
        id="expand-unknown-hub-id"),
    row("expand --model {a_file} --output {out}/x --strategy dus --overlap 1", "is a file, not a model directory",
        id="expand-model-is-a-file"),
    row("expand --model {garbage_config} --output {out}/x --strategy dus --overlap 1",
        "garbage_config/config.json: not valid JSON (line 1", id="expand-garbage-config"),
    row("expand --model {no_config} --output {out}/x --strategy dus --overlap 1", "no_config/config.json: missing",
        id="expand-no-config"),
    row("expand --model {truncated} --output {out}/x --strategy dus --overlap 1",
        "truncated/model.safetensors: truncated safetensors file", id="expand-truncated-weights"),
    row("expand --model {no_weights} --output {out}/x --strategy dus --overlap 1",
        "no model.safetensors or model.safetensors.index.json", id="expand-no-weights"),
    row("expand --model {gpt2} --output {out}/x --strategy dus --overlap 1", "model_type='gpt2'",
        "llama, mistral, qwen2", id="expand-unsupported-architecture"),
    row("expand --model {routed} --output {out}/x --strategy dus --overlap 1", "already has routers",
        id="expand-routed-model"),
    row("expand --model {expanded} --output {out}/x --strategy dus --overlap 1", "already expanded",
        id="expand-expanded-model"),
    # expand: the output
    row("expand --model {base} --output {old_report} --strategy dus --overlap 1", "old_report' exists and is not empty",
        "--force", output="old_report", id="expand-output-not-empty"),
    row("expand --model {base} --output {a_file} --strategy dus --overlap 1", "a_file' exists and is not a directory",
        output="a_file", id="expand-output-is-a-file"),
    row("expand --model {base} --output {ws} --force --strategy dus --overlap 1", "holds the input",
        "choose another output", output="base", id="expand-output-holds-the-model"),
    # mergekit YAML
    row(MK + "missing.yml", "missing.yml' does not exist", id="mergekit-missing-file"),
    row(MK + "empty.yml", "empty.yml: expected a YAML mapping, got NoneType", id="mergekit-empty-file"),
    row(MK + "bad-yaml.yml", "bad-yaml.yml: not valid YAML at line", id="mergekit-bad-yaml"),
    row(MK + "slerp.yml", "slerp.yml: merge_method='slerp'", "only 'passthrough'", id="mergekit-merge-method"),
    row(MK + "no-method.yml", "merge_method=None", id="mergekit-no-merge-method"),
    row(MK + "no-slices.yml", "no-slices.yml: no 'slices' list", id="mergekit-no-slices"),
    row(MK + "no-range.yml", "slice 0: a source needs 'model' and 'layer_range'", id="mergekit-no-layer-range"),
    row(MK + "two-models.yml", "names 2 models", "other/model", id="mergekit-several-models"),
    row(MK + "two-sources.yml", "slice 0: passthrough takes exactly one source per slice, got 2",
        id="mergekit-several-sources"),
    row(MK + "parameters.yml", "slice 0: keys ['parameters'] are not supported", "init 'zero'",
        id="mergekit-per-slice-parameters"),
    row(MK + "out-of-range.yml", "slice 0-40: out of range for a 6-layer model", id="mergekit-layer-range-too-big"),
    row(MK + "range-string.yml", "layer_range='0-4'", "[start, stop]", id="mergekit-layer-range-string"),
    row(MK + "int8.yml", "dtype='int8'", "float32, float16, bfloat16", id="mergekit-dtype"),
    row(MK + "models-key.yml", "keys ['models'] are not supported", id="mergekit-unknown-key"),
    row(MK + "good.yml --strategy dus", "--mergekit", "cannot be combined with --strategy dus",
        id="mergekit-with-strategy"),
    row(MK + "good.yml --groups 2", "--groups does not apply to --mergekit", id="mergekit-with-groups"),
    row("expand --output {out}/x --mergekit {mk}/unknown-model.yml", "'dlo-test/nowhere' not found",
        id="mergekit-names-an-unknown-model"),
    # report
    row(REPORT + " --max-samples 0", "--max-samples=0: must be >= 1", id="report-max-samples-0"),
    row(REPORT + " --max-samples -3", "--max-samples=-3: must be >= 1", id="report-max-samples-negative"),
    row(REPORT + " --batch-size 0", "--batch-size=0: must be >= 1", id="report-batch-size-0"),
    row(REPORT + " --repeats 0", "--repeats=0: must be >= 1", id="report-repeats-0"),
    row(REPORT + " --warmup -1", "--warmup=-1: must be >= 0", id="report-warmup-negative"),
    row(REPORT + " --examples -1", "--examples=-1: must be >= 0", id="report-examples-negative"),
    row(REPORT + " --max-length 0", "--max-length=0: must be >= 1", id="report-max-length-0"),
    row(REPORT + " --max-length 100000", "--max-length=100000", "max_position_embeddings=512",
        id="report-max-length-past-positions"),
    row(REPORT + " --max-samples many", "--max-samples", "invalid int value: 'many'", id="report-max-samples-text"),
    row("report --model {base} --data {ws}/missing.jsonl --output {out}/r", "missing.jsonl' does not exist",
        id="report-missing-data"),
    row("report --model {base} --data {data_dir} --output {out}/r", "data_dir' is a directory",
        id="report-data-is-a-directory"),
    row("report --model {base} --data {bad} --output {out}/r", "bad.jsonl:2", id="report-bad-jsonl"),
    row("report --model {base} --data {data} --output {old_report}", "old_report' exists and is not empty",
        "--force", output="old_report", id="report-into-an-old-report"),
    row(REPORT + " --device cuda:99", "--device 'cuda:99'", "CUDA device", id="report-no-such-cuda-device"),
    row(REPORT + " --device banana", "--device 'banana': not a torch device", id="report-bad-device"),
    row(REPORT + " --dtype int8", "--dtype", "invalid choice: 'int8'", id="report-bad-dtype"),
    row("report --model {truncated} --data {data} --output {out}/r", "truncated/model.safetensors",
        id="report-truncated-weights"),
    row("report --model {garbage_config} --data {data} --output {out}/r", "garbage_config/config.json",
        id="report-garbage-config"),
    row("report --model {bad_tokenizer} --data {data} --output {out}/r", "bad_tokenizer",
        "the tokenizer files do not load", id="report-broken-tokenizer"),
    # export
    row(EXPORT + " --min-capacity 0", "--min-capacity=0.0: must be in (0, 1]", id="export-min-capacity-0"),
    row(EXPORT + " --min-capacity 1.5", "--min-capacity=1.5: must be in (0, 1]", id="export-min-capacity-above-1"),
    row(EXPORT + " --min-capacity nan", "--min-capacity=nan", id="export-min-capacity-nan"),
    row(EXPORT + " --num-layers 0", "--num-layers=0: must be >= 1", id="export-num-layers-0"),
    row(EXPORT + " --num-layers 99", "--num-layers=99", "has 6 layers; valid: 1..6", id="export-num-layers-too-many"),
    row(EXPORT, "one of the arguments --min-capacity --num-layers is required", id="export-no-rule"),
    row(EXPORT + " --min-capacity 0.5 --num-layers 3", "not allowed with argument", id="export-two-rules"),
    row("export --model {base} --output {out}/e --min-capacity 0.5", "has no routers", "--num-layers",
        id="export-min-capacity-without-routers"),
    row("export --model {base} --output {out}/e --num-layers 3", "--num-layers=3 would drop unrouted layers",
        "add --data FILE", id="export-unrouted-layers-without-data"),
    row(EXPORT + " --num-layers 3 --data {ws}/missing.jsonl", "missing.jsonl' does not exist",
        id="export-missing-data"),
    row(EXPORT + " --num-layers 3 --data {data} --max-samples 0", "--max-samples=0: must be >= 1",
        id="export-max-samples-0"),
    row("export --model {routed} --output {old_report} --num-layers 3", "old_report' exists and is not empty",
        output="old_report", id="export-output-not-empty"),
    row("export --model {adapter} --output {out}/e --num-layers 3", "LoRA adapter whose base model cannot be found",
        "'dlo-test/gone'", id="export-adapter-without-base"),
    # generate
    row(GENERATE + " --max-new-tokens 0", "--max-new-tokens=0: must be >= 1", id="generate-max-new-tokens-0"),
    row(GENERATE + " --max-new-tokens 1000000", "--max-new-tokens=1000000", "max_position_embeddings=512",
        id="generate-past-the-positions"),
    row(GENERATE + " --max-new-tokens 511", "--max-new-tokens=511", "the prompt takes", "new tokens fit",
        id="generate-prompt-plus-new-past-the-positions"),
    row(GENERATE + " --temperature -1", "--temperature=-1.0: must be a number >= 0", id="generate-temperature"),
    row(GENERATE + " --temperature nan", "--temperature=nan", id="generate-temperature-nan"),
    row("generate --model {no_chat} --prompt hi --chat", "--chat", "has no chat template", id="generate-no-template"),
    row("generate --model {no_tokenizer} --prompt hi", "no tokenizer saved with the model",
        id="generate-no-tokenizer"),
    row("generate --model {garbage_config} --prompt hi", "garbage_config/config.json: not valid JSON",
        id="generate-garbage-config"),
    row("generate --model {base} --prompt hi --revision", "--revision", "expected one argument",
        id="generate-revision-without-value"),
    row("generate --model {base}", "the following arguments are required: --prompt", id="generate-no-prompt"),
]


def fill(template: str, ws: Path, out: Path) -> list[str]:
    names = {p.name.removesuffix(".jsonl"): str(p) for p in ws.iterdir()}
    argv = template.format(ws=ws, out=out, **names).split()
    return [a.replace("To_be", "To be, or not to be") for a in argv]


@pytest.mark.parametrize("template, expected, output", ROWS)
def test_bad_input(ws, tmp_path, offline_hub, monkeypatch, capsys, template, expected, output):
    monkeypatch.delenv("DLO_DEBUG", raising=False)
    out = tmp_path / "out"
    watched = ws / output if output else out
    before, listing = state(watched), sorted(os.listdir(ws))
    try:
        rc = main(fill(template, ws, out))
    except SystemExit as stop:  # argparse's own refusals (unknown option value, missing argument)
        rc = stop.code
    err = capsys.readouterr().err
    assert rc == 2, err
    for part in expected:
        assert part in err, err
    assert "Traceback" not in err
    assert state(watched) == before
    assert sorted(os.listdir(ws)) == listing  # no hidden temporary directory left next to an output
    assert not out.exists()


def test_enough_distinct_mistakes():
    assert len({p.id for p in ROWS}) == len(ROWS) >= 35


def test_no_traceback_in_a_fresh_process(ws, run_dlo):
    """A fresh process prints one line and exits with code 2; with --debug it keeps the traceback."""
    argv = ["report", "--model", ws / "truncated", "--data", ws / "data.jsonl", "--output", ws / "r"]
    proc = run_dlo(*argv, DLO_DEBUG=None)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dlo report: error: ") and "model.safetensors" in lines[0]
    proc = run_dlo("--debug", *argv, DLO_DEBUG=None)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "UserError" in proc.stderr
    assert not (ws / "r").exists()


def test_debug_keeps_the_traceback_in_process(ws, monkeypatch):
    argv = ["generate", "--model", str(ws / "base"), "--prompt", "hi", "--max-new-tokens", "0"]
    monkeypatch.delenv("DLO_DEBUG", raising=False)
    for flags in (["--debug", *argv], [*argv, "--debug"]):
        with pytest.raises(ValueError, match=r"--max-new-tokens=0"):
            main(flags)
    monkeypatch.setenv("DLO_DEBUG", "1")
    with pytest.raises(ValueError, match=r"--max-new-tokens=0"):
        main(argv)
