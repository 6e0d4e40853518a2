from ._env import interpreter_mode  # noqa: F401
from .lora_merge import LoRAMergeOverflowError, lora_merge_, lora_merge_grouped_  # noqa: F401  (no Triton import until first use)
