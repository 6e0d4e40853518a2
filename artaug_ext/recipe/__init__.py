"""Recipes: a TOML file describing a whole ArtAug run (config), its plan (plan) and the
runner that carries it out round after round (runner)."""
