"""Depth expansion (DESIGN.md §2.1): grow a model by duplicating decoder layers.

An :class:`ExpansionPlan` is plain data: for every layer of the expanded model, which base layer
it comes from, how it is initialised and whether it is *new* (a duplicate of a base layer that
already occurs earlier in the map). Four strategies build plans:

- ``llama_pro``: n layers in G equal groups, a copy of each group's last layer inserted after it;
- ``dus`` (SOLAR depth up-scaling): ``[0, n-m) + [m, n)``;
- ``idus`` (interlocked DUS): the two DUS halves cut into chunks of g layers and interleaved;
- ``slices``: explicit half-open ranges, also read from a mergekit ``passthrough`` YAML.

Init methods of a new layer (originals are always plain copies): ``copy``; ``zero`` (copy, then
zero ``self_attn.o_proj`` and ``mlp.down_proj`` so the block adds nothing to the residual stream:
an exact identity); ``merge-linear`` (mean of the layer and the base layer before it); ``slerp``
(per-tensor spherical interpolation at t=0.5 between the base layer before it and the layer).

With ``shared=True`` a duplicate is no copy: it is a repetition that reuses its base layer's weights
(dlo/sharing.py), and its init sets its residual scales: ``zero`` 0 (the identity), ``copy`` 1 (the layer).

``expand_model`` applies a plan to a ``*ForCausalLM`` of a supported family (dlo/families.py) in
memory; ``dlo expand`` (dlo/expansion_io.py) applies it to a checkpoint on disk, streaming tensors
layer by layer.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import yaml
from transformers import PretrainedConfig

from dlo.errors import UserError, warn
from dlo.families import check_causal_lm
from dlo.sharing import repetition_map
from dlo.validation import ArgumentTypeError, Shown, check_instance, check_model

STRATEGIES = ("llama-pro", "dus", "idus", "slices")
INITS = ("copy", "zero", "merge-linear", "slerp")
# What a shared repetition's residual scales start at, by init (it has no tensors of its own to blend).
SHARED_SCALE = {"zero": 0.0, "copy": 1.0}
DEFAULT_INIT = {"llama-pro": "zero", "dus": "copy", "idus": "copy", "slices": "copy"}
# The projections that write into the residual stream: zeroing them makes a block an identity.
RESIDUAL_WRITERS = ("self_attn.o_proj.", "mlp.down_proj.")
# Above this |cos| between two tensors slerp is numerically a lerp (and sin(omega) ~ 0 would blow up).
SLERP_PARALLEL_THRESHOLD = 0.9995


class LayerSpec(NamedTuple):
    """One layer of the expanded model."""

    base_index: int
    init: str
    is_new: bool


def _check_init(init: str) -> str:
    if init not in INITS:
        raise ValueError(f"init={init!r}: unknown init method; valid: {', '.join(INITS)}")
    return init


def _check_num_layers(num_layers) -> int:
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers={num_layers!r}: must be a positive integer")
    return num_layers


def _params(params: dict, shared: bool) -> dict:
    """A plan's params, ``shared`` recorded only when set (copied plans read as they always did)."""
    if not isinstance(shared, bool):
        raise ValueError(f"shared={shared!r}: must be true or false")
    return {**params, "shared": True} if shared else params


def _from_sources(sources: list[int], init: str) -> list[LayerSpec]:
    """Specs for a layer map: a base index seen before is a duplicate (new, gets ``init``)."""
    seen, specs = set(), []
    for i in sources:
        specs.append(LayerSpec(i, init, True) if i in seen else LayerSpec(i, "copy", False))
        seen.add(i)
    return specs


def parse_ranges(text: str) -> list[tuple[int, int]]:
    """``"0-16,8-24"`` -> ``[(0, 16), (8, 24)]`` (half-open ranges, as on the command line)."""
    ranges = []
    for part in text.split(","):
        start, sep, stop = part.strip().partition("-")
        if not (sep and start.strip().isdigit() and stop.strip().isdigit()):
            raise ValueError(f"slices {text!r}: each range must be START-STOP with integers "
                             f"(half-open, e.g. 0-16,8-24); got {part.strip()!r}")
        ranges.append((int(start), int(stop)))
    return ranges


@dataclass
class ExpansionPlan:
    """Which base layer each expanded layer comes from, and how it is initialised.

    ``num_layers`` is the base depth the plan was made for; ``None`` (slices, mergekit) means it is
    checked against the model when the plan is applied.
    """

    strategy: str
    params: dict
    layers: list[LayerSpec]
    num_layers: int | None = None
    new_indices: list[int] = field(init=False, repr=False)

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r}: unknown strategy; valid: {', '.join(STRATEGIES)}")
        if self.num_layers is not None:
            _check_num_layers(self.num_layers)
        if not self.layers:
            raise ValueError("an expansion plan needs at least one layer")
        self.layers = [LayerSpec(int(s[0]), s[1], bool(s[2])) for s in self.layers]
        seen = set()
        for j, (i, init, is_new) in enumerate(self.layers):
            _check_init(init)
            if i < 0 or (self.num_layers is not None and i >= self.num_layers):
                top = "" if self.num_layers is None else f", {self.num_layers - 1}"
                raise ValueError(f"layer {j}: base index {i} out of range [0{top}]")
            if is_new != (i in seen):
                raise ValueError(f"layer {j}: is_new={is_new} but base layer {i} "
                                 f"{'already' if i in seen else 'never'} occurs earlier in the map")
            if not is_new and init != "copy":
                raise ValueError(f"layer {j}: init={init!r} on the first use of base layer {i}; only duplicates "
                                 "are re-initialised (the original stays a plain copy)")
            if init in ("merge-linear", "slerp") and i == 0:
                raise ValueError(f"layer {j}: init={init!r} blends base layer {i} with the layer before it, "
                                 "and base layer 0 has none; use init 'copy' or 'zero'")
            if is_new and self.shared and init not in SHARED_SCALE:
                raise ValueError(f"layer {j}: init={init!r} with shared=true: a shared repetition has no tensors of "
                                 f"its own to blend; valid: {', '.join(SHARED_SCALE)} (residual scales 0 or 1)")
            seen.add(i)
        self.new_indices = [j for j, spec in enumerate(self.layers) if spec.is_new]

    @property
    def shared(self) -> bool:
        """Duplicates are repetitions sharing their base layer's weights (dlo/sharing.py), not copies."""
        return bool(self.params.get("shared", False))

    # -- constructors ------------------------------------------------------------------------

    @classmethod
    def llama_pro(cls, num_layers: int, groups: int, init: str = "zero", shared: bool = False) -> ExpansionPlan:
        """After the last layer of each of ``groups`` equal groups, insert a copy of it."""
        n = _check_num_layers(num_layers)
        if isinstance(groups, bool) or not isinstance(groups, int) or not (1 <= groups <= n) or n % groups:
            divisors = [g for g in range(1, n + 1) if n % g == 0]
            raise ValueError(f"groups={groups!r}: must divide num_layers={n}; valid: {divisors}")
        size = n // groups
        sources = []
        for g in range(groups):
            group = list(range(g * size, (g + 1) * size))
            sources += group + group[-1:]
        params = _params({"groups": groups, "init": _check_init(init)}, shared)
        return cls("llama-pro", params, _from_sources(sources, init), n)

    @classmethod
    def dus(cls, num_layers: int, overlap: int, init: str = "copy", shared: bool = False) -> ExpansionPlan:
        """SOLAR depth up-scaling: two copies, the first without its last ``overlap`` layers,
        the second without its first ``overlap``: ``[0, n-m) + [m, n)``."""
        n = _check_num_layers(num_layers)
        m = _check_overlap(overlap, n)
        sources = list(range(0, n - m)) + list(range(m, n))
        return cls("dus", _params({"overlap": m, "init": _check_init(init)}, shared), _from_sources(sources, init), n)

    @classmethod
    def idus(cls, num_layers: int, overlap: int, group_size: int, init: str = "copy",
             shared: bool = False) -> ExpansionPlan:
        """Interlocked DUS: the DUS halves A=[0, n-m) and B=[m, n) cut into chunks of
        ``group_size`` and interleaved A1 B1 A2 B2 ... (a shorter last chunk when it does not divide)."""
        n = _check_num_layers(num_layers)
        m = _check_overlap(overlap, n)
        half = n - m
        if isinstance(group_size, bool) or not isinstance(group_size, int) or not (1 <= group_size <= half):
            raise ValueError(f"group_size={group_size!r}: must be an integer in [1, {half}] "
                             f"(the length n - overlap of each DUS half)")
        sources = []
        for start in range(0, half, group_size):
            stop = min(start + group_size, half)
            sources += list(range(start, stop)) + list(range(m + start, m + stop))
        params = _params({"overlap": m, "group_size": group_size, "init": _check_init(init)}, shared)
        return cls("idus", params, _from_sources(sources, init), n)

    @classmethod
    def slices(cls, ranges, init: str = "copy", num_layers: int | None = None, shared: bool = False) -> ExpansionPlan:
        """Stack half-open base-layer ranges, e.g. ``[(0, 16), (8, 24), (16, 32)]`` or ``"0-16,8-24"``.

        Raises ``TypeError`` when ``ranges`` is neither text nor a list of (start, stop) pairs, ``ValueError``
        for an empty, reversed or out-of-range slice (``num_layers``, when given, bounds them).
        """
        if isinstance(ranges, str):
            ranges = parse_ranges(ranges)
        if ranges is not None and not isinstance(ranges, (list, tuple)):
            raise ArgumentTypeError("ranges", Shown(ranges), "expected a list of (start, stop) pairs or text like "
                                                             "'0-16,8-24'")
        for r in ranges or ():
            if not isinstance(r, (list, tuple)):
                raise ArgumentTypeError("ranges", Shown(ranges), f"slice {r!r} is not a (start, stop) pair")
        ranges = [tuple(r) for r in ranges or ()]
        if not ranges:
            raise ValueError("slices: no ranges given; expected e.g. [(0, 16), (8, 24)]")
        n = None if num_layers is None else _check_num_layers(num_layers)
        for r in ranges:
            if len(r) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in r):
                raise ValueError(f"slice {r!r}: expected a pair of integers (start, stop)")
            start, stop = r
            if not (0 <= start < stop):
                raise ValueError(f"slice {start}-{stop}: empty or reversed; need 0 <= start < stop (half-open)")
            if n is not None and stop > n:
                raise ValueError(f"slice {start}-{stop}: out of range for a {n}-layer model; "
                                 f"ranges must lie within [0, {n}]")
        sources = [i for start, stop in ranges for i in range(start, stop)]
        params = _params({"ranges": [list(r) for r in ranges], "init": _check_init(init)}, shared)
        return cls("slices", params, _from_sources(sources, init), n)

    @classmethod
    def from_mergekit(cls, path_or_yaml_text: str | os.PathLike, init: str = "copy",
                      num_layers: int | None = None, shared: bool = False) -> ExpansionPlan:
        """The layer map of a mergekit ``merge_method: passthrough`` config with one source model.

        With ``init='copy'`` the result is tensor for tensor what mergekit writes for that config.
        ``dtype``/``out_dtype`` are recorded in ``params['mergekit']``; ``dlo expand`` casts to them
        (``expand_model`` leaves the dtype to whoever loaded the model). Errors in a file name it. With
        ``shared=True`` the repeated ranges reuse the weights of their first occurrence. Raises ``TypeError``
        unless ``path_or_yaml_text`` is a path or YAML text.
        """
        check_instance("path_or_yaml_text", path_or_yaml_text, (str, os.PathLike), "a file path or YAML text")
        config, source = _read_mergekit(path_or_yaml_text)
        try:
            plan = cls.slices(_mergekit_ranges(config), init=init, num_layers=num_layers, shared=shared)
            return plan._with_mergekit(config)
        except ValueError as err:
            raise UserError(f"{source}: {err}") from None

    def _with_mergekit(self, config: dict) -> ExpansionPlan:
        info = {"model": _mergekit_model(config)}
        for key in ("dtype", "out_dtype"):
            if config.get(key) is not None:
                if config[key] not in MERGEKIT_DTYPES:
                    raise ValueError(f"{key}={config[key]!r}: not supported; valid: "
                                     f"{', '.join(MERGEKIT_DTYPES)}")
                info[key] = config[key]
        self.params["mergekit"] = info
        return self

    @classmethod
    def build(cls, strategy: str, num_layers: int | None = None, **params) -> ExpansionPlan:
        """Dispatch by strategy name: ``build("dus", 32, overlap=8)``; params as the constructors take them."""
        builders = {"llama-pro": cls.llama_pro, "dus": cls.dus, "idus": cls.idus}
        if strategy == "slices":
            return cls.slices(num_layers=num_layers, **params)
        if strategy not in builders:
            raise ValueError(f"strategy={strategy!r}: unknown strategy; valid: {', '.join(STRATEGIES)}")
        return builders[strategy](num_layers, **params)

    # -- views and serialisation -------------------------------------------------------------

    def check_base(self, num_layers: int):
        """Raise unless the plan fits a base model of ``num_layers`` layers; warn (``DloWarning``) when it
        leaves base layers out or makes the model shallower."""
        if self.num_layers is not None and self.num_layers != num_layers:
            raise ValueError(f"the plan was made for a {self.num_layers}-layer model, this one has {num_layers}")
        top = max(spec.base_index for spec in self.layers)
        if top >= num_layers:
            raise ValueError(f"the plan uses base layer {top}, out of range for a {num_layers}-layer model "
                             f"(valid: [0, {num_layers - 1}])")
        # Legal (mergekit prunes layers this way), but an expansion that shrinks the model is usually a typo.
        unused = sorted(set(range(num_layers)) - {spec.base_index for spec in self.layers})
        shorter = len(self.layers) < num_layers
        what = [f"the expanded model has {len(self.layers)} layers, fewer than the base"] if shorter else []
        if unused:
            what.append(f"base layers {unused} are left out")
        if what:
            warn(f"{self.strategy} plan for a {num_layers}-layer model: {'; '.join(what)} (fine for pruning, "
                 "else check the ranges)")

    def to_table(self) -> str:
        """The map as text: new index -> base index -> init (duplicates marked new, or with the layer they reuse)."""
        params = ", ".join(f"{k}={v}" for k, v in self.params.items())
        base = "?" if self.num_layers is None else self.num_layers
        lines = [f"{self.strategy} ({params}): {base} -> {len(self.layers)} layers, "
                 f"{len(self.new_indices)} new",
                 f"{'layer':>5}  {'base':>4}  {'init':<12}  new"]
        reuses = repetition_map(self.layers) if self.shared else {}
        for j, (i, init, is_new) in enumerate(self.layers):
            mark = f"yes, shares layer {reuses[j]}" if j in reuses else "yes" if is_new else ""
            lines.append(f"{j:>5}  {i:>4}  {init:<12}  {mark}".rstrip())
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-able; the same shape expand_model records as ``config.dlo_expansion``."""
        return {
            "strategy": self.strategy,
            "params": copy.deepcopy(self.params),
            "base_num_layers": self.num_layers,
            "layers": [{"source": i, "init": init, "new": is_new} for i, init, is_new in self.layers],
        }

    @classmethod
    def from_dict(cls, data: dict) -> ExpansionPlan:
        """Inverse of :meth:`to_dict` (also reads a model's ``config.dlo_expansion``)."""
        keys = {"strategy", "params", "base_num_layers", "layers"}
        if not isinstance(data, dict) or not {"strategy", "layers"} <= set(data) or set(data) - keys:
            raise ValueError(f"expansion plan dict: expected keys {sorted(keys)} (strategy and layers required); "
                             f"got {sorted(data) if isinstance(data, dict) else type(data).__name__}")
        try:
            layers = [LayerSpec(e["source"], e["init"], e["new"]) for e in data["layers"]]
        except (KeyError, TypeError) as err:
            raise ValueError(f"expansion plan dict: every layer needs 'source', 'init' and 'new' ({err})") from None
        return cls(data["strategy"], dict(data.get("params") or {}), layers, data.get("base_num_layers"))

    def save(self, path: str):
        """Write the plan as JSON (``.json``) or YAML (``.yaml``/``.yml``)."""
        fmt = _format_of(path)
        with open(path, "w") as fh:
            if fmt == "json":
                json.dump(self.to_dict(), fh, indent=2)
            else:
                yaml.safe_dump(self.to_dict(), fh, sort_keys=False)

    @classmethod
    def load(cls, path: str) -> ExpansionPlan:
        """Read a plan written by :meth:`save`."""
        fmt = _format_of(path)
        with open(path) as fh:
            return cls.from_dict(json.load(fh) if fmt == "json" else yaml.safe_load(fh))


def _format_of(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".json", ".yaml", ".yml"):
        raise ValueError(f"plan file {path!r}: extension {ext!r} not recognised; valid: .json, .yaml, .yml")
    return "json" if ext == ".json" else "yaml"


def _check_overlap(overlap, n: int) -> int:
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not (0 <= 2 * overlap < n):
        raise ValueError(f"overlap={overlap!r}: must be an integer with 0 <= overlap < num_layers/2 = {n / 2:g}")
    return overlap


# -- mergekit passthrough configs ------------------------------------------------------------

def _read_mergekit(path_or_yaml_text: str | os.PathLike) -> tuple[dict, str]:
    """(config, what to call it in messages) of a mergekit YAML file or text."""
    text = os.fspath(path_or_yaml_text)
    single_line = "\n" not in text
    if single_line and os.path.isdir(text):
        raise UserError(f"mergekit config {text!r} is a directory, not a YAML file")
    if single_line and os.path.isfile(text):
        source, hint = f"mergekit config {text}", ""
        with open(text) as fh:
            text = fh.read()
    elif single_line and text.endswith((".yml", ".yaml")):
        raise UserError(f"mergekit config {text!r} does not exist")
    else:
        source = f"mergekit config {text!r}" if single_line else "mergekit config"
        hint = " (or the path of an existing file)"
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{source}: not valid YAML{where} ({getattr(err, 'problem', None) or err})") from None
    if not isinstance(config, dict):
        raise UserError(f"{source}: expected a YAML mapping, got {type(config).__name__}{hint}")
    return config, source


MERGEKIT_KEYS = ("merge_method", "slices", "base_model", "dtype", "out_dtype", "tokenizer_source")
MERGEKIT_DTYPES = ("float32", "float16", "bfloat16")


def _mergekit_model(config: dict) -> str:
    models = {str(src["model"]) for s in config["slices"] for src in s["sources"]}
    if config.get("base_model") is not None:
        models.add(str(config["base_model"]))
    if config.get("tokenizer_source") not in (None, "base", "union"):  # with one model both mean its own
        models.add(str(config["tokenizer_source"]))
    if len(models) != 1:
        raise ValueError(f"the config names {len(models)} models {sorted(models)}; dlo expands one model "
                         "(every slice, base_model and tokenizer_source must name the same one)")
    return models.pop()


def _mergekit_ranges(config: dict) -> list[tuple[int, int]]:
    method = config.get("merge_method")
    if method != "passthrough":
        raise ValueError(f"merge_method={method!r}: only 'passthrough' (layer stacking) is supported")
    unknown = sorted(set(config) - set(MERGEKIT_KEYS))
    if unknown:
        raise ValueError(f"keys {unknown} are not supported; valid: {', '.join(MERGEKIT_KEYS)} "
                         "(for scale-0 o_proj/down_proj parameters use init 'zero')")
    slices = config.get("slices")
    if not isinstance(slices, list) or not slices:
        raise ValueError("no 'slices' list; expected slices: - sources: - model: X, "
                         "layer_range: [a, b]")
    ranges = []
    for k, s in enumerate(slices):
        sources = s.get("sources") if isinstance(s, dict) else None
        if not isinstance(sources, list) or len(sources) != 1:
            raise ValueError(f"slice {k}: passthrough takes exactly one source per slice, "
                             f"got {len(sources) if isinstance(sources, list) else sources!r}")
        src = sources[0]
        if not isinstance(src, dict):
            raise ValueError(f"slice {k}: a source must be a mapping with 'model' and 'layer_range', "
                             f"got {src!r}")
        extra = sorted(set(src) - {"model", "layer_range"}) + sorted(set(s) - {"sources"})
        if extra:
            raise ValueError(f"slice {k}: keys {extra} are not supported (only model and layer_range; "
                             "for scale-0 o_proj/down_proj parameters use init 'zero')")
        if "model" not in src or "layer_range" not in src:
            raise ValueError(f"slice {k}: a source needs 'model' and 'layer_range'")
        if not isinstance(src["layer_range"], (list, tuple)) or len(src["layer_range"]) != 2:
            raise ValueError(f"slice {k}: layer_range={src['layer_range']!r}, expected [start, stop]")
        ranges.append(tuple(src["layer_range"]))
    return ranges


# -- tensor initialisation (shared by expand_model and the streaming CLI) --------------------

def slerp(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """Spherical interpolation from ``a`` (t=0) to ``b`` (t=1), over the flattened tensors, in fp32.

    Falls back to linear interpolation when the tensors are nearly (anti-)parallel or one is zero,
    where the angle is ill-conditioned.
    """
    a32, b32 = a.float(), b.float()
    na, nb = a32.norm(), b32.norm()
    if na == 0 or nb == 0:
        return ((1 - t) * a32 + t * b32).to(a.dtype)
    cos = float((a32.flatten() @ b32.flatten()) / (na * nb))
    if abs(cos) > SLERP_PARALLEL_THRESHOLD:
        return ((1 - t) * a32 + t * b32).to(a.dtype)
    omega = math.acos(max(-1.0, min(1.0, cos)))
    s = math.sin(omega)
    return (math.sin((1 - t) * omega) / s * a32 + math.sin(t * omega) / s * b32).to(a.dtype)


def init_layer_tensors(init: str, layer: dict[str, torch.Tensor],
                       previous: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """New tensors (own storage) for a duplicate of ``layer``; keys are relative to the layer
    (``self_attn.o_proj.weight``). ``previous`` is the base layer before it (merge-linear, slerp)."""
    _check_init(init)
    if init in ("merge-linear", "slerp") and previous is None:
        raise ValueError(f"init={init!r} needs the previous base layer's tensors")
    if init == "zero" and not all(any(k.startswith(w) for k in layer) for w in RESIDUAL_WRITERS):
        raise ValueError(f"init='zero' needs {' and '.join(w + 'weight' for w in RESIDUAL_WRITERS)} in the layer")
    out = {}
    for key, tensor in layer.items():
        if init == "zero" and key.startswith(RESIDUAL_WRITERS):
            out[key] = torch.zeros_like(tensor)
        elif init in ("copy", "zero") or not tensor.is_floating_point():
            out[key] = tensor.detach().clone()
        elif init == "merge-linear":
            out[key] = ((previous[key].float() + tensor.float()) / 2).to(tensor.dtype)
        else:
            out[key] = slerp(previous[key], tensor, 0.5)
    return out


# -- applying a plan -------------------------------------------------------------------------

def check_architecture(config, class_name: str | None = None):
    """Raise unless ``config`` (and the model class, when given) is a supported causal decoder."""
    check_causal_lm(config, class_name)
    if getattr(config, "dlo_routing", None) is not None:
        raise ValueError("the model already has routers (config.dlo_routing); expand the base model, then route")
    if getattr(config, "dlo_expansion", None):
        raise ValueError("the model was already expanded (config.dlo_expansion); expand its base model once, "
                         "with one plan (slices can express any layer map)")


def expanded_config(config, plan: ExpansionPlan, num_base_layers: int):
    """Update ``config`` in place for the expanded depth and record the provenance."""
    config.num_hidden_layers = len(plan.layers)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[spec.base_index] for spec in plan.layers]
    record = plan.to_dict()
    record["base_num_layers"] = num_base_layers
    config.dlo_expansion = record
    return config


def expand_model(model, plan: ExpansionPlan):
    """Apply ``plan`` to a ``*ForCausalLM`` of a supported family (dlo/families.py) in place and return it.

    First uses of a base layer keep their module; every duplicate is a deep copy (its own storage)
    initialised per the plan, or with a shared plan a repetition reusing the first use's weights (the
    model then becomes ``Dlo<Base>``, which saves them once). Every attention ``layer_idx`` is renumbered (the
    KV cache is indexed by it), ``config.num_hidden_layers`` and ``config.layer_types`` follow the new map, and
    the map is recorded as ``config.dlo_expansion`` (see :meth:`ExpansionPlan.to_dict`).

    Raises ``TypeError`` unless ``model`` is a transformers model and ``plan`` an :class:`ExpansionPlan`,
    ``ValueError`` when the plan does not fit the model's depth. Warns (``dlo.errors.DloWarning``) when the
    expansion has fewer layers than the base or leaves base layers unused.
    """
    check_model(model)
    check_instance("plan", plan, ExpansionPlan, "a dlo.ExpansionPlan (e.g. dlo.ExpansionPlan.dus(num_layers, "
                                                "overlap))")
    check_architecture(model.config, type(model).__name__)
    if hasattr(model, "dlo_routing_config"):  # routers attached in memory: config.dlo_routing comes at save
        raise ValueError("the model already has routers; expand the base model, then attach routers")
    layers = model.get_decoder().layers
    n = len(layers)
    plan.check_base(n)
    expanded = []
    for j, (i, init, is_new) in enumerate(plan.layers):
        layer = layers[i]
        if is_new and plan.shared:  # a placeholder: share_repetitions puts the repetition here
            expanded.append(layer)
            continue
        if is_new:
            layer = copy.deepcopy(layers[i])
            # The deep copy also copied the config its modules read (attention implementation, layer types); a stock
            # layer shares the model's, so a later change (set_attn_implementation, the layer map below) reaches it.
            for module in layer.modules():
                if isinstance(getattr(module, "config", None), PretrainedConfig):
                    module.config = model.config
            if init != "copy":
                previous = layers[i - 1].state_dict() if init in ("merge-linear", "slerp") else None
                layer.load_state_dict(init_layer_tensors(init, layers[i].state_dict(), previous))
        for module in (layer, layer.self_attn):
            if hasattr(module, "layer_idx"):
                module.layer_idx = j
        expanded.append(layer)
    model.get_decoder().layers = torch.nn.ModuleList(expanded)
    expanded_config(model.config, plan, n)
    if plan.shared:
        from dlo.modeling import share_repetitions

        reuses = repetition_map(plan.layers)
        share_repetitions(model, reuses, {j: SHARED_SCALE[plan.layers[j].init] for j in reuses})
    return model
