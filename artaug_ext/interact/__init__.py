"""The ArtAug interaction loop: critique, regional enhancement, filtering, pair datasets.

Light imports only here (the parser); heavier pieces load on use:

    from artaug_ext.interact import parse_suggestions
    from artaug_ext.interact.critics import make_critic
    from artaug_ext.interact.enhance import enhance, regional_prompts
    from artaug_ext.interact.scorers import make_scorer, keep_pair
    from artaug_ext.interact.dataset import InteractConfig, run_interact, merge_manifests, export_pairs
"""

from .parse import CATEGORIES, ParseResult, Suggestion, parse_suggestions

__all__ = ["CATEGORIES", "ParseResult", "Suggestion", "parse_suggestions"]
