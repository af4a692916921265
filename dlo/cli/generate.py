"""``dlo generate``: complete a prompt with a routed (dlo) or plain/exported model."""

from __future__ import annotations

import torch

from dlo.cli.common import add_model_arguments, load_model_and_tokenizer, resolve_device


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

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens={args.max_new_tokens}: must be >= 1")
    if args.temperature < 0:
        raise ValueError(f"--temperature={args.temperature}: must be >= 0")
    device, dtype = resolve_device(args.device, args.dtype)
    model, tokenizer = load_model_and_tokenizer(args.model, device, dtype)
    model = merge_lora(model).eval()
    routed = routed_layers(model)
    granularity = model.dlo_routing_config.granularity if routed else None
    if args.chat:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(f"--chat: the tokenizer in {args.model} has no chat template")
        text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    else:
        ids = tokenizer(args.prompt, return_tensors="pt")["input_ids"]
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


@torch.no_grad()
def layer_shares(model, sequence: torch.Tensor, prompt_len: int, num_layers: int, tokenizer, granularity) -> str:
    """Per generated token, the share of layers it ran. One cache-free forward over the whole sequence
    gives the same decisions as decoding did: inference routing is causal."""
    from dlo.modeling import routed_layers

    model(sequence, use_cache=False)
    routed = routed_layers(model)
    unrouted = num_layers - len(routed)
    runs = unrouted + sum(layer.last.selected[0, prompt_len:].long() for layer in routed)
    what = "layers" if granularity == "block" else "MLPs (attention always runs with mlp routing)"
    lines = [f"{what} run per generated token (of {num_layers}; {len(routed)} routed):"]
    tokens = [tokenizer.decode([i]) for i in sequence[0, prompt_len:].tolist()]  # readable text, not BPE symbols
    for token, n in zip(tokens, runs.tolist()):
        lines.append(f"  {token!r:>16}  {n:>3}/{num_layers}  {n / num_layers:6.1%}")
    lines.append(f"  mean share: {runs.float().mean().item() / num_layers:.1%}")
    return "\n".join(lines)
