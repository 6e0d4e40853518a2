"""FLUX LoRA formats, exact merge / unmerge, combine and export."""

from .combine import LoRALayer, combine_loras, lora_layers, save_kohya, truncate_layer
from .formats import LoRAFormatError, UnsupportedLoRAError, parse_lora, read_lora
from .merge import LoRAHandle, LoRAMergeError, LoRAReport, load_artaug, load_lora, loaded_loras, unload_lora

__all__ = [
    "LoRAFormatError", "LoRAHandle", "LoRALayer", "LoRAReport", "UnsupportedLoRAError", "combine_loras",
    "LoRAMergeError", "load_artaug", "load_lora", "loaded_loras", "lora_layers", "parse_lora", "read_lora", "save_kohya", "truncate_layer",
    "unload_lora",
]
