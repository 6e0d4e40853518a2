"""One place for each thing: one model table, one CLI, one error type, one definition of
each vocabulary; no test machinery in the product; no reference to files outside the repo."""

import ast
import logging
import os

import pytest
from helpers import REPO

PACKAGE = os.path.join(REPO, "artaug_ext")


def _modules(top=PACKAGE):
    for folder, _, files in os.walk(top):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                yield os.path.relpath(path, REPO), ast.parse(open(path, encoding="utf-8").read(), path)


def test_one_cli_package_and_no_argparse_in_the_library():
    for rel, tree in _modules():
        in_cli = rel.startswith(os.path.join("artaug_ext", "cli") + os.sep)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import) and any(a.name == "argparse" for a in node.names):
                assert in_cli, f"{rel} imports argparse: command-line code belongs in artaug_ext/cli/"
        for node in tree.body:  # module level
            if isinstance(node, ast.FunctionDef) and node.name == "main":
                assert in_cli, f"{rel} defines main(): the one entry point is artaug_ext.cli.main"
        for node in ast.walk(tree):
            if (isinstance(node, ast.Compare) and isinstance(node.left, ast.Name) and node.left.id == "__name__"
                    and not in_cli):
                raise AssertionError(f"{rel} runs as a script; use `artaug ...`")


def test_no_private_names_imported_across_modules():
    for rel, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.endswith("__")]
                assert not private, f"{rel} imports private names {private} from {node.module}"


def test_no_test_hooks_or_outside_references_in_the_product():
    for top in ("artaug_ext", "kernels", "recipes", "benchmarks"):
        for folder, _, files in os.walk(os.path.join(REPO, top)):
            for name in files:
                if name.endswith((".py", ".sh", ".toml", ".yaml", ".md")):
                    text = open(os.path.join(folder, name), encoding="utf-8").read()
                    rel = os.path.relpath(os.path.join(folder, name), REPO)
                    assert "DESIGN.md" not in text, f"{rel} cites a file that is not in the repository"
                    assert "_test_hook" not in text and "PAUSE_AT" not in text, f"{rel} holds test machinery"


def test_one_model_table_read_by_hub_pipeline_lora_and_cli():
    from artaug_ext import cards, hub, pipeline
    from artaug_ext.cli import build_parser

    assert pipeline.default_steps("flux-dev") == cards.card("flux-dev").defaults.steps == 30
    assert pipeline.default_size("tiny") == cards.card("tiny-v2").defaults.size
    assert hub.hub_lookup("DiffSynth-Studio/ArtAug-lora-FLUX.1dev-v1") is cards.card("artaug")
    assert cards.artaug_lora("flux-dev").name == cards.card("flux-dev").companion_lora
    gen = build_parser()._subparsers._group_actions[0].choices["generate"]
    model_choices = next(a.choices for a in gen._actions if a.dest == "model")
    assert sorted(model_choices) == cards.base_models()
    from artaug_ext.errors import UsageError

    with pytest.raises(UsageError, match="known: .*flux-dev"):
        cards.card("sdxl")


def test_one_colour_table():
    from artaug_ext import colours, scenes
    from artaug_ext.interact import critics
    from artaug_ext.tiny import vocab

    assert scenes.PALETTE == {n: colours.COLOURS[n] for n in colours.SCENE_COLOURS}
    assert set(colours.COLOURS) <= set(vocab.COLORS)
    assert critics.colour_name(colours.rgb255("cyan")) == "cyan"
    assert set(scenes.LIGHTING_PHRASES.values()) <= set(critics.LIGHTING_PHRASES)


def test_verbosity_flags_do_what_the_help_says():
    from artaug_ext.cli import setup_logging

    ours = logging.getLogger("artaug_ext")
    try:
        setup_logging(0)
        assert ours.level == logging.INFO
        setup_logging(1)
        assert ours.level == logging.DEBUG
    finally:
        ours.setLevel(logging.NOTSET)


def test_only_our_errors_become_one_liners(monkeypatch, capsys):
    """A bug (here a KeyError inside a command) keeps its traceback; our errors are one line."""
    from artaug_ext.cli import generate, main
    from artaug_ext.errors import UsageError

    def buggy(args):
        raise KeyError("a bug")

    monkeypatch.setattr(generate, "check", buggy)
    with pytest.raises(KeyError):
        main(["generate", "--prompt", "x"])

    def ours(args):
        raise UsageError("--prompt: bad")

    monkeypatch.setattr(generate, "check", ours)
    assert main(["generate", "--prompt", "x"]) == 2
    assert capsys.readouterr().err.strip() == "artaug: error: --prompt: bad"
