"""The ``dlo`` command line: one module per subcommand, each exposing ``add_parser`` and ``run``.

A user mistake (bad option, path, file) ends as ``dlo <command>: error: <message>`` and exit code 2
(dlo/errors.py); ``--debug`` or ``DLO_DEBUG=1`` keeps the traceback instead.
"""

import argparse
import importlib
import sys

from dlo.errors import run_entry_point

# Subcommand name -> module under dlo.cli that implements it.
COMMANDS = {"convert": "convert", "expand": "expand", "report": "report", "export": "export", "generate": "generate"}
DEBUG_HELP = "Show the full traceback of an error (also DLO_DEBUG=1)."


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="dlo", description="Dynamic Layer Operation: expand a model's depth, then report on, export and "
        "generate with routed models. Training runs through `accelerate launch recipes/sft.py`.")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"dlo.cli.{module_name}")
        module.add_parser(sub)
        # Accepted after the subcommand too; SUPPRESS keeps a `dlo --debug ...` from being reset to False.
        sub.choices[name].add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
        modules[name] = module
    args = parser.parse_args(argv)
    return run_entry_point(lambda: modules[args.command].run(args), prog=f"dlo {args.command}", debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
