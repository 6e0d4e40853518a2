"""Every example in README.md and docs/ works: the blocks are found here, so a block added to any
page is run without touching this file.

- ```python and ```bash blocks run, page by page in order, in a scratch folder of their own
  (Python blocks of a page share one namespace, as in a session), on the embedded tiny model,
  offline, with the shared model root of the tests (ARTAUG_HOME, see conftest.py).
- A block preceded by the line `<!-- docs-test: MARKS -->` is not run, MARKS naming why: `gpu`
  (needs a CUDA GPU), `download` (needs files from a hub) or `ci` (the set-up and test commands:
  .ci/run runs them, and each of them must be in .ci/run). It is still checked: Python is compiled, shell is checked by
  `bash -n`, and every `artaug ...` command (also after `torchrun ... -m artaug_ext.cli` or
  `accelerate launch ... -m artaug_ext.cli`) is parsed by the real `artaug` parser without
  running it; a recipe it names is read and checked.
- ```toml blocks name only recipe tables and keys that exist; inline `artaug ...` commands are
  parsed and inline `--options` must exist.
- docs/recipe-keys.md is what docs/gen_recipe_keys.py writes, and every recipe key has a meaning.

The scratch folder holds what the examples refer to as a user's would: `recipes/`, `docs/` and
`benchmarks/` (the repository's, read only), `prompts.txt` (three prompts of the tiny model's grammar) and
`artaug-demo/final/lora.safetensors` (a small LoRA for the tiny DiT in kohya format, standing in
for what `artaug demo` writes; CI runs the demo itself once, not here). See docs/contributing.md.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass

import pytest
from helpers import MICRO_PROMPTS, REPO, child_env

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PAGES = ["README.md"] + sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "**", "*.md"),
                                                                         recursive=True))
RUNNABLE = ("python", "bash")
LANGUAGES = (*RUNNABLE, "toml", "text", "json", "yaml")
MARKS = {"gpu": "needs a CUDA GPU", "download": "needs model files from a hub",
         "ci": "the set-up and test commands, which .ci/run itself runs (not again inside the tests)"}
# Options of other tools that the pages show (not `artaug`'s): the tool, for the reader of this list.
OTHER_OPTIONS = {
    "--nproc_per_node": "torchrun", "--nnodes": "torchrun", "--node_rank": "torchrun", "--master_addr": "torchrun",
    "--master_port": "torchrun", "--config_file": "accelerate launch", "--machine_rank": "accelerate launch",
    "--main_process_ip": "accelerate launch", "--tensor-parallel-size": "vllm serve", "--port": "vllm serve",
    "--split": "benchmarks/bench_method.py", "--full-res": "benchmarks/bench_method.py",
    **{opt: "benchmarks/bench_method.py" for opt in (
        "--mode", "--keep", "--rounds", "--train-prompts", "--lr", "--dpo-beta", "--dpo-betas", "--dpo-sft-weight",
        "--dpo-sft-weights", "--scored-arm", "--recipe", "--prior-dev-configs", "--arm")},
    "--items": "benchmarks/bench_interact.py",
    "--heldout": "benchmarks/critic_on_renders.py", "--multi": "benchmarks/critic_on_renders.py",
    "--finetune-dit": "recipes/train_tiny.py", "--strict": "mkdocs build", "--check": "docs/gen_recipe_keys.py",
}

# A fence, with the marker comment on the line before it when the block is not to be run.
FENCE = re.compile(r"^(?:<!-- docs-test: (?P<marks>[^>]*?) -->\n)?```(?P<info>[^\n`]*)\n(?P<body>.*?)^```[ \t]*$",
                   re.M | re.S)
INLINE = re.compile(r"(?<!`)`([^`]+)`(?!`)")


@dataclass
class Block:
    page: str
    line: int
    language: str
    marks: tuple[str, ...]
    body: str

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def blocks_of(page: str) -> list[Block]:
    text = open(os.path.join(REPO, page), encoding="utf-8").read()
    out = []
    for m in FENCE.finditer(text):
        words = m.group("info").split()
        assert len(words) <= 1, f"{page}: a fence's info string is its language only, got {m.group('info')!r}"
        out.append(Block(page, text.count("\n", 0, m.start()) + 1, words[0] if words else "",
                         tuple((m.group("marks") or "").split()), m.group("body")))
    return out


ALL_BLOCKS = [b for page in PAGES for b in blocks_of(page)]


def prose_of(page: str) -> str:
    """The page without its fenced blocks."""
    return FENCE.sub("", open(os.path.join(REPO, page), encoding="utf-8").read())


# ------------------------------------------------------------------------ what runs, what is marked

def test_every_block_names_its_language_and_only_known_marks():
    for page in PAGES:  # a marker must sit right above a fence, or it would mark nothing
        text = open(os.path.join(REPO, page), encoding="utf-8").read()
        for m in re.finditer(r"^<!-- docs-test:[^\n]*\n(.*)", text, re.M):
            assert m.group(1).startswith("```"), f"{page}: a docs-test marker must be right above a fence"
    for b in ALL_BLOCKS:
        assert b.language in LANGUAGES, f"{b.id}: a fence needs a language ({', '.join(LANGUAGES)}), got {b.language!r}"
        unknown = set(b.marks) - set(MARKS)
        assert not unknown, f"{b.id}: unknown mark(s) {sorted(unknown)}; marks are {', '.join(MARKS)}"
        if b.marks:
            assert b.language in RUNNABLE, f"{b.id}: only python and bash blocks take a mark"


def test_block_counts(capsys):
    """The count of runnable and marked blocks (printed for the report; -s shows it)."""
    runnable = [b for b in ALL_BLOCKS if b.language in RUNNABLE]
    marked = [b for b in runnable if b.marks]
    with capsys.disabled():
        reasons = {m: sum(m in b.marks for b in marked) for m in MARKS}
        print(f"\ndoc blocks: {len(runnable) - len(marked)} run, {len(marked)} marked ({reasons}), "
              f"{len(ALL_BLOCKS) - len(runnable)} other (toml/text...), on {len(PAGES)} pages")
    assert len(runnable) - len(marked) >= 10  # the pages are examples, not prose: most of them run


# ------------------------------------------------------------------------ checking without running

def _commands(script: str, *, refused_too: bool = True) -> list[list[str]]:
    """Every simple command of a shell script as its words (heredoc bodies skipped); without
    `refused_too`, not those followed by `||` (an example of an error, shown failing on purpose)."""
    lines, skip_until = [], None
    for line in script.replace("\\\n", " ").splitlines():
        if skip_until is not None:
            if line.strip() == skip_until:
                skip_until = None
            continue
        heredoc = re.search(r"<<-?\s*['\"]?(\w+)['\"]?", line)
        if heredoc:
            skip_until = heredoc.group(1)
        lines.append(line)
    commands = []
    for line in lines:
        tokens = shlex.split(line, comments=True)
        current: list[str] = []
        for tok in tokens + [";"]:
            if tok in ("&&", "||", ";", "|", "&"):
                if current and (refused_too or tok != "||"):
                    commands.append(current)
                current = []
            else:
                current.append(tok)
    return commands


def _artaug_commands(script: str) -> list[list[str]]:
    """The argument lists of every `artaug` command of a shell script (but those shown failing)."""
    out = []
    for cmd in _commands(script, refused_too=False):
        while cmd and re.match(r"^[A-Z_][A-Z0-9_]*=", cmd[0]):  # VAR=value prefixes
            cmd = cmd[1:]
        if cmd and cmd[0] == "artaug":
            out.append(cmd[1:])
        elif "artaug_ext.cli" in cmd and cmd[cmd.index("artaug_ext.cli") - 1] == "-m":
            out.append(cmd[cmd.index("artaug_ext.cli") + 1:])
    return out


def _parse(argv: list[str], where: str) -> None:
    """`argv` through the real `artaug` parser, run nothing; a recipe it names is read."""
    from artaug_ext.cli import build_parser

    if {"-h", "--help", "--version"} & set(argv):
        argv = argv[:min(argv.index(a) for a in ("-h", "--help", "--version") if a in argv)]
        if not argv:
            return
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{where}: `artaug {shlex.join(argv)}` does not parse (exit {e.code}); see the message above")
    if args.command == "run" and os.path.isfile(os.path.join(REPO, args.recipe)):
        from artaug_ext.recipe.config import load_recipe

        load_recipe(os.path.join(REPO, args.recipe))


@pytest.mark.parametrize("block", [b for b in ALL_BLOCKS if b.language in RUNNABLE], ids=lambda b: b.id)
def test_block_parses(block):
    """Every python and bash block, marked or not: compiled / `bash -n`, and its artaug commands parsed."""
    if block.language == "python":
        compile(block.body, block.id, "exec")
        return
    proc = subprocess.run(["bash", "-n"], input=block.body, text=True, capture_output=True)
    assert proc.returncode == 0, f"{block.id}: bash syntax: {proc.stderr}"
    for argv in _artaug_commands(block.body):
        _parse(argv, block.id)
    if "ci" in block.marks:
        ci = [shlex.split(line) for line in open(os.path.join(REPO, ".ci", "run"), encoding="utf-8")
              if line.strip() and not line.lstrip().startswith("#")]
        for cmd in _commands(block.body):
            assert any(_in_order(cmd, line) for line in ci), f"{block.id}: `{shlex.join(cmd)}` is not what .ci/run runs"


def _in_order(words: list[str], line: list[str]) -> bool:
    """`words` appear in `line` in this order (other words, such as -q, may come between)."""
    it = iter(line)
    return all(any(w == x for x in it) for w in words)


def _recipe_schema() -> dict[str, set[str]]:
    from artaug_ext.recipe.config import _SECTIONS

    return {name: {f.name for f in dataclasses.fields(cls)} for name, cls in _SECTIONS.items()}


@pytest.mark.parametrize("block", [b for b in ALL_BLOCKS if b.language == "toml"], ids=lambda b: b.id)
def test_toml_blocks_name_existing_recipe_keys(block):
    schema = _recipe_schema()
    data = tomllib.loads(block.body)
    for table, keys in data.items():
        assert table in schema, f"{block.id}: no recipe table [{table}]"
        for key in keys:
            assert key in schema[table], f"{block.id}: [{table}] has no key {key!r}"


def _subcommands() -> dict[str, set[str]]:
    """{command: its options} of `artaug`."""
    import argparse

    from artaug_ext.cli import build_parser

    return {name: {s for action in sub._actions for s in action.option_strings}
            for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction) for name, sub in a.choices.items()}


def _all_options() -> set[str]:
    import argparse

    from artaug_ext.cli import build_parser

    found = set()
    todo = [build_parser()]
    while todo:
        parser = todo.pop()
        for action in parser._actions:
            found.update(s for s in action.option_strings if s.startswith("--"))
            if isinstance(action, argparse._SubParsersAction):
                todo.extend(action.choices.values())
    return found


@pytest.mark.parametrize("page", PAGES)
def test_inline_commands_and_options_exist(page):
    """`artaug COMMAND --option ...` in the prose names a command and its options that exist; every
    other `--option` is an option of some artaug command (or of another tool in OTHER_OPTIONS)."""
    options = _all_options()
    for span in INLINE.findall(prose_of(page)):
        span = " ".join(span.split())
        if span.startswith("artaug "):  # often a fragment in the prose: the command and its options exist
            sub, *rest = span.split()[1:] or [""]
            if not sub.startswith("-"):
                commands = _subcommands()
                assert sub in commands, f"{page}: `{span}`: artaug has no command {sub!r}"
                for opt in re.findall(r"(?:^|[\s/\[])(--[a-z][a-z0-9_-]*)", " ".join(rest)):
                    assert opt in commands[sub], f"{page}: `{span}`: `artaug {sub}` has no option {opt}"
        for opt in re.findall(r"(?:^|[\s/\[])(--[a-z][a-z0-9_-]*)", span):
            assert opt in options or opt in OTHER_OPTIONS, f"{page}: `{span}`: {opt} is no option of artaug"


def test_every_figure_of_the_readme_is_in_the_manual():
    """The README is a front door: a figure it gives is also on the page that explains it."""
    prose = re.sub(r"\]\([^)]*\)", "]", prose_of("README.md"))  # not the link targets
    manual = "".join(open(os.path.join(REPO, p), encoding="utf-8").read() for p in PAGES if p != "README.md")
    missing = sorted({n for n in re.findall(r"\d+(?:\.\d+)?%?", prose) if n not in manual})
    assert not missing, f"README figures found on no page of docs/: {missing}"


def test_recipe_keys_page_is_generated_from_the_schema():
    sys.path.insert(0, os.path.join(REPO, "docs"))
    try:
        import gen_recipe_keys
    finally:
        sys.path.pop(0)
    committed = open(gen_recipe_keys.PAGE, encoding="utf-8").read()
    assert committed == gen_recipe_keys.render(), "docs/recipe-keys.md is stale: run `python docs/gen_recipe_keys.py`"


def test_every_recipe_key_has_a_meaning():
    from artaug_ext.recipe.keys import KEY_MEANINGS, SECTION_MEANINGS

    schema = _recipe_schema()
    assert set(SECTION_MEANINGS) == set(schema), "artaug_ext/recipe/keys.py: SECTION_MEANINGS and the tables differ"
    for table, keys in schema.items():
        described = KEY_MEANINGS.get(table, {})
        missing = sorted(keys - {k for k, v in described.items() if v.strip()})
        assert not missing, f"[{table}] keys without a meaning in artaug_ext/recipe/keys.py: {missing}"
        stale = sorted(set(described) - keys)
        assert not stale, f"artaug_ext/recipe/keys.py describes [{table}] keys that do not exist: {stale}"


def test_the_test_notices_an_undescribed_key(monkeypatch):
    """A key added to the schema without a meaning fails the check above."""
    from artaug_ext.recipe import config

    @dataclasses.dataclass
    class Grown(config.EnhanceSection):
        blur_sigma: float = 10.0

    monkeypatch.setitem(config._SECTIONS, "enhance", Grown)
    with pytest.raises(AssertionError, match="blur_sigma"):
        test_every_recipe_key_has_a_meaning()


def test_command_checks_catch_a_removed_option():
    with pytest.raises(pytest.fail.Exception):
        _parse(["generate", "--model", "tiny", "--no-such-option"], "self-check")
    assert _artaug_commands("X=1 artaug run r.toml --dry-run && \\\n  torchrun --nproc_per_node 2 -m artaug_ext.cli "
                            "eval --seeds 2 # note\ncat > a <<EOF\nartaug nothing\nEOF\n") == \
        [["run", "r.toml", "--dry-run"], ["eval", "--seeds", "2"]]


# ------------------------------------------------------------------------ running

def _tiny_lora(path: str) -> None:
    """A kohya-format LoRA for the tiny DiT (small, so images stay close to the base), shaped
    from the tiny model's own files in the shared model root."""
    import torch
    from helpers import tiny_folder
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(os.path.join(tiny_folder("tiny"), "flux1-dev.safetensors"), "pt") as f:
        shapes = {key: f.get_slice(f"{key}.weight").get_shape()
                  for key in ("double_blocks.0.img_attn.qkv", "single_blocks.1.linear1")}
    g = torch.Generator().manual_seed(0)
    sd = {}
    for key, (out_f, in_f) in shapes.items():
        name = key.replace(".", "_")
        sd[f"lora_unet_{name}.lora_down.weight"] = (torch.randn(4, in_f, generator=g) * 0.1).to(torch.bfloat16)
        sd[f"lora_unet_{name}.lora_up.weight"] = (torch.randn(out_f, 4, generator=g) * 0.1).to(torch.bfloat16)
        sd[f"lora_unet_{name}.alpha"] = torch.tensor(4.0)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file(sd, path)


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("doc_lora") / "lora.safetensors")
    _tiny_lora(path)
    return path


def _scratch(folder, lora_file: str) -> str:
    for name in ("recipes", "docs", "benchmarks"):  # read only by the examples
        os.symlink(os.path.join(REPO, name), os.path.join(folder, name))
    with open(os.path.join(folder, "prompts.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(MICRO_PROMPTS) + "\n")
    os.makedirs(os.path.join(folder, "artaug-demo", "final"))
    shutil.copy(lora_file, os.path.join(folder, "artaug-demo", "final", "lora.safetensors"))
    return str(folder)


PAGES_WITH_RUNNABLE = [p for p in PAGES if any(b.page == p and b.language in RUNNABLE and not b.marks for b in ALL_BLOCKS)]


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES_WITH_RUNNABLE)
def test_page_blocks_run(page, tmp_path, lora_file, monkeypatch, one_thread):
    """The page's unmarked python and bash blocks, in order, as a reader would run them."""
    folder = _scratch(tmp_path, lora_file)
    monkeypatch.chdir(folder)
    env = child_env()
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    namespace: dict = {"__name__": "__main__"}
    for b in (b for b in ALL_BLOCKS if b.page == page and b.language in RUNNABLE and not b.marks):
        if b.language == "python":
            exec(compile(b.body, b.id, "exec"), namespace)
            continue
        proc = subprocess.run(["bash", "-euo", "pipefail"], input=b.body, text=True, capture_output=True, env=env,
                              cwd=folder, timeout=600)
        assert proc.returncode == 0, f"{b.id} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


# ------------------------------------------------------------------------ the public API's docstrings

def _public_functions():
    import inspect

    import artaug_ext

    for name in artaug_ext.__all__:
        obj = getattr(artaug_ext, name)
        if inspect.isfunction(obj):
            yield name, obj


def test_public_functions_have_complete_docstrings():
    """Every function of `artaug_ext.__all__` documents each argument, what it returns and an example."""
    import inspect

    names = []
    for name, fn in _public_functions():
        names.append(name)
        doc = inspect.getdoc(fn) or ""
        params = [p for p in inspect.signature(fn).parameters if p not in ("self", "cls")]
        if params:
            assert "Args:" in doc, f"artaug_ext.{name}: no Args section"
            args = doc.split("Args:", 1)[1]
            missing = [p for p in params if not re.search(rf"^\s+{p}:", args, re.M)]
            assert not missing, f"artaug_ext.{name}: arguments without a description: {missing}"
        for section in ("Returns:", "Example:"):
            assert section in doc or (section == "Returns:" and inspect.signature(fn).return_annotation in (None, "None")), \
                f"artaug_ext.{name}: no {section[:-1]} section"
    assert {"load_pipeline", "generate", "load_lora", "unload_lora", "load_artaug", "combine_loras", "save_kohya",
            "apply_kernels"} <= set(names)


@pytest.mark.slow
def test_public_docstring_examples_run(one_thread, tmp_path, monkeypatch):
    """The examples in the public docstrings (those not marked `doctest: +SKIP`: they need a
    download or a file of the user's) run on the tiny model."""
    import doctest

    monkeypatch.chdir(tmp_path)
    finder = doctest.DocTestFinder(recurse=False)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    tried = 0
    for name, fn in _public_functions():
        for test in finder.find(fn, f"artaug_ext.{name}", globs={}):
            tried += sum(not ex.options.get(doctest.SKIP) for ex in test.examples)
            runner.run(test)
    assert runner.failures == 0, f"{runner.failures} docstring example(s) failed (output above)"
    assert tried >= 10
