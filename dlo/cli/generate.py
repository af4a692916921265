"""``dlo generate``: complete a prompt with a routed (dlo) or plain/exported model."""

from __future__ import annotations

import math

import torch

from dlo.cli.common import add_model_arguments, check_minimums, find_model, load_model, load_tokenizer, resolve_device
from dlo.errors import UserError


def add_parser(subparsers):
    p = subparsers.add_parser("generate", help="Generate a completion; shows how many layers each token ran.",
                              description=__doc__)
    add_model_arguments(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--chat", action="store_true", help="Wrap the prompt as a user message (chat template).")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples.")
    p.add_argument("--seed", type=int, default=0)


def run(args):
    from dlo.export import merge_lora
    from dlo.modeling import decoder_layers, routed_layers

    # Cheap checks first: the model is loaded only for a call that can succeed.
    check_minimums(args, max_new_tokens=1)
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UserError(f"--temperature={args.temperature}: must be a number >= 0 (0 = greedy)")
    device, dtype = resolve_device(args.device, args.dtype)
    source = find_model(args.model, args.revision, args.gguf_file)
    positions = source.config.get("max_position_embeddings")
    if positions is not None and args.max_new_tokens >= positions:
        raise UserError(f"--max-new-tokens={args.max_new_tokens}: the model has max_position_embeddings="
                        f"{positions}, prompt included; valid: 1..{positions - 1}")
    tokenizer = load_tokenizer(source)
    ids = prompt_ids(tokenizer, args.prompt, args.chat, args.model)
    if positions is not None and ids.shape[1] + args.max_new_tokens > positions:
        raise UserError(f"--max-new-tokens={args.max_new_tokens}: the prompt takes {ids.shape[1]} of the model's "
                        f"max_position_embeddings={positions} positions; at most {positions - ids.shape[1]} new "
                        "tokens fit")
    model = merge_lora(load_model(source, device, dtype)).eval()
    routed = routed_layers(model)
    granularity = model.dlo_routing_config.granularity if routed else None
    ids = ids.to(device)
    torch.manual_seed(args.seed)
    sampling = {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {"do_sample": False}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                             use_cache=True, pad_token_id=pad, **sampling)
    new = out[0, ids.shape[1]:]
    print(tokenizer.decode(new, skip_special_tokens=True))
    if routed and new.numel():
        print()
        print(layer_shares(model, out, ids.shape[1], len(decoder_layers(model)), tokenizer, granularity))


def prompt_ids(tokenizer, prompt: str, chat: bool, model_name: str) -> torch.Tensor:
    """(1, T) token ids of the prompt, as a user message through the chat template when ``chat``."""
    if chat:
        if getattr(tokenizer, "chat_template", None) is None:
            raise UserError(f"--chat: the tokenizer of {model_name} has no chat template; drop --chat")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        raise UserError(f"--prompt {prompt!r}: tokenises to no tokens; give some text")
    return ids


@torch.no_grad()
def layer_shares(model, sequence: torch.Tensor, prompt_len: int, num_layers: int, tokenizer, granularity) -> str:
    """Per generated token, the share of layers it ran. One cache-free forward over the whole sequence
    gives the same decisions as decoding did: inference routing is causal."""
    from dlo.modeling import routed_layers

    records = model(sequence, use_cache=False, output_router_logits=True).routing
    routed = routed_layers(model)
    unrouted = num_layers - len(routed)
    runs = unrouted + sum(record.selected[0, prompt_len:].long() for record in records)
    what = "layers" if granularity == "block" else "MLPs (attention always runs with mlp routing)"
    lines = [f"{what} run per generated token (of {num_layers}; {len(routed)} routed):"]
    tokens = [tokenizer.decode([i]) for i in sequence[0, prompt_len:].tolist()]  # readable text, not BPE symbols
    for token, n in zip(tokens, runs.tolist()):
        lines.append(f"  {token!r:>16}  {n:>3}/{num_layers}  {n / num_layers:6.1%}")
    lines.append(f"  mean share: {runs.float().mean().item() / num_layers:.1%}")
    return "\n".join(lines)
