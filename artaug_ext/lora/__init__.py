"""FLUX LoRA formats, exact merge / unmerge, combine and export (issue 3)."""

from .combine import LoRALayer, combine_loras, lora_layers, save_kohya, truncate_layer
from .formats import LoRAFormatError, UnsupportedLoRAError, parse_lora, read_lora
from .merge import LoRAHandle, LoRAReport, load_artaug, load_lora, unload_lora

__all__ = [
    "LoRAFormatError", "LoRAHandle", "LoRALayer", "LoRAReport", "UnsupportedLoRAError", "combine_loras",
    "load_artaug", "load_lora", "lora_layers", "parse_lora", "read_lora", "save_kohya", "truncate_layer",
    "unload_lora",
]
