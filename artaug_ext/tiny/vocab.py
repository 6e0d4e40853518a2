"""Words the tiny tokenizers are trained on.

The tiny text encoders only ever see captions of procedural scenes and the local prompts
of the ArtAug critics, so the vocabulary is those words plus a base of everyday English.
Every character of printable ASCII is in both tokenizers' alphabets, so any English text
tokenizes without `<unk>`; the words below just become single tokens.
"""

from ..colours import COLOURS, OTHER_COLOUR_WORDS

COLORS = list(COLOURS) + OTHER_COLOUR_WORDS
SHADES = ["dark", "light", "pale", "deep", "bright", "vivid", "muted", "soft", "warm", "cool"]
SHAPES = ["circle", "circles", "square", "squares", "triangle", "triangles", "star", "stars",
          "shape", "shapes", "object", "objects", "disc", "box", "dot"]
POSITIONS = ["left", "right", "top", "bottom", "center", "centre", "middle", "upper", "lower",
             "corner", "edge", "side", "above", "below", "near", "far", "beside", "next"]
SIZES = ["small", "large", "big", "tiny", "huge", "medium", "little", "wide", "narrow", "tall"]
LIGHTING = ["dim", "normal", "bright", "backlit", "overexposed", "underexposed", "light",
            "lighting", "lit", "shadow", "shadows", "glow", "glowing", "sunlight", "daylight",
            "exposure", "contrast", "saturation", "brightness", "highlights", "sharp", "sharpness",
            "blur", "blurry", "blurred", "focus", "detail", "details", "detailed", "texture",
            "composition", "atmosphere", "mood", "angle", "framing", "balanced", "vibrant",
            "dramatic", "cinematic", "golden", "hour", "sunset", "sunrise", "night", "dusk", "dawn",
            "fog", "mist", "haze", "clear", "crisp", "rich", "colorful", "colour", "color", "colors",
            "tone", "tones", "gradient", "plain", "background", "foreground", "backdrop", "scene",
            "image", "photo", "photograph", "picture", "painting", "render", "style", "quality",
            "high", "low", "more", "less", "increase", "decrease", "reduce", "enhance", "improve",
            "improved", "even", "evenly", "uneven", "too", "very", "slightly", "subtle", "strong"]
SUBJECTS = ["sky", "cloud", "clouds", "sun", "moon", "tree", "trees", "forest", "mountain",
            "mountains", "lake", "river", "sea", "ocean", "beach", "sand", "water", "grass",
            "field", "flower", "flowers", "garden", "city", "street", "building", "buildings",
            "house", "room", "window", "door", "table", "chair", "cat", "dog", "bird", "horse",
            "person", "man", "woman", "girl", "boy", "child", "face", "portrait", "hair", "eyes",
            "hand", "hands", "car", "road", "bridge", "boat", "castle", "snow", "rain", "fire",
            "stone", "rock", "wall", "floor", "wood", "metal", "glass", "light", "lamp", "candle"]
BASE = ["a", "an", "the", "of", "on", "in", "at", "with", "and", "or", "to", "from", "by", "for",
        "is", "are", "be", "it", "its", "this", "that", "these", "those", "one", "two", "three",
        "four", "five", "some", "many", "all", "each", "every", "no", "not", "under", "over",
        "into", "onto", "out", "up", "down", "around", "behind", "front", "between", "against",
        "has", "have", "make", "made", "add", "show", "showing", "shows", "looks", "look", "like",
        "as", "than", "so", "but", "while", "where", "which", "who", "what", "their", "there",
        "here", "should", "would", "could", "can", "will", "region", "area", "part", "whole",
        "entire", "main", "subject", "lit", "fix", "keep", "same", "different", "new", "old",
        "beautiful", "pretty", "nice", "good", "best", "natural", "realistic", "simple", "flat",
        "smooth", "rough", "round", "square", "pointed", "filled", "solid", "empty", "full",
        "first", "second", "third", "its", "hazy", "dull", "washed", "blown", "clipped", "noisy",
        "noise", "clean", "centered", "off", "placed", "position", "positioned", "size", "sized"]

WORDS = sorted(set(COLORS + SHADES + SHAPES + POSITIONS + SIZES + LIGHTING + SUBJECTS + BASE))


def training_corpus() -> list[str]:
    """Deterministic sentences for tokenizer training: every word alone and in phrases."""
    lines = list(WORDS)
    for c in COLORS:
        for s in SHAPES[:8]:
            lines.append(f"a {c} {s} on a {c} background")
    for p in POSITIONS:
        for z in SIZES[:4]:
            lines.append(f"a {z} shape in the {p}, dim light")
    return lines
