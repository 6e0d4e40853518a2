"""The ArtAug interaction loop: critique, regional enhancement, filtering, pair datasets.

Light imports only here (the parser); heavier pieces load on use:

    from artaug_ext.interact import parse_suggestions
    from artaug_ext.interact.critics import make_critic
    from artaug_ext.interact.enhance import enhance, regional_prompts
    from artaug_ext.interact.scorers import make_scorer
    from artaug_ext.interact.keep import FilterConfig, keep_pair
    from artaug_ext.interact.config import InteractConfig
    from artaug_ext.interact.loop import InteractRun, run_interact
    from artaug_ext.interact.manifest import merge_manifests, read_manifest
    from artaug_ext.interact.export import export_pairs
    from artaug_ext.interact.pairs import Pair, read_pairs
    from artaug_ext.interact.images import load_image, png_bytes
"""

from .parse import CATEGORIES, ParseResult, Suggestion, parse_suggestions

__all__ = ["CATEGORIES", "ParseResult", "Suggestion", "parse_suggestions"]
