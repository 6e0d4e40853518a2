"""Register our models into DiffSynth the moment DiffSynth's model registry is imported.

`import artaug_ext` must stay cheap (the `artaug` command starts with it, and importing
DiffSynth costs seconds), yet a DiffSynth user who imports artaug_ext and then calls
`FluxImagePipeline.from_pretrained` on our files must find our models registered. So
instead of importing DiffSynth, `install()` puts a finder first on `sys.meta_path` that
lets the normal import of `diffsynth.configs` run and then appends our entries to its
`MODEL_CONFIGS` (DiffSynth's loader reads that list at load time). If DiffSynth's registry
is already imported, registration happens at once. Our own loaders also call `register()`
(idempotent), so they never depend on the hook.
"""

from __future__ import annotations

import importlib.abc
import logging
import sys

logger = logging.getLogger(__name__)

TARGET = "diffsynth.configs"


def _register() -> None:
    from .registry import register

    try:
        register()
    except Exception as e:  # never break the user's import of DiffSynth; our loaders register again and raise
        logger.warning("artaug-ext could not register its models into DiffSynth: %s: %s", type(e).__name__, e)


class _RegisteringLoader(importlib.abc.Loader):
    """Runs the real loader of `diffsynth.configs`, then registers."""

    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        _register()


class RegisterOnImport(importlib.abc.MetaPathFinder):
    """Finds `diffsynth.configs` through the other finders and wraps its loader."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


def install() -> None:
    """Register now if DiffSynth's registry is imported, else when it is (idempotent)."""
    if TARGET in sys.modules:
        _register()
    elif not any(isinstance(f, RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, RegisterOnImport())
