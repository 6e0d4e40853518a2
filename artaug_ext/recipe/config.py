"""Recipe files: a TOML file describing a whole ArtAug run, read into checked dataclasses.

Every table and key is declared here once, with its type and default; an unknown key, a
wrong type or a missing required field is an error naming the file, the line, the key and
the fix, found before any model is loaded.

    [run]      model, rounds, seed, stopping thresholds, final rank
    [data]     prompts (a file next to the recipe, or a list), images per prompt, size, steps
    [critic]   the understanding backend (heuristic, openai, transformers) and its options
    [filter]   the scorer and the rule that keeps a pair, and the share of kept pairs trained on
    [enhance]  the regional blend's scale
    [train]    the differential LoRA (artaug_ext.train.settings.LoRATrainSettings)
    [eval]     the held-out check of the result (optional)
    [estimate] figures the --dry-run GPU-hours estimate assumes (optional; defaults documented)
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import typing
from dataclasses import dataclass, field

from ..errors import FileFormatError, UsageError
from ..quant import check_text_encoders
from ..train.settings import LoRATrainSettings, SettingError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class RunSection:
    model: str
    rounds: int = 2
    seed: int = 0
    stop_kept_fraction: float = 0.0  # stop after a round that keeps less than this share of its items
    # ... or whose enhanced items (all of them, kept or not) gain less than this on average;
    # None: no such rule (over every item the mean can be negative in a round that still helps)
    stop_mean_gain: float | None = None
    final_rank: int | None = None  # rank of the combined LoRA (None: the exact sum, no truncation)
    name: str = ""
    # A DiffSynth quantisation method for the frozen DiT (torchao_int8_w8a16, ...): generation,
    # enhancement and both stages run on the quantised base, every LoRA on it hot-loaded.
    quantize: str | None = None
    text_encoders: str = "resident"  # resident | quantized (with `quantize`) | offloaded (on the host)


@dataclass
class DataSection:
    prompts: str | list[str]
    images_per_prompt: int = 1
    size: int | list[int] | None = None  # N or [width, height]; None: the model's default
    steps: int | None = None
    guidance: float = 3.5
    shuffle_seed_per_round: bool = True  # new seeds each round (the same prompts, new images)


@dataclass
class CriticSection:
    backend: str = "heuristic"
    max_suggestions: int = 3
    model: str | None = None
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    convention: str | None = None
    concurrency: int = 4


KEEP_RULES = ("score", "enhanced")  # [filter] keep: the scorer's verdict, or every enhanced pair


@dataclass
class FilterSection:
    scorer: str = "heuristic"
    # which pairs a round trains on: "score" (the scorer's verdict: gain above margin, alignment
    # kept) or "enhanced" (every item the critic had a usable suggestion for)
    keep: str = "score"
    margin: float = 0.0
    relative: bool = False
    alignment_tolerance: float = 0.0
    keep_fraction: float = 1.0  # train on the best share of kept pairs by gain
    max_pairs: int | None = None


@dataclass
class EnhanceSection:
    region_scale: float = 1.0


@dataclass
class EvalSection:
    prompts: str = "tiny-heldout"  # a prompt set name or file
    limit: int | None = 16
    seeds: int = 2
    seed: int = 10_000  # held-out seeds: far from the training seeds
    scorer: str = "heuristic"
    steps: int | None = None
    size: int | None = None


@dataclass
class EstimateSection:
    """Per-unit figures the GPU-hours estimate multiplies (seconds on one GPU)."""

    image_seconds: float | None = None  # one image at the recipe's size and steps (default: from the model card)
    critic_seconds: float = 6.0
    train_step_seconds: float | None = None
    source: str = ""


@dataclass
class Recipe:
    run: RunSection
    data: DataSection
    critic: CriticSection = field(default_factory=CriticSection)
    filter: FilterSection = field(default_factory=FilterSection)
    enhance: EnhanceSection = field(default_factory=EnhanceSection)
    train: LoRATrainSettings = field(default_factory=LoRATrainSettings)
    eval: EvalSection | None = None
    estimate: EstimateSection = field(default_factory=EstimateSection)
    path: str = ""  # the file it was read from (not part of the recipe)
    _items: list | None = field(default=None, repr=False, compare=False)  # the prompt file's PromptItems

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("path")
        d.pop("_items")
        return d

    def _prompt_items(self) -> list:
        from ..eval.prompts import PromptItem, read_prompt_set

        if isinstance(self.data.prompts, list):
            return [PromptItem(str(p)) for p in self.data.prompts]
        if self._items is None:  # read once: a run asks many times
            self._items = read_prompt_set(self.prompts_path())
        return self._items

    def prompts(self) -> list[str]:
        """The training prompts: a named prompt set, a prompt file (relative to the recipe, any
        format `artaug eval` reads), or the inline list."""
        return [item.prompt for item in self._prompt_items()]

    def prompt_sizes(self) -> list[tuple[int, int] | None] | None:
        """Each training prompt's requested size (a prompt file's `size` column; None: the run's
        size), or None when no prompt carries one: the run is made as before sizes existed."""
        from ..eval.prompts import prompt_sizes

        return prompt_sizes(self._prompt_items())

    def generation_size(self) -> tuple[int, int]:
        """(width, height) of the run's images ([data] size, else the model's default size): the
        size of prompts without one, and the pixel budget of the buckets of those with one."""
        from ..cards import card

        size = self.data.size or card(self.run.model).defaults.size
        return (size, size) if isinstance(size, int) else (size[0], size[1])

    def prompts_path(self) -> str | None:
        """The prompt set name, or the prompt file's path; None for an inline list."""
        from ..eval.prompts import PROMPT_SETS

        if isinstance(self.data.prompts, list):
            return None
        if self.data.prompts.split(":")[0] in PROMPT_SETS:
            return self.data.prompts
        return os.path.join(os.path.dirname(os.path.abspath(self.path)), self.data.prompts)


_SECTIONS = {"run": RunSection, "data": DataSection, "critic": CriticSection, "filter": FilterSection,
             "enhance": EnhanceSection, "train": LoRATrainSettings, "eval": EvalSection, "estimate": EstimateSection}
_REQUIRED_SECTIONS = ("run", "data")


def section_defaults(name: str) -> dict:
    """The default of every key of the recipe table `name` that has one (as `to_dict` writes it)."""
    out = {}
    for f in dataclasses.fields(_SECTIONS[name]):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _fields_most_specific_first(cls) -> list[dataclasses.Field]:
    """A table's keys in the order a reader looks for them: the class's own before inherited ones
    ([train]: how the LoRA is made, then how it is optimised)."""
    inherited = {f.name for base in cls.__mro__[1:] if dataclasses.is_dataclass(base) for f in dataclasses.fields(base)}
    fields = dataclasses.fields(cls)
    return [f for f in fields if f.name not in inherited] + [f for f in fields if f.name in inherited]


def _line_of(text: str, section: str, key: str | None) -> int | None:
    """The line of `[section]` (or of `key =` inside it), for messages."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if re.match(rf"\s*\[\s*{re.escape(section)}\s*\]", line)), None)
    if start is None or key is None:
        return None if start is None else start + 1
    for i in range(start + 1, len(lines)):
        if re.match(r"\s*\[", lines[i]):
            break
        if re.match(rf"\s*{re.escape(key)}\s*=", lines[i]):
            return i + 1
    return start + 1


def _type_ok(value, hint) -> bool:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is typing.Any:
        return True
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_type_ok(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and all(_type_ok(v, args[0]) for v in value) if args else isinstance(value, list)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _type_name(hint) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def load_recipe(path: str) -> Recipe:
    """Read and check a recipe file; every problem is one line naming file:line, key and fix."""
    if not os.path.isfile(path):
        raise UsageError(f"recipe {path}: no such file")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
        data = tomllib.loads(text)
    except UnicodeDecodeError:
        raise FileFormatError(path, "not UTF-8 text", "save the recipe as UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise FileFormatError(path, f"not valid TOML ({e})", "fix the syntax at the line named") from None
    return recipe_from_dict(data, path, text)


def recipe_from_dict(data: dict, path: str = "<recipe>", text: str = "") -> Recipe:
    def where(section: str, key: str | None = None) -> str:
        line = _line_of(text, section, key)
        return f"{path}:{line}" if line else path

    unknown = [k for k in data if k not in _SECTIONS]
    if unknown:
        raise UsageError(f"{path}: unknown table [{unknown[0]}]; tables are {', '.join(f'[{s}]' for s in _SECTIONS)}")
    for s in _REQUIRED_SECTIONS:
        if s not in data:
            raise UsageError(f"{path}: the table [{s}] is missing (it is required)")
    sections = {}
    for name, cls in _SECTIONS.items():
        if name not in data:
            continue
        table = data[name]
        if not isinstance(table, dict):
            raise UsageError(f"{where(name)}: [{name}] must be a table")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in _fields_most_specific_first(cls)}
        for key, value in table.items():
            if key not in fields:
                raise UsageError(f"{where(name, key)}: [{name}] has no key {key!r}; known keys: {', '.join(fields)}")
            if not _type_ok(value, hints[key]):
                raise UsageError(f"{where(name, key)}: {name}.{key} = {value!r} must be {_type_name(hints[key])}")
        missing = [f.name for f in fields.values() if f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING and f.name not in table]
        if missing:
            raise UsageError(f"{where(name)}: {name}.{missing[0]} is required")
        sections[name] = cls(**table)
    train = data.get("train", {})
    if train.get("timestep_sampling") == "logit-normal" and "weighting" in train:
        raise UsageError(f"{where('train', 'weighting')}: train.weighting {train['weighting']!r}: timestep_sampling "
                         "'logit-normal' is unweighted and ignores it; leave weighting out")
    recipe = Recipe(**sections, path=os.path.abspath(path) if path != "<recipe>" else path)
    _check_values(recipe, where)
    if "guidance" not in train:
        from ..cards import card

        authors = card(recipe.run.model).defaults.train_guidance
        if authors is not None:  # train where the model's authors do, unless the recipe says otherwise
            recipe.train.guidance = authors
    return recipe


def _check_values(r: Recipe, where) -> None:
    from ..cards import base_models, card
    from ..interact.critics import CRITICS

    if r.run.model not in base_models():
        raise UsageError(f"{where('run', 'model')}: run.model {r.run.model!r} is not a base model; "
                         f"use one of {', '.join(base_models())}")
    card(r.run.model)
    if r.run.rounds <= 0:
        raise UsageError(f"{where('run', 'rounds')}: run.rounds must be positive")
    if r.run.final_rank is not None and r.run.final_rank <= 0:
        raise UsageError(f"{where('run', 'final_rank')}: run.final_rank must be positive (or left out for the exact sum)")
    check_text_encoders(r.run.text_encoders, r.run.quantize, f"{where('run', 'text_encoders')}: run.text_encoders",
                        "run.quantize")
    if r.run.quantize is not None:
        from ..quant import check_quantize

        check_quantize(r.run.quantize, training=True, what=f"{where('run', 'quantize')}: run.quantize")
    if r.critic.backend not in CRITICS:
        raise UsageError(f"{where('critic', 'backend')}: critic.backend {r.critic.backend!r}: use {', '.join(CRITICS)}")
    if r.filter.keep not in KEEP_RULES:
        raise UsageError(f"{where('filter', 'keep')}: filter.keep {r.filter.keep!r}: use one of {', '.join(KEEP_RULES)}")
    if not 0 < r.filter.keep_fraction <= 1:
        raise UsageError(f"{where('filter', 'keep_fraction')}: filter.keep_fraction must be in (0, 1]")
    if r.data.images_per_prompt <= 0:
        raise UsageError(f"{where('data', 'images_per_prompt')}: data.images_per_prompt must be positive")
    size = r.data.size
    sizes = [size, size] if isinstance(size, int) else (size or [])
    if size is not None and (len(sizes) != 2 or any(v <= 0 or v % 16 for v in sizes)):
        raise UsageError(f"{where('data', 'size')}: data.size {size!r} must be N or [width, height], multiples of 16")
    if r.data.steps is not None and r.data.steps <= 0:
        raise UsageError(f"{where('data', 'steps')}: data.steps must be positive")
    from ..eval.prompts import PROMPT_SETS

    if isinstance(r.data.prompts, str) and r.data.prompts.split(":")[0] not in PROMPT_SETS \
            and not os.path.isfile(r.prompts_path()):
        raise UsageError(f"{where('data', 'prompts')}: data.prompts file {r.prompts_path()} does not exist "
                         f"(a path relative to the recipe, a prompt set: {', '.join(PROMPT_SETS)}, or a list)")
    if isinstance(r.data.prompts, list) and not r.data.prompts:
        raise UsageError(f"{where('data', 'prompts')}: data.prompts is an empty list")
    try:
        r.train.validate()
    except SettingError as e:
        raise UsageError(f"{where('train', e.key)}: {e}") from None
    if r.train.resolution is not None:
        side = max(sizes) if sizes else card(r.run.model).defaults.size
        if r.train.resolution > side:
            raise UsageError(f"{where('train', 'resolution')}: train.resolution {r.train.resolution} is above the "
                             f"images' size {side} (data.size); use at most {side}, or leave it out")
    if r.eval is not None and r.eval.seeds <= 0:
        raise UsageError(f"{where('eval', 'seeds')}: eval.seeds must be positive")
