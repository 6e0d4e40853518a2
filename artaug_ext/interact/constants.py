"""Defaults of the interaction loop that the CLI shows in its help (no torch import here)."""

# Region scale s_i of the regional blend: inside a box (blurred mask = 1) the region prompt and
# the global prompt count equally; at the blurred edges the region prompt fades out. Raise it
# (2-4) for stronger local changes; at large values the region prompt replaces the global one.
DEFAULT_REGION_SCALE = 1.0
