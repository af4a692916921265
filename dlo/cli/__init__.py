"""The ``dlo`` command line: one module per subcommand, each exposing ``add_parser`` and ``run``."""

import argparse
import importlib
import sys

# Subcommand name -> module under dlo.cli that implements it.
COMMANDS = {"expand": "expand", "report": "report", "export": "export", "generate": "generate"}


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="dlo", description="Dynamic Layer Operation: expand a model's depth, then report on, export and "
        "generate with routed models. Training runs through `accelerate launch recipes/sft.py`.")
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"dlo.cli.{module_name}")
        module.add_parser(sub)
        modules[name] = module
    args = parser.parse_args(argv)
    try:
        return modules[args.command].run(args) or 0
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"dlo {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
