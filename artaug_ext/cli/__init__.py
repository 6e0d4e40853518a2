"""The `artaug` command: one parser, one entry point, one error type.

Nothing in the library imports this package. Building the parser imports neither torch nor
DiffSynth, so `artaug --help` and argument errors answer at once; each subcommand imports
what it needs when it runs. Our own errors (`artaug_ext.errors.ArtaugError`) are printed as
one line with exit status 2; anything else is a bug and keeps its traceback.

Under torchrun or `accelerate launch` one launch writes one log: the main process logs its
steps, progress bars and summary; every other rank logs only warnings and errors, prefixed
with its rank. A collective that loses a peer, and a rank its launcher terminates, end in one
line naming the rank that stopped (exit status 2), never a traceback.
"""

from __future__ import annotations

import logging
import signal
import sys

from .. import __version__
from ..dist import DEFAULT_COLLECTIVE_TIMEOUT, Launch, ProcessInfo, peer_failure, process_info
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


def setup_logging(verbose: int, info: ProcessInfo | None = None) -> None:
    """Our messages at INFO (DEBUG with -v); other libraries' at WARNING (DEBUG with -vv). On a
    rank other than the main process: warnings and errors only, prefixed with the rank."""
    main = info is None or info.main
    prefix = "" if main else f"rank {info.rank}: "
    logging.basicConfig(level=logging.DEBUG if verbose >= 2 and main else logging.WARNING,
                        format=prefix + "%(levelname)s %(name)s: %(message)s")
    ours = logging.DEBUG if verbose >= 1 else logging.INFO
    logging.getLogger("artaug_ext").setLevel(ours if main else logging.WARNING)
    if verbose < 2:  # torchao (the quant extra) registers Enums that torch now handles itself: a deprecation per Enum
        logging.getLogger("torch.utils._pytree").addFilter(_not_torchao_enum_notice)


def _not_torchao_enum_notice(record: logging.LogRecord) -> bool:
    return "is an Enum subclass and is now natively supported by torch.compile" not in record.getMessage()


class LauncherStop(BaseException):
    """SIGTERM from the launcher (torchrun's agent stops every rank when one fails)."""


def _stop(signum, frame):
    raise LauncherStop()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        info = process_info()
    except ArtaugError as e:
        print(f"artaug: error: {e}", file=sys.stderr)
        return 2
    setup_logging(args.verbose, info)
    args.launch = launch = Launch(info, getattr(args, "collective_timeout", DEFAULT_COLLECTIVE_TIMEOUT))
    if info.world > 1:
        signal.signal(signal.SIGTERM, _stop)
    ending = "failed"  # the heartbeat's last word, for the other ranks
    try:
        code = args.run(args)
        ending = None
        return code
    except ArtaugError as e:
        launch.stop_watching()
        print(f"artaug: error: {e}", file=sys.stderr)
        return 2
    except LauncherStop:
        launch.stop_watching()
        ending = "terminated"
        print(f"artaug: error: {launch.stopped_by_launcher()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        launch.stop_watching()
        if launch.quiet_peer is not None:  # not the user: the heartbeat's thread saw a rank stop
            ending = "lost-peer"
            print(f"artaug: error: {launch.lost_peer(launch.quiet_peer)}", file=sys.stderr)
            return 2
        print("artaug: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        launch.stop_watching()
        cause = peer_failure(e, launch.timeout) if info.world > 1 else None
        if cause is None:
            raise
        ending = "lost-peer"
        print(f"artaug: error: {launch.lost_peer(cause)}", file=sys.stderr)
        return 2
    finally:
        launch.close(ending)
