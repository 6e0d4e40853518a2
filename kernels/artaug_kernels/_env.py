"""Process-wide switches of the Triton kernels."""

import os

# What Triton itself accepts as true for TRITON_INTERPRET (triton.knobs: env_bool).
_TRUE = ("1", "true", "yes", "on", "y")


def interpreter_mode() -> bool:
    """True when Triton runs kernels on CPU through its interpreter. Parsed as Triton parses
    it, so our bf16 work-arounds and CPU dispatch switch on exactly when Triton's interpreter
    does. Triton reads it when a kernel is decorated, so it must match how the process started."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in _TRUE
