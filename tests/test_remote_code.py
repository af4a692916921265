"""A routed checkpoint carries its own modeling code: it loads and generates with transformers and torch only,
and a load that would drop its routers is refused."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import dlo

PROMPT = [[5, 17, 33, 2, 64, 12, 9], [0, 0, 41, 8, 70, 3, 22]]
MASK = [[1] * 7, [0, 0, 1, 1, 1, 1, 1]]
NEW_TOKENS = 8

# Runs in a fresh interpreter whose imports of dlo and dlo_kernels fail, as on a machine without dlo.
WITHOUT_DLO = textwrap.dedent("""
    import importlib.abc, json, sys

    class HideDlo(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("dlo", "dlo_kernels"):
                raise ImportError(f"No module named {name!r} (hidden)")
            return None

    sys.meta_path.insert(0, HideDlo())
    import torch
    from transformers import AutoModelForCausalLM

    path, prompt, mask, steps, result = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), \
        int(sys.argv[4]), sys.argv[5]
    try:
        AutoModelForCausalLM.from_pretrained(path)
        refused = None
    except Exception as err:  # what a user sees without trust_remote_code
        refused = str(err)
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    ids, attention = torch.tensor(prompt), torch.tensor(mask)
    out = model.generate(ids, attention_mask=attention, max_new_tokens=steps, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        logits = model(ids, attention_mask=attention, use_cache=False).logits
    with open(result, "w") as fh:
        json.dump({"tokens": out.tolist(), "logits": logits[attention.bool()].tolist(), "refused": refused,
                   "class": type(model).__name__, "dlo_imported": any(m.split(".")[0] == "dlo" for m in sys.modules),
                   "routed": sum(type(l).__name__.startswith("Routed") for l in model.model.layers)}, fh)
""")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, request):
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = dlo.attach_routers(LlamaForCausalLM(config), dlo.RoutingConfig(layers=[0, 2, 3], capacity=0.5))
    for layer in dlo.routed_layers(model):
        torch.nn.init.normal_(layer.router.weight, std=1.0)
    dlo.calibrate(model, [{"input_ids": torch.randint(3, 97, (4, 32))}], progress=False)
    model.generation_config.eos_token_id = None
    path = tmp_path_factory.mktemp("routed")
    model.save_pretrained(path)
    return path


def _without_dlo(path, tmp_path):
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
    result = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, "-c", WITHOUT_DLO, str(path), json.dumps(PROMPT), json.dumps(MASK),
                           str(NEW_TOKENS), str(result)], capture_output=True, text=True, timeout=300, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(result.read_text())


@pytest.mark.slow
def test_loads_and_generates_without_dlo_exactly_as_under_dlo(saved, tmp_path):
    got = _without_dlo(saved, tmp_path)
    assert not got["dlo_imported"] and got["class"] == "DloLlamaForCausalLM" and got["routed"] == 3
    model = dlo.load_model(str(saved)).eval()
    ids, mask = torch.tensor(PROMPT), torch.tensor(MASK)
    want = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    assert got["tokens"] == want.tolist()
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=False, output_router_logits=True)
    torch.testing.assert_close(torch.tensor(got["logits"]), out.logits[mask.bool()], atol=1e-5, rtol=0)
    shares = [float(r.selected[r.valid].float().mean()) for r in out.routing]
    assert all(0.1 < s < 0.9 for s in shares), shares  # tokens really skip
    # Without trust_remote_code the load stops and says what to do, instead of dropping the routers.
    assert got["refused"] is not None and "trust_remote_code" in got["refused"]


def test_plain_load_never_drops_the_routers_and_remote_load_under_dlo_uses_dlos_classes(saved):
    # Refused, asking for trust_remote_code; or, once this process has loaded the checkpoint's code (transformers
    # then keeps its classes registered), the routed model itself. Never the stock model without its routers.
    try:
        plain = AutoModelForCausalLM.from_pretrained(saved)
    except ValueError as err:
        assert "trust_remote_code" in str(err)
    else:
        assert isinstance(plain, dlo.modeling.DloRoutedMixin) and len(dlo.routed_layers(plain)) == 3
    model = AutoModelForCausalLM.from_pretrained(saved, trust_remote_code=True)
    assert isinstance(model, dlo.modeling.DloRoutedMixin) and len(dlo.routed_layers(model)) == 3
    assert json.loads((saved / "config.json").read_text())["model_type"] == "dlo_llama"


def test_a_remote_loaded_model_saves_and_exports_like_a_dlo_loaded_one(saved, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(saved, trust_remote_code=True)
    model.save_pretrained(tmp_path / "again")
    again = dlo.load_model(str(tmp_path / "again"))
    exported = dlo.export_static(again, num_layers=3)
    exported.save_pretrained(tmp_path / "export")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "export")  # no custom code
    assert type(plain) is LlamaForCausalLM and plain.config.model_type == "llama"
