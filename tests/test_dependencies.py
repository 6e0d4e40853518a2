"""Every third-party module the package imports is declared, so a fresh install has it.

A module that happened to be installed already (scipy, once) hid a missing declaration:
here every import statement of artaug_ext/ and kernels/, lazy ones inside functions included,
is mapped to the distribution that provides it and looked up in the installed metadata of
artaug-ext (install_requires and every extra)."""

import ast
import importlib.metadata as md
import os
import re
import sys

from helpers import REPO

# Imports that are not distributions: our own packages.
OURS = {"artaug_ext", "artaug_kernels"}


def _imported_top_levels() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for top in ("artaug_ext", "kernels"):
        for folder, _, files in os.walk(os.path.join(REPO, top)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(folder, name)
                tree = ast.parse(open(path, encoding="utf-8").read(), path)
                for node in ast.walk(tree):
                    if isinstance(node, ast.Import):
                        mods = [a.name for a in node.names]
                    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                        mods = [node.module]
                    else:
                        continue
                    for m in mods:
                        found.setdefault(m.split(".")[0], []).append(os.path.relpath(path, REPO))
    return found


def _declared() -> set[str]:
    names = set()
    for req in md.requires("artaug-ext") or []:
        names.add(re.split(r"[ ;<>=!~\[]", req, maxsplit=1)[0].lower().replace("_", "-"))
    return names


def test_every_third_party_import_is_declared():
    providers = md.packages_distributions()
    declared = _declared()
    missing = {}
    for module, where in sorted(_imported_top_levels().items()):
        if module in OURS or module in sys.stdlib_module_names or module == "__future__":
            continue
        dists = {d.lower().replace("_", "-") for d in providers.get(module, [])}
        if module == "tomli":  # the stdlib's tomllib on Python >= 3.11; declared for 3.10
            dists = {"tomli"}
        assert dists, f"{module} (imported in {where[0]}) is installed by no distribution here"
        if not dists & declared:
            missing[module] = (sorted(dists), where[0])
    assert not missing, f"imported but not declared in setup.py: {missing}"
