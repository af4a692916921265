"""``dlo expand``: grow a checkpoint's depth by duplicating layers (DESIGN.md §2.1, dlo/expansion.py).

The output is a standard checkpoint that plain ``AutoModelForCausalLM.from_pretrained`` loads without
custom code, streamed from the input shards layer by layer and written atomically
(dlo/expansion_io.py). With ``--shared`` the duplicates are repetitions stored once (dlo/sharing.py): a dlo
checkpoint (``dlo.load_model``, or ``trust_remote_code=True``).
"""

from __future__ import annotations

import os

from dlo.checkpoints import check_output_dir, resolve_model_dir
from dlo.errors import UserError, warn
from dlo.expansion import DEFAULT_INIT, INITS, SHARED_SCALE, STRATEGIES, ExpansionPlan
from dlo.expansion_io import expand_checkpoint, load_base_config
from dlo.model_card import write_model_card

# Which command-line options each strategy takes (argparse dest names).
STRATEGY_OPTIONS = {"llama-pro": ("groups",), "dus": ("overlap",), "idus": ("overlap", "group_size"),
                    "slices": ("slices",)}
OPTION_FLAGS = {"groups": "--groups G", "overlap": "--overlap M", "group_size": "--group-size g",
                "slices": "--slices A-B,..."}


def add_parser(subparsers):
    p = subparsers.add_parser("expand", help="Expand a model's depth (LLaMA-Pro, DUS, interlocked DUS, slices).",
                              description=__doc__)
    p.add_argument("--model", help="A Llama/Mistral/Qwen2 checkpoint (safetensors): a local directory or a Hugging "
                                   "Face hub id (org/name, offline from the cache). Default with --mergekit: the "
                                   "model its slices name.")
    p.add_argument("--revision", help="Hub revision (branch, tag or commit) when --model is a hub id.")
    p.add_argument("--gguf-file", help="A GGUF file inside --model (a directory or hub id); a --model path ending "
                                       "in .gguf works too. Converted once into a cached safetensors checkpoint.")
    p.add_argument("--strategy", help=f"One of {', '.join(STRATEGIES)} (default with --mergekit: slices).")
    p.add_argument("--groups", type=int, help="llama-pro: number of equal groups G (must divide the depth).")
    p.add_argument("--overlap", type=int, help="dus/idus: layers m dropped from each copy, 0 <= m < n/2.")
    p.add_argument("--group-size", type=int, help="idus: chunk size g of the interleaved halves.")
    p.add_argument("--slices", help="slices: half-open base-layer ranges, e.g. 0-16,8-24,16-32.")
    p.add_argument("--mergekit", metavar="FILE", help="Read the slices from a mergekit passthrough YAML.")
    p.add_argument("--init", help=f"Init of duplicated layers: {', '.join(INITS)} "
                                  "(default: zero for llama-pro, copy otherwise).")
    p.add_argument("--shared", action="store_true",
                   help="Duplicates reuse their source layer's weights (stored once; residual scales 0 with --init "
                        "zero, 1 with copy); the output loads with dlo.load_model or trust_remote_code=True.")
    p.add_argument("--output", required=True, help="Directory of the expanded checkpoint (written atomically).")
    p.add_argument("--force", action="store_true", help="Replace a non-empty output directory.")


def run(args):
    # Cheap checks first: a call that must fail fails before any weights are read or anything is written.
    strategy, init = check_options(args)
    check_output_dir(args.output, args.force)
    # The mergekit file is checked whole before any model is looked for; its slices name the default model.
    mergekit = ExpansionPlan.from_mergekit(args.mergekit, init=init, shared=args.shared) if args.mergekit else None
    model_dir = resolve_model_dir(args.model or mergekit.params["mergekit"]["model"], args.revision,
                                  args.gguf_file)
    output = check_output_dir(args.output, args.force, inputs=[model_dir, *([args.mergekit] if mergekit else [])])
    named = mergekit.params["mergekit"]["model"] if mergekit else None
    if named is not None and args.model is not None and not _same_model(named, args.model, model_dir):
        warn(f"mergekit config {args.mergekit} names model {named!r}, but --model {args.model!r} is given: its "
             "slices are applied to --model")
    config = load_base_config(model_dir)
    if mergekit:
        plan = ExpansionPlan.from_mergekit(args.mergekit, init=init, num_layers=config.num_hidden_layers,
                                           shared=args.shared)
    else:
        params = {("ranges" if name == "slices" else name): getattr(args, name) for name in STRATEGY_OPTIONS[strategy]}
        plan = ExpansionPlan.build(strategy, config.num_hidden_layers, init=init, shared=args.shared, **params)
    print(plan.to_table())
    counts = expand_checkpoint(model_dir, plan, output, force=args.force)
    write_model_card(output, base_model=model_dir)
    before, after = counts["before"], counts["after"]
    print(f"parameters: {before:,} -> {after:,} ({(after - before) / before:+.1%})")
    if plan.shared:
        print(f"stored: {counts['stored_bytes']:,} bytes of safetensors, each shared tensor once")
        print(f"wrote {output} ({len(plan.layers)} layers, {len(plan.new_indices)} shared repetitions; loads with "
              "dlo.load_model, or AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True))")
        return
    print(f"wrote {output} ({len(plan.layers)} layers; loads with AutoModelForCausalLM.from_pretrained, "
          "no custom code)")


def _same_model(named: str, given: str, model_dir: str) -> bool:
    """Whether the model a mergekit config names is the ``--model`` given (``model_dir``, as it resolved).
    A hub id is compared as text: resolving it could mean a download."""
    if named == given:
        return True
    return os.path.isdir(named) and os.path.samefile(named, model_dir)


def check_options(args) -> tuple[str, str]:
    """(strategy, init) once the options are known to fit together; nothing is read."""
    if args.model is None and not args.mergekit:
        raise UserError("--model is required (a local directory or a hub id), unless --mergekit FILE names it")
    strategy = args.strategy or ("slices" if args.mergekit else None)
    if strategy is None:
        raise UserError(f"--strategy is required (one of {', '.join(STRATEGIES)}), or --mergekit FILE")
    if strategy not in STRATEGIES:
        raise UserError(f"--strategy {strategy!r}: unknown strategy; valid: {', '.join(STRATEGIES)}")
    if args.mergekit and strategy != "slices":
        raise UserError(f"--mergekit describes slices; it cannot be combined with --strategy {strategy}")
    if args.init is not None and args.init not in INITS:
        raise UserError(f"--init={args.init!r}: unknown init method; valid: {', '.join(INITS)}")
    if args.shared and args.init not in (None, *SHARED_SCALE):
        raise UserError(f"--init={args.init!r} with --shared: a shared repetition has no tensors of its own to blend; "
                        f"valid: {', '.join(SHARED_SCALE)}")
    wanted = () if args.mergekit else STRATEGY_OPTIONS[strategy]
    given = [name for name in OPTION_FLAGS if getattr(args, name) is not None]
    extra = [OPTION_FLAGS[name].split()[0] for name in given if name not in wanted]
    if extra:
        takes = ", ".join(OPTION_FLAGS[n] for n in wanted) or "only --init"
        raise UserError(f"{', '.join(extra)} does not apply to {'--mergekit' if args.mergekit else strategy} "
                        f"(it takes {takes})")
    missing = [OPTION_FLAGS[name] for name in wanted if name not in given]
    if missing:
        raise UserError(f"--strategy {strategy} needs {' and '.join(missing)}")
    return strategy, args.init or DEFAULT_INIT[strategy]
