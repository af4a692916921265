"""Wrong arguments to the public Python API: refused at the door, naming the argument, the value and what is valid.

Every row is one mistake: the call must raise the named exception type (a ``TypeError`` for a value of the wrong
kind, a ``ValueError`` for one out of range), its message must name the argument and the value, and the model
the call was given must come out unchanged (no router attached, no capacity or layer changed), with nothing
written next to it.
"""

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import dlo
from dlo.errors import UserError
from dlo.trainer import CapacityImageCallback, RoutingLogCallback, routing_console_line

TINY = Path(__file__).resolve().parents[1] / "assets" / "tiny" / "base"  # 6 layers


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TINY)


@pytest.fixture(scope="module")
def models():
    base = AutoModelForCausalLM.from_pretrained(TINY).eval()
    routed = dlo.attach_routers(AutoModelForCausalLM.from_pretrained(TINY), dlo.RoutingConfig(layers=[2, 3])).eval()
    return {"base": base, "routed": routed}


def fingerprint(model) -> tuple:
    """What a refused call must leave as it was: the class, every tensor and the routing buffers."""
    return (type(model).__name__, len(dlo.routed_layers(model)) if hasattr(model, "get_decoder") else None,
            tuple((name, float(t.double().sum())) for name, t in model.state_dict().items()))


PLAN = dlo.ExpansionPlan.dus(6, 1)


def row(call, error, *named, id):
    return pytest.param(call, error, named, id=id)


ROWS = [
    # ExpansionPlan constructors
    row(lambda m, t: dlo.ExpansionPlan.slices(5), TypeError, "ranges=5", "(start, stop) pairs", id="slices-an-int"),
    row(lambda m, t: dlo.ExpansionPlan.slices([1, 2, 3]), TypeError, "ranges=[1, 2, 3]", "slice 1",
        id="slices-a-list-of-ints"),
    row(lambda m, t: dlo.ExpansionPlan.slices([(0, 4, 6)]), ValueError, "slice (0, 4, 6)", "pair of integers",
        id="slices-a-triple"),
    row(lambda m, t: dlo.ExpansionPlan.from_mergekit(None), TypeError, "path_or_yaml_text=None", "file path",
        id="mergekit-none"),
    row(lambda m, t: dlo.ExpansionPlan.llama_pro("6", 2), ValueError, "num_layers='6'", "positive integer",
        id="llama-pro-num-layers-text"),
    row(lambda m, t: dlo.ExpansionPlan.dus(6, 1, init=None), ValueError, "init=None", "copy, zero",
        id="dus-init-none"),
    row(lambda m, t: dlo.ExpansionPlan.dus(6, 1, shared="yes"), ValueError, "shared='yes'", id="dus-shared-text"),
    # RoutingConfig
    row(lambda m, t: dlo.RoutingConfig(capacity=1.5), ValueError, "capacity=1.5", "(0, 1]", id="config-capacity-1.5"),
    row(lambda m, t: dlo.RoutingConfig(capacity="half"), TypeError, "capacity='half'", "a number in (0, 1]",
        id="config-capacity-text"),
    row(lambda m, t: dlo.RoutingConfig(layers=3), TypeError, "layers=3", "list of layer indices",
        id="config-layers-int"),
    row(lambda m, t: dlo.RoutingConfig(beta=True), TypeError, "beta=True", "a number >= 0", id="config-beta-bool"),
    row(lambda m, t: dlo.RoutingConfig.from_dict([("capacity", 0.5)]), TypeError, "data=[('capacity', 0.5)]",
        "mapping", id="config-from-a-list"),
    # attach_routers, expand_model
    row(lambda m, t: dlo.attach_routers(m["base"], {"capacity": 0.5}), TypeError, "config={'capacity': 0.5}",
        "dlo.RoutingConfig(**d)", id="attach-a-dict"),
    row(lambda m, t: dlo.attach_routers(str(TINY)), TypeError, f"model='{TINY}'", "*ForCausalLM",
        id="attach-a-path"),
    row(lambda m, t: dlo.attach_routers(m["base"], dlo.RoutingConfig(layers=[9])), ValueError, "layers=[9]",
        "[0, 5]", id="attach-layer-out-of-range"),
    row(lambda m, t: dlo.expand_model(m["base"], PLAN.to_dict()), TypeError, "plan={'strategy': 'dus'",
        "dlo.ExpansionPlan", id="expand-a-dict"),
    row(lambda m, t: dlo.expand_model(None, PLAN), TypeError, "model=None", id="expand-none"),
    row(lambda m, t: dlo.expand_model(m["base"], dlo.ExpansionPlan.dus(8, 1)), ValueError, "8-layer", "has 6",
        id="expand-plan-for-another-depth"),
    # set_capacity, forced_routing
    row(lambda m, t: dlo.set_capacity(m["routed"], 0), ValueError, "capacity=0", "(0, 1]", id="set-capacity-0"),
    row(lambda m, t: dlo.set_capacity(m["routed"], "0.5"), TypeError, "capacity='0.5'", id="set-capacity-text"),
    row(lambda m, t: dlo.set_capacity(m["routed"], float("nan")), ValueError, "capacity=nan",
        id="set-capacity-nan"),
    row(lambda m, t: dlo.set_capacity(m["routed"], [0.5, 0.5, 0.5]), ValueError, "3 values for 2 routed layers",
        id="set-capacity-too-many"),
    row(lambda m, t: dlo.set_capacity(m["base"], 0.5), ValueError, "no routed layers", "attach_routers",
        id="set-capacity-without-routers"),
    row(lambda m, t: dlo.forced_routing(m["routed"], "run", layers=3).__enter__(), TypeError, "layers=3",
        "list", id="forced-layers-int"),
    row(lambda m, t: dlo.forced_routing(m["routed"], "sometimes").__enter__(), ValueError, "mode='sometimes'",
        id="forced-unknown-mode"),
    # calibrate
    row(lambda m, t: dlo.calibrate(m["routed"], "to be or not to be", tokenizer=t, progress=False), TypeError,
        "data='to be or not to be'", "[text]", id="calibrate-one-string"),
    row(lambda m, t: dlo.calibrate(m["routed"], [1, 2, 3], tokenizer=t, progress=False), TypeError, "data[0]=1",
        id="calibrate-ints"),
    row(lambda m, t: dlo.calibrate(m["routed"], ["to be", "  "], tokenizer=t, progress=False), ValueError,
        "data[1]='  '", "blank", id="calibrate-blank-text"),
    row(lambda m, t: dlo.calibrate(m["routed"], [], tokenizer=t, progress=False), ValueError, "data=[]",
        id="calibrate-nothing"),
    row(lambda m, t: dlo.calibrate(m["routed"], ["to be", {"input_ids": torch.ones(1, 3, dtype=torch.long)}],
                                   tokenizer=t, progress=False), TypeError, "data[1]=", "like data[0]",
        id="calibrate-texts-and-batches"),
    row(lambda m, t: dlo.calibrate(m["routed"], [{"ids": [1]}], progress=False), TypeError,
        "data[0]['input_ids']=None", "tensor", id="calibrate-batch-without-input-ids"),
    row(lambda m, t: dlo.calibrate(m["routed"], ["to be"], tokenizer="gpt2", progress=False), TypeError,
        "tokenizer='gpt2'", id="calibrate-tokenizer-name"),
    row(lambda m, t: dlo.calibrate(m["routed"], ["to be"], tokenizer=t, max_length=0, progress=False), ValueError,
        "max_length=0", ">= 1", id="calibrate-max-length-0"),
    row(lambda m, t: dlo.calibrate(m["routed"], ["to be"], tokenizer=t, batch_size=2.5, progress=False),
        ValueError, "batch_size=2.5", "integer", id="calibrate-batch-size-fraction"),
    row(lambda m, t: dlo.calibrate(m["base"], ["to be"], tokenizer=t, progress=False), ValueError,
        "no routed layers", id="calibrate-without-routers"),
    # export_static
    row(lambda m, t: dlo.export_static(m["routed"], min_capacity="0.3"), TypeError, "min_capacity='0.3'",
        "(0, 1]", id="export-min-capacity-text"),
    row(lambda m, t: dlo.export_static(m["routed"], min_capacity=1.5), ValueError, "min_capacity=1.5", "(0, 1]",
        id="export-min-capacity-1.5"),
    row(lambda m, t: dlo.export_static(m["routed"], num_layers=2.5), ValueError, "num_layers=2.5", "integer",
        id="export-num-layers-fraction"),
    row(lambda m, t: dlo.export_static(m["routed"], num_layers=True), TypeError, "num_layers=True",
        id="export-num-layers-bool"),
    row(lambda m, t: dlo.export_static(m["routed"], min_capacity=0.3, capacities=[0.1, 0.2]), TypeError,
        "capacities=[0.1, 0.2]", "mapping", id="export-capacities-list"),
    row(lambda m, t: dlo.export_static(m["routed"], min_capacity=0.3, capacities={2: 3.0}), ValueError,
        "capacities[2]=3.0", "[0, 1]", id="export-capacity-above-1"),
    row(lambda m, t: dlo.export_static(m["routed"], num_layers=3, similarity="abc"), TypeError,
        "similarity='abc'", "list", id="export-similarity-text"),
    row(lambda m, t: dlo.export_static(m["routed"], num_layers=6, keep_shared="no"), TypeError,
        "keep_shared='no'", id="export-keep-shared-text"),
    row(lambda m, t: dlo.export_static(m["routed"]), ValueError, "exactly one of min_capacity and num_layers",
        id="export-no-rule"),
    # load_model: checked before anything is resolved or read
    row(lambda m, t: dlo.load_model(None), TypeError, "path=None", id="load-none"),
    row(lambda m, t: dlo.load_model(str(TINY), capacity=2), ValueError, "capacity=2", "(0, 1]",
        id="load-capacity-2"),
    row(lambda m, t: dlo.load_model("dlo-test/nowhere", capacity="low"), TypeError, "capacity='low'",
        id="load-capacity-text-before-resolving"),
    row(lambda m, t: dlo.load_model(str(TINY), revision=3), TypeError, "revision=3", id="load-revision-int"),
    row(lambda m, t: dlo.load_model(str(TINY)), UserError, "no 'dlo_routing'", "AutoModelForCausalLM",
        id="load-a-plain-model"),
    # router_loss, trainer helpers
    row(lambda m, t: dlo.router_loss([1, 2], dlo.RoutingConfig()), TypeError, "records[0]=1", "RouterRecord",
        id="router-loss-ints"),
    row(lambda m, t: dlo.router_loss("records", dlo.RoutingConfig()), TypeError, "records='records'",
        id="router-loss-text"),
    row(lambda m, t: dlo.add_routing_callback(None), TypeError, "trainer=None", "Trainer", id="callback-no-trainer"),
    row(lambda m, t: RoutingLogCallback(print_line="no"), TypeError, "print_line='no'", id="callback-print-text"),
    row(lambda m, t: CapacityImageCallback("tb", every=0), ValueError, "every=0", ">= 1", id="image-every-0"),
    row(lambda m, t: routing_console_line({"loss": 1.0}), ValueError, "no 'router_loss'", id="console-line-plain-log"),
    row(lambda m, t: dlo.trainer.routing_log_entries(m["base"]), ValueError, "has no routers",
        id="log-entries-without-routers"),
]


@pytest.mark.parametrize("call, error, named", ROWS)
def test_bad_argument_is_refused_by_name_and_changes_nothing(models, tokenizer, tmp_path, monkeypatch, call, error,
                                                             named):
    monkeypatch.chdir(tmp_path)  # anything a refused call wrote would land here
    before = {name: fingerprint(model) for name, model in models.items()}
    with pytest.raises(error) as caught:
        call(models, tokenizer)
    message = str(caught.value)
    for text in named:
        assert text in message, message
    assert "\n" not in message  # one line, as the entry points print it
    assert {name: fingerprint(model) for name, model in models.items()} == before
    assert os.listdir(tmp_path) == []


def test_wrong_kind_errors_are_user_errors_too():
    """A TypeError from the checks is also a UserError: an entry point shows it as one line, exit code 2."""
    with pytest.raises(UserError):
        dlo.RoutingConfig(capacity="half")
    with pytest.raises(TypeError):
        dlo.RoutingConfig(capacity="half")
