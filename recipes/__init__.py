"""The recipes, installed as the package `artaug_recipes` so that `artaug demo` and
`artaug run` find them in any install: TOML recipes, their prompt files, accelerate
configs, and recipes/train_tiny.py (the recipe that trained the embedded tiny model)."""
