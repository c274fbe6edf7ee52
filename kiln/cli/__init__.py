"""The `kiln` command. Each subcommand is one module in this package whose docstring is its help."""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import traceback

from ..errors import KilnError

# The order subcommands appear in `kiln --help`; modules not listed here follow alphabetically.
ORDER = ["build", "run", "bench", "compare", "inspect", "doctor", "report", "ops"]


def _command_modules() -> list[str]:
    found = {m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_") and m.name != "args"}
    return [name for name in ORDER if name in found] + sorted(found - set(ORDER))


def make_parser() -> argparse.ArgumentParser:
    from . import args as shared

    parser = argparse.ArgumentParser(prog="kiln", description="kiln: build, run and check fast inference engines.")
    parser.add_argument("--version", action="store_true", help="print kiln's version and exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _command_modules():
        module = importlib.import_module(f"{__name__}.{name}")
        doc = (module.__doc__ or name).strip()
        sub = commands.add_parser(name, help=doc.splitlines()[0], description=doc,
                                  formatter_class=argparse.RawDescriptionHelpFormatter, parents=[shared.logging_group()])
        module.add_arguments(sub)
        sub.set_defaults(handler=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.version:
        from .. import __version__

        print(f"kiln {__version__}")
        return 0
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    from .. import log

    if args.verbose:
        log.set_level("verbose")
    try:
        if args.plugins:
            from ..plugins import load_plugin_modules

            load_plugin_modules(args.plugins)
        return int(args.handler(args) or 0)
    except KilnError as error:
        if args.debug:
            traceback.print_exc()
        print(f"kiln {args.command}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
