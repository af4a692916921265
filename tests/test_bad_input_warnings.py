"""Legal but suspicious input: the work goes on, and one warning on stderr names what looks wrong.

Every row runs one call through ``run_entry_point`` (as the ``dlo`` commands and recipes run) and asserts exit code
0, the warning printed exactly once as ``<prog>: warning: ...`` naming the input, and what is on disk afterwards:
the output written whole. The warnings are ``DloWarning``s, so a library user sees (and filters) them as Python
warnings; the last test checks that path.
"""

import json
import shutil
import warnings
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

import dlo
from dlo.cli import main as dlo_main
from dlo.data import build_sft_dataset, overlap_warning
from dlo.errors import DloWarning, run_entry_point

TINY = Path(__file__).resolve().parents[1] / "assets" / "tiny" / "base"  # 6 layers


def chat(user: str, answer: str = "Hamlet.") -> str:
    return json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]})


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("warnings")
    (root / "no_tokenizer").mkdir()
    for file in TINY.iterdir():
        if not file.name.startswith("tokenizer"):
            (root / "no_tokenizer" / file.name).symlink_to(file)
    shutil.copytree(TINY, root / "other_copy")
    (root / "other.yml").write_text("merge_method: passthrough\nslices:\n"
                                    f" - sources: [{{model: {root / 'other_copy'}, layer_range: [0, 6]}}]\n"
                                    f" - sources: [{{model: {root / 'other_copy'}, layer_range: [4, 6]}}]\n")
    (root / "long.jsonl").write_text("\n".join([chat("Who?", "long answer " * 40), chat("Why?", "because " * 60),
                                                chat("Where?"), chat("Who is he?")]) + "\n")
    (root / "repeats.jsonl").write_text("\n".join([chat("Who?"), chat("Why?"), chat("Who?"), chat("Why?")]) + "\n")
    (root / "eval.jsonl").write_text("\n".join([chat("Where?"), chat("Why?")]) + "\n")
    return root


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TINY)


@pytest.fixture(scope="module")
def routed():
    return dlo.attach_routers(AutoModelForCausalLM.from_pretrained(TINY), dlo.RoutingConfig(layers=[2, 3]))


def cli(argv: str):
    return lambda ws, tok, model: dlo_main(argv.format(ws=ws, tiny=TINY).split())


def layers_of(path: Path) -> int:
    return json.loads((path / "config.json").read_text())["num_hidden_layers"]


def row(call, prog, named, written=None, *, id):
    """``written(ws, model)``: asserts what the call left (the output complete, the model changed as asked)."""
    return pytest.param(call, prog, named, written, id=id)


ROWS = [
    row(cli("expand --model {tiny} --output {ws}/out/pruned --strategy slices --slices 0-4"), "dlo expand",
        ["slices plan for a 6-layer model", "4 layers, fewer than the base", "base layers [4, 5] are left out"],
        lambda ws, m: layers_of(ws / "out" / "pruned") == 4, id="expand-leaves-base-layers-out"),
    row(cli("expand --model {ws}/no_tokenizer --output {ws}/out/untokenized --strategy dus --overlap 1"),
        "dlo expand", ["no_tokenizer has no tokenizer", "so none is copied"],
        lambda ws, m: layers_of(ws / "out" / "untokenized") == 10
        and not (ws / "out" / "untokenized" / "tokenizer.json").exists(), id="expand-model-without-tokenizer"),
    row(cli("expand --model {tiny} --output {ws}/out/mk --mergekit {ws}/other.yml"), "dlo expand",
        ["other.yml names model", "other_copy", f"but --model '{TINY}' is given"],
        lambda ws, m: layers_of(ws / "out" / "mk") == 8, id="mergekit-names-another-model"),
    row(lambda ws, tok, model: dlo.set_capacity(model, 0.01), "api", ["capacity 0.01 for layer(s) [2, 3]",
                                                                     "about 1 token in 100"],
        lambda ws, m: all(abs(layer.target_capacity - 0.01) < 1e-6 for layer in dlo.routed_layers(m)),
        id="set-capacity-almost-nothing"),
    row(lambda ws, tok, model: dlo.RoutingConfig(capacity=[0.5, 0.02]), "api", ["capacity 0.02", "below 0.05"],
        id="routing-config-capacity-almost-nothing"),
    row(lambda ws, tok, model: build_sft_dataset(tok, str(ws / "long.jsonl"), 64), "sft.py",
        ["long.jsonl: 2 of 4 examples (50%) are truncated at data.max_length=64"], id="data-many-truncated"),
    row(lambda ws, tok, model: build_sft_dataset(tok, str(ws / "repeats.jsonl"), 64), "sft.py",
        ["repeats.jsonl: 2 of 4 records repeat an earlier one", "repeats.jsonl:3 repeats", "repeats.jsonl:1"],
        id="data-duplicate-records"),
    row(lambda ws, tok, model: overlap_warning(str(ws / "repeats.jsonl"), str(ws / "eval.jsonl")), "sft.py",
        ["eval.jsonl: 1 eval records are also in the training file", "repeats.jsonl", "eval.jsonl:2"],
        id="eval-overlaps-train"),
]


@pytest.mark.parametrize("call, prog, named, written", ROWS)
def test_suspicious_input_warns_once_and_goes_on(ws, tokenizer, routed, capsys, call, prog, named, written):
    code = run_entry_point(lambda: call(ws, tokenizer, routed) and None, prog)
    err = capsys.readouterr().err
    assert code == 0, err
    assert err.count(f"{prog}: warning:") == 1, err
    warning = next(line for line in err.splitlines() if line.startswith(f"{prog}: warning:"))
    for text in named:
        assert text in warning, warning
    assert "Traceback" not in err and "DloWarning" not in err  # one line, no source location
    if written is not None:
        assert written(ws, routed)


def test_sound_input_warns_nothing(ws, tokenizer, capsys, tmp_path):
    code = dlo_main(["expand", "--model", str(TINY), "--output", str(tmp_path / "x"), "--strategy", "dus",
                     "--overlap", "1"])
    build_sft_dataset(tokenizer, str(ws / "eval.jsonl"), 64)
    assert code == 0
    assert "warning" not in capsys.readouterr().err


def test_library_users_get_python_warnings(tokenizer, ws):
    with pytest.warns(DloWarning, match=r"repeats.jsonl: 2 of 4 records repeat"):
        build_sft_dataset(tokenizer, str(ws / "repeats.jsonl"), 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DloWarning)  # what a user who wants them fatal does
        with pytest.raises(DloWarning, match="below 0.05"):
            dlo.RoutingConfig(capacity=0.01)
