"""``dlo convert``: a GGUF file into a safetensors checkpoint with its tokenizer, chat template and generation
config (dlo/gguf.py), for plain transformers and every other dlo command.

Every command already takes a GGUF file as ``--model`` and converts it once into the cache; ``convert`` writes the
checkpoint where you choose instead (``make real-model`` writes SmolLM2-135M-Instruct this way). Running it again
on the same, unchanged file does nothing.
"""

from __future__ import annotations

import os

from dlo.checkpoints import check_output_dir
from dlo.errors import UserError
from dlo.gguf import converted_from, gguf_checkpoint, gguf_source, is_gguf_reference


def add_parser(subparsers):
    p = subparsers.add_parser("convert", help="Convert a GGUF file into a safetensors checkpoint.",
                              description=__doc__)
    p.add_argument("--model", required=True, help="The GGUF file (a path ending in .gguf).")
    p.add_argument("--output", required=True, help="Directory of the checkpoint (written atomically).")
    p.add_argument("--force", action="store_true", help="Replace a non-empty output that is no earlier conversion.")


def run(args):
    if not is_gguf_reference(args.model):
        raise UserError(f"--model {args.model!r}: not a GGUF file (the name must end in .gguf)")
    source = gguf_source(args.model)
    output = os.path.abspath(args.output)
    previous = converted_from(output)
    if previous == source:
        print(f"{output} is already the conversion of {source['gguf_file']}: nothing to do")
        return
    if previous is None:
        check_output_dir(output, args.force, inputs=[source["gguf_file"]])
    gguf_checkpoint(source["gguf_file"], output, force=args.force)
    print(f"wrote {output}: loads with AutoModelForCausalLM.from_pretrained and every dlo command")
