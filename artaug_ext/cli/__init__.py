"""The `artaug` command: one parser, one entry point, one error type.

Nothing in the library imports this package. Building the parser imports neither torch nor
DiffSynth, so `artaug --help` and argument errors answer at once; each subcommand imports
what it needs when it runs. Our own errors (`artaug_ext.errors.ArtaugError`) are printed as
one line with exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import sys

from .. import __version__
from ..errors import ArtaugError
from .args import Parser

# Subcommand modules, in the order `artaug --help` lists them; each has add_parser(s)(sub)
# and sets `run` on its parsers.
_COMMANDS = ("generate", "download", "interact", "run", "demo", "eval", "eval_tiny")


def build_parser() -> Parser:
    import importlib

    parser = Parser(prog="artaug", description="ArtAug for FLUX.1 on DiffSynth-Studio")
    parser.add_argument("--version", action="version", version=f"artaug-ext {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="-v: debug messages of artaug; -vv: of every library too")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for name in _COMMANDS:
        module = importlib.import_module(f".{name}", __name__)
        (getattr(module, "add_parser", None) or module.add_parsers)(sub)
    return parser


def setup_logging(verbose: int) -> None:
    """Our messages at INFO (DEBUG with -v); other libraries' at WARNING (DEBUG with -vv)."""
    logging.basicConfig(level=logging.DEBUG if verbose >= 2 else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("artaug_ext").setLevel(logging.DEBUG if verbose >= 1 else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        return args.run(args)
    except ArtaugError as e:
        print(f"artaug: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("artaug: interrupted", file=sys.stderr)
        return 130
