"""`artaug download`: prefetch a model into the model root."""

from __future__ import annotations

from .args import check_output_dir


def add_parser(sub) -> None:
    from ..cards import CARDS

    names = ", ".join(n for n, c in CARDS.items() if c.modelscope_id)
    dl = sub.add_parser("download", help="prefetch a model into the model root (needs network)")
    dl.add_argument("model_id", help=f"a model name ({names}) or any hub id such as "
                    "DiffSynth-Studio/ArtAug-lora-FLUX.1dev-v1")
    dl.add_argument("--files", nargs="+", default=None, help="file patterns to fetch (default: the card's files, else all)")
    dl.add_argument("--model-dir", default=None, help="model root to download into")
    dl.add_argument("--revision", default=None)
    dl.set_defaults(run=run)


def run(args) -> int:
    from ..hub import download, model_root

    check_output_dir("--model-dir" if args.model_dir else "model root", model_root(args.model_dir))
    found = download(args.model_id, args.files, model_dir=args.model_dir, revision=args.revision)
    for pattern, paths in found.items():
        for p in paths:
            print(f"{pattern}: {p}")
    return 0
