"""Model cards: the ``README.md`` the Hugging Face Hub shows for a model, written for dlo's outputs.

``write_model_card(directory)`` describes an expanded (``dlo expand``), routed (the SFT recipe's
``final/``) or exported (``dlo export``) checkpoint from the files in ``directory`` alone:
``config.json`` (``dlo_expansion``, ``dlo_routing``, ``dlo_export``), ``summary.json`` (the recipe's
training and eval figures) and ``export.json`` (the export's record). The card opens with YAML front
matter in the Hub's model-card format, then one section per thing those files record: the layer map,
parameter counts, per-layer routing, eval figures, the export's kept and dropped layers, how to load
the model, license and attribution.

License, datasets and the Hub id of the base model come from the base model's own card (its
``README.md``) when it has one, so a chain expand -> train -> export keeps the license of the model
it started from, and the attribution section of a card dlo wrote is carried over as it is. Without a
card naming a license the front matter says ``license: other`` and the card says why.
``base_model`` goes into the front matter only as a Hub id (``org/name``, or read from the Hub
cache's ``models--org--name/snapshots/...`` layout): the Hub refuses local paths there.
"""

from __future__ import annotations

import json
import os
import re

import yaml

CARD_FILE = "README.md"
DISTRIBUTION = "dynamic-layer-operation"  # the name `pip install` takes; the import name is `dlo`
ATTRIBUTION_HEADING = "## License and attribution"
# Saved next to the weights of routed checkpoints that run without dlo (dlo/remote_code.py).
SELF_CONTAINED_CODE = "dlo_modeling.py"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_CACHE_SNAPSHOT = re.compile(r"(?:^|/)models--([^/]+)/snapshots/[^/]+/?$")
# Readable names of the summary.json entries the SFT recipe writes; other scalar entries show as they are.
SUMMARY_LABELS = {"steps": "optimizer steps", "train_seconds": "training time (s)",
                  "train_task_loss": "train task loss (last logged)", "eval_loss": "eval loss",
                  "eval_perplexity": "eval perplexity"}


def write_model_card(directory: str, *, base_model: str | None = None, extra: dict | None = None,
                     location: str | None = None) -> str | None:
    """Write ``directory/README.md`` and return its path; ``None`` for a peft adapter directory, whose card
    peft's ``save_pretrained`` writes.

    ``base_model``: the directory or Hub id this model was made from (default: an export's source, from
    ``export.json``); its card supplies license, datasets and attribution. ``extra``: facts the files do
    not hold (e.g. ``{"training data": "assets/tiny/sft/train.jsonl"}``), listed under "Details". ``location``:
    the path the loading example names (default: ``directory``), for a card written into a directory that is
    renamed to its final path once complete.
    """
    if os.path.isfile(os.path.join(directory, "adapter_config.json")):
        return None
    files = _read_files(directory)
    if base_model is None and files["export"]:
        base_model = files["export"].get("source")
    base = _describe_base(base_model)
    config = files["config"]
    sections = [_title(config), _overview(config, base)]
    if config.get("dlo_expansion") or config.get("dlo_export"):
        sections.append(_layer_section(config))
    sections.append(_parameter_section(config))
    if config.get("dlo_routing"):
        sections.append(_routing_section(config, files["summary"]))
    if files["summary"]:
        sections.append(_summary_section(files["summary"]))
    if config.get("dlo_export"):
        sections.append(_export_section(config["dlo_export"], files["export"]))
    if extra:
        sections.append("## Details\n\n" + _table(["", "value"], [[key, value] for key, value in extra.items()]))
    sections.append(_loading_section(config, directory, location or directory))
    sections.append(_attribution_section(base))
    text = "---\n" + front_matter(_metadata(config, base)) + "---\n\n" + "\n\n".join(sections) + "\n"
    path = os.path.join(directory, CARD_FILE)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    return path


def front_matter(metadata: dict) -> str:
    """The YAML between a card's ``---`` lines (keys in the given order)."""
    return yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True, width=1000)


def read_card(path: str) -> tuple[dict, str]:
    """(front matter, body) of a model card; ``({}, "")`` when there is no card."""
    if not os.path.isfile(path):
        return {}, ""
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    match = re.match(r"^---\n(.*?)\n---\n?(.*)$", text, re.S)
    if match is None:
        return {}, text
    metadata = yaml.safe_load(match.group(1))
    return (metadata if isinstance(metadata, dict) else {}), match.group(2)


def hub_id(ref: str | None) -> str | None:
    """The Hub id ``ref`` names: ``org/name`` itself, or the repository of a Hub-cache snapshot directory."""
    if not ref:
        return None
    cached = HUB_CACHE_SNAPSHOT.search(os.path.abspath(ref).replace(os.sep, "/")) if os.path.isdir(ref) else None
    if cached:
        return cached.group(1).replace("--", "/")
    return ref if not os.path.exists(ref) and HUB_ID.match(ref) else None


# -- reading ---------------------------------------------------------------------------------------------------


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _read_files(directory: str) -> dict:
    config = _read_json(os.path.join(directory, "config.json"))
    if not config:
        raise FileNotFoundError(f"{directory}: no config.json, so no model to describe")
    return {"config": config, "summary": _read_json(os.path.join(directory, "summary.json")),
            "export": _read_json(os.path.join(directory, "export.json"))}


def _describe_base(ref: str | None) -> dict:
    """What the card says about the base model: its reference, Hub id, license, datasets and attribution."""
    base = {"ref": ref, "hub_id": hub_id(ref), "license": None, "license_name": None, "license_link": None,
            "datasets": None, "attribution": None}
    card, config_file = _base_files(ref)
    metadata, body = read_card(card) if card else ({}, "")
    config = _read_json(config_file) if config_file else {}
    base["license"] = metadata.get("license") or config.get("license")
    for key in ("license_name", "license_link", "datasets"):
        base[key] = metadata.get(key)
    # A local base made by dlo from a Hub model: the Hub model is the one to name.
    base["hub_id"] = base["hub_id"] or metadata.get("base_model")
    if ATTRIBUTION_HEADING in body:
        section = body.split(ATTRIBUTION_HEADING, 1)[1]
        base["attribution"] = re.split(r"\n## ", section, maxsplit=1)[0].strip()
    return base


def _base_files(ref: str | None) -> tuple[str | None, str | None]:
    """(model card, config.json) of the base model: in its directory, or in the Hub cache for a Hub id."""
    if ref and os.path.isdir(ref):
        return os.path.join(ref, CARD_FILE), os.path.join(ref, "config.json")
    if not hub_id(ref):
        return None, None
    from huggingface_hub import try_to_load_from_cache

    found = [try_to_load_from_cache(ref, name) for name in (CARD_FILE, "config.json")]
    return tuple(path if isinstance(path, str) else None for path in found)


def _kind(config: dict) -> str:
    if config.get("dlo_export"):
        return "export"
    if config.get("dlo_routing"):
        return "routed"
    if config.get("dlo_expansion"):
        return "expanded"
    return "plain"


def _architecture(config: dict) -> str:
    """The stock transformers class (for a routed model, the class under dlo's routed one)."""
    dlo_class = config.get("dlo_routing") or config.get("dlo_repetitions")
    return dlo_class["base_architecture"] if dlo_class else config["architectures"][0]


def _stock_config(config: dict):
    """The stock config object of a saved ``config.json``: a routed checkpoint names its own model type (so a
    plain load asks for its remote code), which only the stock config class of its base architecture reads."""
    import transformers

    stock = getattr(transformers, _architecture(config))
    return stock.config_class.from_dict({k: v for k, v in config.items() if k not in ("model_type", "auto_map")})


# -- front matter ----------------------------------------------------------------------------------------------


def _metadata(config: dict, base: dict) -> dict:
    tags = ["dlo", _stock_config(config).model_type]
    if config.get("dlo_expansion"):
        tags += ["layer-expansion", *filter(None, [config["dlo_expansion"].get("strategy")])]
    if config.get("dlo_routing"):
        tags += ["dynamic-depth", "token-routing"]
    if config.get("dlo_export"):
        tags += ["layer-pruning"]
    metadata = {"library_name": "transformers", "pipeline_tag": "text-generation"}
    if base["hub_id"]:
        metadata["base_model"] = base["hub_id"]
    metadata["tags"] = list(dict.fromkeys(tags))
    metadata["license"] = base["license"] or "other"
    for key in ("license_name", "license_link", "datasets"):
        if base[key]:
            metadata[key] = base[key]
    return metadata


# -- sections --------------------------------------------------------------------------------------------------


def _title(config: dict) -> str:
    n, arch = config["num_hidden_layers"], _architecture(config)
    routing, export = config.get("dlo_routing"), config.get("dlo_export")
    if export:
        return f"# dlo export: {n} of {export['source_num_layers']} layers, a plain {arch}"
    if routing:
        return f"# dlo routed model: {arch}, {n} layers, {len(routing['routed_layers'])} routed"
    if config.get("dlo_expansion"):
        return f"# dlo expanded model: {arch}, {config['dlo_expansion']['base_num_layers']} -> {n} layers"
    return f"# {arch}, {n} layers, trained with dlo"


def _overview(config: dict, base: dict) -> str:
    what = {
        "expanded": "its depth expanded by duplicating decoder layers (`dlo expand`)",
        "routed": "per-token routers on some decoder layers, trained with the model: each routed layer runs "
                  "only the tokens its router picks and passes the others through unchanged",
        "export": "the rarely run routed layers dropped and the routers removed (`dlo export`): a static, "
                  "smaller dense model",
        "plain": "fine-tuned with dlo's SFT recipe, without routers",
    }[_kind(config)]
    origin = f"`{base['ref']}`" if base["ref"] else "its base model"
    if base["hub_id"] and base["hub_id"] != base["ref"]:
        origin += f" (from {_hub_links(base['hub_id'])} on the Hub)"
    text = f"Made with [dlo](https://pypi.org/project/{DISTRIBUTION}/) (Dynamic Layer Operation) from {origin}: {what}."
    if base["ref"] and not base["hub_id"]:
        text += (" The base model is a local directory, so the front matter names no `base_model` (the Hub takes "
                 "Hub ids only); add it once the base model is on the Hub.")
    return text


def _layer_section(config: dict) -> str:
    """The layer map: each layer's base-model layer and init (expansion), its source layer (export), routing."""
    expansion = config.get("dlo_expansion") or {}
    export = config.get("dlo_export")
    routed = set((config.get("dlo_routing") or {}).get("routed_layers", []))
    reuses = {e["layer"]: e["reuses"] for e in (config.get("dlo_repetitions") or {}).get("layers", [])}
    entries = expansion.get("layers", [])
    lines = ["## Layers"]
    if expansion.get("strategy"):
        params = ", ".join(f"{k}={_cell(v)}" for k, v in expansion.get("params", {}).items()) or "none"
        lines.append(f"Expansion: strategy `{expansion['strategy']}` ({params}), "
                     f"{expansion['base_num_layers']} -> {len(entries)} layers. A *new* layer duplicates a base "
                     "layer that already occurs earlier in the map."
                     + (" A shared one reuses that layer's weights (stored once), with residual scales of its own."
                        if reuses else ""))
    usage = export.get("usage", {}) if export else {}
    header = ["layer", *(["source layer", "source capacity"] if export else []),
              *(["base layer", "init", "new"] if entries else []), *(["routed"] if routed else [])]
    rows = []
    for i, source in enumerate(export["kept"] if export else range(config["num_hidden_layers"])):
        row = [i, *([source, f"{usage[str(source)]:.3f}" if str(source) in usage else "unrouted"] if export else [])]
        if entries:
            entry = entries[source]
            new = f"yes, shares layer {reuses[i]}" if i in reuses else "yes" if entry["new"] else "no"
            row += [entry["source"], entry["init"], new]
        rows.append(row + (["yes" if i in routed else "no"] if routed else []))
    lines.append(_table(header, rows))
    return "\n\n".join(lines)


def _parameter_section(config: dict) -> str:
    counts = parameter_counts(config)
    rows = [["this model", f"{counts['model']:,}"]]
    if counts["routers"]:
        rows.append(["of which routers", f"{counts['routers']:,}"])
    if counts["base"] != counts["model"] - counts["routers"]:
        rows.append([f"base model ({counts['base_layers']} layers)", f"{counts['base']:,}"])
    return "## Parameters\n\n" + _table(["", "parameters"], rows)


def parameter_counts(config: dict) -> dict:
    """Parameters of the model a saved ``config.json`` describes (built on the meta device: no weights read, no
    memory), of its routers, and of the base model before dlo's expansion (the same layers, the base depth)."""
    import torch
    import transformers

    from dlo.modeling import decoder_layers, routed_model_class

    stock = getattr(transformers, _architecture(config))
    with torch.device("meta"):
        dlo_class = config.get("dlo_routing") or config.get("dlo_repetitions")
        model = (routed_model_class(stock) if dlo_class else stock)(_stock_config(config))
    total = sum(p.numel() for p in model.parameters())  # a shared repetition's tensors once
    routers = sum(p.numel() for name, p in model.named_parameters() if ".router." in name)
    scales = sum(p.numel() for name, p in model.named_parameters() if ".residual_scale." in name)
    layers = decoder_layers(model)
    stock_layer = sum(p.numel() for name, p in layers[0].named_parameters() if not name.startswith("router."))
    base_layers = (config.get("dlo_expansion") or {}).get("base_num_layers", len(layers))
    repetitions = len((config.get("dlo_repetitions") or {}).get("layers", []))
    base = total - routers - scales + (base_layers + repetitions - len(layers)) * stock_layer
    return {"model": total, "routers": routers, "base": base, "base_layers": base_layers}


def _routing_section(config: dict, summary: dict) -> str:
    routing = config["dlo_routing"]
    settings = routing["config"]
    realised = {row["layer"]: row["realised_capacity"] for row in summary.get("layers", [])}
    rows = [[i, f"{target:.3f}", f"{realised[i]:.3f}" if i in realised else "-", f"{threshold:.4f}"]
            for i, target, threshold in zip(routing["routed_layers"], routing["capacities"], routing["thresholds"])]
    text = (f"Granularity `{settings['granularity']}` (a skipped token skips "
            f"{'attention and MLP' if settings['granularity'] == 'block' else 'the MLP'} of the layer), router "
            f"labels `{settings['label']}`, target capacity {_cell(settings['capacity'])}, gate beta "
            f"{_cell(settings['beta'])}. Capacity is the share of tokens a layer runs; at inference a token runs "
            "when its router score reaches the layer's calibrated threshold, a causal decision, so generation "
            "with a KV cache matches cache-free forwards.")
    realised_note = ("Realised: measured on the eval text after calibration (summary.json)." if realised
                     else "No realised capacities recorded (no summary.json).")
    return "\n\n".join(["## Routing", text,
                        _table(["layer", "target capacity", "realised capacity", "threshold"], rows), realised_note])


def _summary_section(summary: dict) -> str:
    rows = [[SUMMARY_LABELS.get(key, key), _cell(value)] for key, value in summary.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)]
    return "## Training and evaluation\n\n" + _table(["", "value"], rows)


def _export_section(info: dict, record: dict) -> str:
    usage = info.get("usage", {})
    criterion = ", ".join(f"{k}={_cell(v)}" for k, v in info.get("criterion", {}).items())
    lines = ["## Export",
             f"Kept layers {info['kept']} and dropped {info['dropped']} of the {info['source_num_layers']} layers "
             f"of the routed model ({criterion}; usage from {info.get('usage_source', 'target')} capacities)."]
    dropped = [[i, f"{usage[str(i)]:.3f}" if str(i) in usage else "unrouted"] for i in info["dropped"]]
    if dropped:
        lines.append(_table(["dropped layer", "capacity"], dropped))
    if info.get("kept_routed_layers_run_ungated"):
        lines.append("Kept routed layers now run every token, ungated (the routed model scaled each update by "
                     "its router's gate, which has no dense equivalent).")
    evaluation = (record or {}).get("eval")
    if evaluation:
        before, after = evaluation["before"], evaluation["after"]
        lines.append(_table(["", "routed model", "export"], [
            ["loss", f"{before['loss']:.4f}", f"{after['loss']:.4f}"],
            ["perplexity", f"{before['perplexity']:.2f}", f"{after['perplexity']:.2f}"]]))
        lines.append(f"Measured on {evaluation['tokens']} predicted tokens of `{record.get('data')}` (export.json).")
    return "\n\n".join(lines)


def _loading_section(config: dict, directory: str, location: str) -> str:
    """How to load the model: code naming ``location``; what it needs, from the files in ``directory``."""
    if _kind(config) == "routed" or config.get("dlo_repetitions"):
        code = (f"import dlo\n\nmodel = dlo.load_model({location!r})                # capacity=0.4 changes the "
                "share of tokens that run\n\n"
                "from transformers import AutoModelForCausalLM\n\n"
                f"model = AutoModelForCausalLM.from_pretrained({location!r}, trust_remote_code=True)")
        if os.path.isfile(os.path.join(directory, SELF_CONTAINED_CODE)):
            remote = ("needs transformers and torch only: the checkpoint carries its modeling code, which uses dlo's "
                      "own classes and Triton kernels when dlo is installed")
        else:
            remote = "needs dlo installed: the checkpoint's `modeling_dlo.py` imports it"
        note = (f"`dlo.load_model` needs dlo (`pip install {DISTRIBUTION}`, import name `dlo`); `trust_remote_code` "
                f"{remote}.")
    else:
        code = ("from transformers import AutoModelForCausalLM\n\n"
                f"model = AutoModelForCausalLM.from_pretrained({location!r})")
        note = f"A plain `{_architecture(config)}`: it loads without dlo and without custom code."
        if _kind(config) == "expanded":
            note += (" To route it: `dlo.attach_routers(model, dlo.RoutingConfig(layers=\"new\"))`, then train "
                     "with dlo's SFT recipe.")
    return f"## How to load\n\n```python\n{code}\n```\n\n{note}"


def _attribution_section(base: dict) -> str:
    if base["attribution"]:
        return f"{ATTRIBUTION_HEADING}\n\n{base['attribution']}"
    name = _hub_links(base["hub_id"]) if base["hub_id"] else f"`{base['ref']}`" if base["ref"] else "its base model"
    if base["license"]:
        text = f"These weights derive from {name} and carry its license, `{base['license']}`."
    else:
        text = (f"The model card and config of {name} name no license, so this card says `license: other`. "
                "These weights derive from it and remain under its terms: check them and set `license:` "
                "before publishing.")
    return f"{ATTRIBUTION_HEADING}\n\n{text}"


# -- formatting ------------------------------------------------------------------------------------------------


def _hub_links(ids: str | list[str]) -> str:
    return ", ".join(f"[`{i}`](https://huggingface.co/{i})" for i in ([ids] if isinstance(ids, str) else ids))


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_cell(v) for v in value) + "]"
    return str(value)


def _table(header: list, rows: list[list]) -> str:
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)
