"""The architecture table (docs/architecture.md) is what the code does: `.importlinter` holds it as
contracts (floors, no cycles at any depth, kernels apart), checked here with the field's own
tool, and every floor and module of the table is a layer of the contract at the same height."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys

from helpers import REPO


def _readme_floors() -> dict[str, int]:
    """{module: floor} from the architecture table of docs/architecture.md."""
    text = open(os.path.join(REPO, "docs", "architecture.md"), encoding="utf-8").read()
    table = text[text.index("| floor | module | what |"):]
    floors = {}
    for line in table.splitlines()[2:]:
        if not line.startswith("|"):
            break
        floor, modules = line.split("|")[1:3]
        for path in re.findall(r"`([^`]+)`", re.sub(r"\(import `\w+`\)", "", modules)):
            if path.endswith("kernels/artaug_kernels/"):
                name = "artaug_kernels"
            else:
                path = path if path.startswith(("artaug_ext/", "kernels/")) else "artaug_ext/" + path
                name = path.rstrip("/").removesuffix(".py").replace("/", ".")
            floors[name] = int(floor)
    return floors


def _contract_layers() -> list[list[str]]:
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, ".importlinter"))
    lines = [x.strip() for x in cfg["importlinter:contract:floors"]["layers"].splitlines() if x.strip()]
    return [[m.strip() for m in re.split(r"[|:]", line)] for line in lines]


def test_the_readme_table_and_the_contract_list_the_same_floors():
    floors = _readme_floors()
    layers = _contract_layers()
    in_contract = {m: len(layers) - i for i, layer in enumerate(layers) for m in layer}
    assert floors == in_contract, "docs/architecture.md's table and .importlinter's layers differ"
    # every module of the package has a floor
    top = {n.removesuffix(".py") for n in os.listdir(os.path.join(REPO, "artaug_ext"))
           if (n.endswith(".py") and n != "__init__.py") or os.path.isfile(os.path.join(REPO, "artaug_ext", n, "__init__.py"))}
    assert {f"artaug_ext.{n}" for n in top} == {m for m in floors if m.startswith("artaug_ext.")}


def test_import_contracts_hold():
    exe = shutil.which("lint-imports", path=os.path.dirname(sys.executable)) or shutil.which("lint-imports")
    assert exe, "lint-imports is missing: pip install -e '.[test]'"
    proc = subprocess.run([exe], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "3 kept, 0 broken" in proc.stdout
