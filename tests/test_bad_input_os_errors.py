"""What the system refuses, and checkpoints that lost a part, in the user's own words.

Every row is one refusal: exit code 2, one line ``<prog>: error: ...`` naming the path the user gave (never
the hidden ``.NAME.tmp-*`` directory dlo writes into), no traceback, and nothing left on disk: no output, no
temporary directory, no parent directory made for it. The disk-full, read-only and permission rows make the
write fail where it happens (this suite runs as root, which permission bits do not stop); the file-size row
is a real limit (``ulimit -f``) on a real process.
"""

import errno
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import dlo
import dlo.checkpoints
import dlo.expansion_io
from dlo.cli import main as dlo_main
from dlo.errors import UserError, run_entry_point

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "assets" / "tiny" / "base"
EXPAND = "expand --model {tiny} --output {out} --strategy dus --overlap 1"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A routed checkpoint whose config.json lost its 'dlo_routing' section, and one whose config.json was
    replaced by the base model's."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("checkpoints")
    model = dlo.attach_routers(AutoModelForCausalLM.from_pretrained(TINY), dlo.RoutingConfig(layers=[2, 3]))
    model.save_pretrained(root / "routed")
    shutil.copytree(root / "routed", root / "lost_section")
    config = json.loads((root / "routed" / "config.json").read_text())
    del config["dlo_routing"]
    (root / "lost_section" / "config.json").write_text(json.dumps(config))
    shutil.copytree(root / "routed", root / "base_config")
    shutil.copy(TINY / "config.json", root / "base_config" / "config.json")
    for folder in ("lost_section", "base_config"):
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(TINY / name, root / folder / name)
    return root


def fail_with(target: str, error: int, file_in_tmp: str | None):
    """A replacement for ``target`` (module.function) that raises the OSError ``error``, naming ``file_in_tmp``
    inside the temporary directory it was given (None: no file, as a write() reports a full disk)."""
    def failing(model_dir, folder, *args, **kwargs):
        name = None if file_in_tmp is None else os.path.join(folder, file_in_tmp)
        raise OSError(error, os.strerror(error), name)
    return target, failing


def row(argv: str, *expected: str, patch=None, out: str = "{tmp}/runs/out", id: str):
    return pytest.param(argv, expected, patch, out, id=id)


ROWS = [
    row(EXPAND, "output '/proc/dlo-out' is under /proc", "choose a directory on disk", out="/proc/dlo-out",
        id="output-under-proc"),
    row(EXPAND, "output '/sys/dlo/out' is under /sys", out="/sys/dlo/out", id="output-under-sys"),
    row("export --model {tiny} --output {out} --num-layers 6", "is under /proc", out="/proc/self/dlo-export",
        id="export-under-proc"),
    row(EXPAND, "output '{out}': writing tokenizer.json failed: No space left on device", "the disk is full",
        patch=fail_with("_copy_side_files", errno.ENOSPC, "tokenizer.json"), id="disk-full-names-the-output-file"),
    row(EXPAND, "output '{out}': writing it failed: No space left on device",
        patch=fail_with("_copy_side_files", errno.ENOSPC, None), id="disk-full-without-a-file-name"),
    row(EXPAND, "output '{out}': writing config.json failed: Read-only file system", "write elsewhere",
        patch=fail_with("_copy_side_files", errno.EROFS, "config.json"), id="read-only-file-system"),
    row(EXPAND, "output '{out}': writing it failed: Permission denied", "no permission",
        patch=("hidden", errno.EACCES), id="no-permission-to-make-the-directory"),
]


@pytest.mark.parametrize("argv, expected, patch, out", ROWS)
def test_write_failure_names_the_output_and_leaves_nothing(tmp_path, capsys, monkeypatch, argv, expected, patch,
                                                           out):
    out = out.format(tmp=tmp_path)
    if patch is not None and patch[0] == "hidden":
        def refuse(output, kind):
            hidden = os.path.join(os.path.dirname(output), f".{os.path.basename(output)}.{kind}-0000")
            raise PermissionError(patch[1], os.strerror(patch[1]), hidden)
        monkeypatch.setattr(dlo.checkpoints, "_hidden_sibling", refuse)
    elif patch is not None:
        monkeypatch.setattr(dlo.expansion_io, *patch)
    monkeypatch.delenv("DLO_DEBUG", raising=False)
    code = dlo_main(argv.format(tiny=TINY, out=out).split())
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("error:") == 1 and "Traceback" not in err, err
    for text in expected:
        assert text.format(out=out) in err, err
    assert ".tmp-" not in err  # the hidden temporary directory is dlo's business, not the user's
    assert not os.path.lexists(out)
    assert list(tmp_path.iterdir()) == []  # no parent made for it, no temporary directory left


def test_a_real_file_size_limit(tmp_path):
    """A fresh process under ``ulimit -f``: safetensors' own I/O error is named by the output, nothing is left."""
    out = tmp_path / "runs" / "big"
    limit = 64 * 1024  # bytes; the tiny model's weights are larger

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("DLO_DEBUG", None)
    proc = subprocess.run([sys.executable, "-c", "import sys; from dlo.cli import main; sys.exit(main())",
                           *EXPAND.format(tiny=TINY, out=out).split()], cwd=ROOT, env=env, preexec_fn=limited,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"dlo expand: error: output '{out}': writing it failed: File too large" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and ".tmp-" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_an_os_error_elsewhere_is_one_line_naming_its_path(capsys):
    code = run_entry_point(lambda: open("/proc/dlo-nowhere/x", "w"), "dlo")
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == ("dlo: error: /proc/dlo-nowhere/x: No such file or directory (/proc is the kernel's "
                           "virtual file system; write to a directory on disk)")


@pytest.mark.parametrize("folder", ["lost_section", "base_config"])
def test_router_weights_without_their_routing_config_are_named(checkpoints, capsys, tmp_path, folder):
    model = checkpoints / folder
    before = sorted(p.name for p in model.iterdir())
    message = f"{model / 'config.json'}: no 'dlo_routing' section, but the weights hold routers for layers [2, 3]"
    for argv in (["generate", "--model", str(model), "--prompt", "To_be"],
                 ["report", "--model", str(model), "--data", str(ROOT / "assets" / "tiny" / "sft" / "eval.jsonl"),
                  "--output", str(tmp_path / "r")]):
        assert dlo_main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "lost its routing config" in err, err
        assert "trust_remote_code" not in err and "Traceback" not in err
    with pytest.raises(UserError, match="lost its routing config"):
        dlo.load_model(str(model))
    assert sorted(p.name for p in model.iterdir()) == before and not (tmp_path / "r").exists()
