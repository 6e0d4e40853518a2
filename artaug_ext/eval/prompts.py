"""Prompt sets for `artaug eval`: the shipped default set, the tiny model's held-out scenes, and
the prompt files of public benchmarks, all read into one list of `PromptItem`.

A set is named (`PROMPT_SETS`) or is a file path. Files are recognised by their extension (or, for
another extension, by their first line):

    .json   HPSv2 benchmark: a list of prompts (category = file name, e.g. anime.json -> anime),
            or an object {style: [prompts]} (category = style)
    .jsonl  GenEval metadata: one object a line with "prompt" (category = its "tag"), or any
            {"prompt": ..., "category": ...} lines
    .tsv    PartiPrompts (Prompt, Category, Challenge, Note columns) or our own (prompt, category)
    .csv    DrawBench (Prompts, Category columns; any case), or prompt/category columns
    .txt    T2I-CompBench: one prompt a line (category = file name less _val/_train);
            blank lines and lines starting with # are skipped

A prompt without a category gets the file's name as its category. A prompt may carry the size
its images are made at: a `size` column (WxH, e.g. 1024x768) in .tsv/.csv files, a "size"
field ("1024x768") or "width" and "height" fields in .jsonl lines (`artaug_ext.buckets`: the
size is snapped to a bucket under the run's pixel budget). Every problem is raised before any
image is generated, as one line naming the file (and line) and the fix.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
from dataclasses import dataclass, field
from importlib import resources

from ..buckets import SizeError, check_size, parse_size
from ..errors import FileFormatError, UsageError
from ..files import read_text_lines

logger = logging.getLogger(__name__)

PROMPT_SETS = ("default", "default/train", "default/test", "tiny-heldout", "tiny-heldout-lit", "tiny-heldout-lit/dev",
               "tiny-heldout-lit/test", "tiny-heldout-multi", "tiny-heldout-multi/dev", "tiny-heldout-multi/test")
# default/test is every 5th prompt of the default set (60), default/train the other 240: a recipe
# trains on one and evaluates on the other, never on a prompt it learned from.
TEST_EVERY = 5
# The tiny held-out sets' dev and test parts split the first TINY_HELDOUT_SIZE scenes of the set by
# the main object's held-out combination (`heldout_part`): settings are chosen on dev, test is
# reported once, and no combination is in both (a split by index would put the same combination,
# under another lighting, on both sides).
HELDOUT_PARTS = ("dev", "test")



def heldout_lightings() -> tuple[str, ...]:
    """The lighting of tiny-heldout-lit's scenes, in turn, from `scenes.LIGHTINGS` (normal, dim,
    bright, backlit, overexposed): dim light, then the other departures from normal light from
    the last one back, then normal light: dim, overexposed, backlit, bright, normal, the set as
    published."""
    from ..scenes import LIGHTINGS  # scenes imports numpy; text prompt files do not need it

    return (LIGHTINGS[1], *LIGHTINGS[:1:-1], LIGHTINGS[0])


# Scenes in the `tiny-heldout` set (`tiny-heldout:N` asks for another number).
TINY_HELDOUT_SIZE = 256
# The shipped default set, inside the `artaug_ext` package.
DEFAULT_SET_RESOURCE = "assets/prompts/default.tsv"

FORMATS = (
    ".json (HPSv2 benchmark: a list of prompts, or {style: [prompts]})",
    '.jsonl (GenEval metadata, or one {"prompt": ...} object a line)',
    ".tsv (PartiPrompts, or a prompt<TAB>category header)",
    ".csv (DrawBench: a Prompts or prompt column, optional Category)",
    ".txt (T2I-CompBench: one prompt a line)",
)

# Header names of the prompt and category columns in TSV/CSV files (compared in lower case).
PROMPT_COLUMNS = ("prompt", "prompts")
CATEGORY_COLUMN = "category"
SIZE_COLUMN = "size"  # optional: WxH, the size the prompt's images are made at


@dataclass(frozen=True)
class PromptItem:
    """One evaluation prompt. `scene` is the tiny model's ground truth (an `artaug_ext.scenes.Scene`)
    for the `tiny-heldout` set, None for text prompt sets; it takes no part in == or hash.
    `size`: the (width, height) the file asks for (None: the run's size)."""

    prompt: str
    category: str = ""
    scene: object | None = field(default=None, compare=False, repr=False)
    size: tuple[int, int] | None = None


def prompt_sizes(items: list[PromptItem]) -> list[tuple[int, int] | None] | None:
    """Each item's requested size (None: the run's size), or None when no item carries one (a
    run without sizes is recorded and made as before sizes existed)."""
    sizes = [item.size for item in items]
    return sizes if any(sizes) else None


def read_prompt_set(spec: str, limit: int | None = None, seed: int = 0) -> list[PromptItem]:
    """The prompts of a named set or a prompt file, all of them or a sample of `limit`.

    The sample is the same for the same (set, limit, seed) and keeps file order, so two runs of
    `artaug eval` with the same arguments score the same prompts."""
    check_limit(limit)
    spec = str(spec)
    name, _, count = spec.partition(":")
    if name in PROMPT_SETS and (not count or name.startswith("tiny-heldout")):
        if name.startswith("default"):
            items = read_default_set()
            if name != "default":
                test = name == "default/test"
                items = [it for i, it in enumerate(items) if (i % TEST_EVERY == TEST_EVERY - 1) == test]
        elif "/" in name:
            items = read_heldout_part(spec, name, count)
        else:
            kind = {"tiny-heldout": "plain", "tiny-heldout-lit": "lit", "tiny-heldout-multi": "multi"}[name]
            items = read_tiny_heldout(_scene_count(spec, count), kind=kind)
    elif os.path.isdir(spec):
        raise UsageError(f"prompt set {spec}: a folder, not a prompt file; name one file in it")
    elif os.path.isfile(spec):
        items = read_prompt_file(spec)
    elif os.sep not in spec and "/" not in spec and not os.path.splitext(spec)[1]:
        raise UsageError(f"unknown prompt set {spec!r} (and no such file): the named sets are "
                         f"{', '.join(PROMPT_SETS)} (or tiny-heldout:N); anything else must be a prompt file")
    else:
        raise UsageError(f"prompt file {spec}: no such file")
    return sample_prompts(items, limit, seed)


def check_limit(limit: int | None) -> None:
    """Refuse a bad `limit` before any file is read."""
    if limit is None:
        return
    if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
        raise UsageError(f"limit {limit!r}: give a whole number of prompts of at least 1, or no limit for all")


def sample_prompts(items: list[PromptItem], limit: int | None, seed: int = 0) -> list[PromptItem]:
    """`limit` items drawn with `random.Random(seed)`, back in their original order (all if None
    or `limit` >= len(items)). Categories are represented as the sample falls, not stratified."""
    check_limit(limit)
    if limit is None or limit >= len(items):
        return list(items)
    picked = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in picked]


def read_default_set() -> list[PromptItem]:
    """The 300 prompts shipped with the package, 12 categories (read from the installed package,
    so it works from a wheel as well as from a checkout)."""
    ref = resources.files("artaug_ext").joinpath(DEFAULT_SET_RESOURCE)
    with resources.as_file(ref) as path:
        return read_prompt_file(str(path))


def _scene_count(spec: str, count: str) -> int:
    if not count:
        return TINY_HELDOUT_SIZE
    try:
        n = int(count)
    except ValueError:
        n = 0
    if n <= 0:
        raise UsageError(f"prompt set {spec!r}: after '{spec.partition(':')[0]}:' give a number of scenes of at "
                         f"least 1, e.g. tiny-heldout:64")
    return n


def read_tiny_heldout(count: int = TINY_HELDOUT_SIZE, kind: str = "plain") -> list[PromptItem]:
    """Captions of the scenes held out of the tiny model's training, so the tiny model is scored
    on prompts it has never seen. kind "plain" (`scenes.held_out_scene`, category = the main
    object's shape); "lit": the same scenes in turn under each of `heldout_lightings()`,
    with its words in the caption (category = the lighting): held-out prompts for what the
    heuristic critic corrects; "multi": scenes of two or three objects (`scenes.held_out_multi_scene`)
    under the lightings in turn (category = the lighting)."""
    # scenes imports numpy; text prompt files do not need it
    from ..scenes import held_out_multi_scene, held_out_scene

    lightings = heldout_lightings()
    items = []
    for i in range(count):
        if kind == "plain":
            scene = held_out_scene(i)
            items.append(PromptItem(scene.caption, scene.main.shape, scene))
            continue
        lighting = lightings[i % len(lightings)]
        scene = (held_out_scene if kind == "lit" else held_out_multi_scene)(i, lighting)
        items.append(PromptItem(scene.caption, lighting, scene))
    return items


def heldout_part(scene) -> str:
    """"dev" or "test": the part of a held-out scene, from its main object's held-out combination
    (colour, shape, position, background; `scenes.is_held_out`) alone, so every scene of one
    combination, whatever its lighting or other objects, falls on the same side, in every set."""
    import zlib

    main = scene.main
    key = f"part|{main.colour}|{main.shape}|{main.position}|{scene.background}".encode()
    return HELDOUT_PARTS[zlib.crc32(key) % 2]


def read_heldout_part(spec: str, name: str, count: str) -> list[PromptItem]:
    """`tiny-heldout-lit/dev` and the like: the scenes of that part among the set's first
    TINY_HELDOUT_SIZE, in order; `:N` the first N of them, and N beyond the part is an error."""
    whole, part = name.split("/")
    items = [it for it in read_prompt_set(whole) if heldout_part(it.scene) == part]
    if not count:
        return items
    n = _scene_count(spec, count)
    if n > len(items):
        raise UsageError(f"prompt set {spec!r}: the {part} part of {whole} holds {len(items)} scenes; "
                         f"ask for at most {name}:{len(items)}")
    return items[:n]


# ---------------------------------------------------------------------------- files


def read_prompt_file(path: str) -> list[PromptItem]:
    """Every prompt of one file in a known format (see the module docstring)."""
    if not os.path.isfile(path):
        raise UsageError(f"prompt file {path}: no such file")
    kind, lines = _detect_format(path)
    if not any(line.strip() for line in lines):
        raise FileFormatError(path, "the prompt file is empty", "put prompts in it, or name another file")
    items = _READERS[kind](path, lines)
    if not items:
        raise FileFormatError(path, "no prompts in this file", "put prompts in it, or name another file")
    logger.debug("read %d prompts in %d categories from %s (%s)", len(items), len({i.category for i in items}),
                path, kind)
    return items


def _unknown_format(path: str) -> FileFormatError:
    return FileFormatError(path, "not a prompt file in a format we read", "use one of " + "; ".join(FORMATS))


def _detect_format(path: str) -> tuple[str, list[str]]:
    """(the file's kind, its lines): by extension, else by the first non-blank line, so a prompt file
    saved with another extension is still read when its content is unambiguous."""
    ext = os.path.splitext(path)[1].lower()
    if ext in _READERS:
        return ext, read_text_lines(path, "prompt file")
    try:
        lines = read_text_lines(path, "prompt file")
    except FileFormatError:
        raise _unknown_format(path) from None  # not text: an image, an archive, a parquet file ...
    first = next((line.strip() for line in lines if line.strip()), "")
    if first.startswith("["):
        return ".json", lines
    if first.startswith("{"):
        try:
            whole = json.loads("\n".join(lines))
        except json.JSONDecodeError:
            return ".jsonl", lines
        return (".json" if isinstance(whole, dict) and "prompt" not in whole else ".jsonl"), lines
    if _prompt_column([c.strip().lower() for c in first.split("\t")]) is not None:
        return ".tsv", lines
    header = next(csv.reader([first]), [])
    if _prompt_column([c.strip().lower() for c in header]) is not None:
        return ".csv", lines
    raise _unknown_format(path)


def _file_name(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def _clean(text: str) -> str:
    """One line, single spaces: prompts go into one-line records and reports."""
    return " ".join(text.split())


def _collect(path: str, pairs: list[tuple], default_category: str) -> list[PromptItem]:
    """PromptItems of (prompt, category[, size]) tuples; empty prompts are dropped (with a
    warning), an empty category becomes `default_category`."""
    items = [PromptItem(_clean(p), _clean(c) or default_category, size=rest[0] if rest else None)
             for p, c, *rest in pairs if _clean(p)]
    if len(items) < len(pairs):
        logger.warning("%s: skipped %d empty prompts", path, len(pairs) - len(items))
    return items


def _read_hpsv2_json(path: str, lines: list[str]) -> list[PromptItem]:
    """HPSv2's benchmark ships one JSON list of prompt strings per style (anime.json, photo.json, ...);
    an object {style: [prompts]} holds several styles in one file."""
    try:
        data = json.loads("\n".join(lines))
    except json.JSONDecodeError as e:
        raise FileFormatError(f"{path}:{e.lineno}", f"not valid JSON at line {e.lineno} column {e.colno} ({e.msg})",
                              "fix that line; a file with one JSON object a line must be named .jsonl") from None
    if isinstance(data, list):
        groups = [(_file_name(path), data)]
    elif isinstance(data, dict):
        groups = list(data.items())
    else:
        raise FileFormatError(path, f"a JSON {type(data).__name__}, not a list of prompts or {{style: [prompts]}}",
                              "write a JSON list of prompt strings")
    pairs = []
    for category, prompts in groups:
        where = "the list" if isinstance(data, list) else f"style {category!r}"
        if not isinstance(prompts, list):
            raise FileFormatError(path, f"{where} is a JSON {type(prompts).__name__}, not a list of prompts",
                                  "give each style a list of prompt strings")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise FileFormatError(path, f"item {i} of {where} is a JSON {type(prompt).__name__}, not a prompt string",
                                      'make every item a string (for objects use .jsonl, one {"prompt": ...} a line)')
            pairs.append((prompt, str(category)))
    return _collect(path, pairs, _file_name(path))


def _read_jsonl(path: str, lines: list[str]) -> list[PromptItem]:
    """GenEval's evaluation_metadata.jsonl has one object a line with "prompt" and "tag" (the skill
    it tests: counting, colors, position ...); plain {"prompt": ...} lines are read the same way."""
    pairs = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise FileFormatError(f"{path}:{n}", f"line {n} is not a JSON object ({e.msg})",
                                  'write one {"prompt": "..."} object a line') from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise FileFormatError(f"{path}:{n}", f'line {n} is not a JSON object with a "prompt" string',
                                  'write one {"prompt": "..."} object a line')
        category = record.get("tag", record.get("category"))
        pairs.append((record["prompt"], "" if category is None else str(category), _jsonl_size(path, n, record)))
    return _collect(path, pairs, _file_name(path))


def _size_error(path: str, n: int, e: SizeError) -> FileFormatError:
    return FileFormatError(f"{path}:{n}", f"line {n}: {e.problem}", e.fix)


def _jsonl_size(path: str, n: int, record: dict) -> tuple[int, int] | None:
    """A .jsonl line's size: "size": "WxH", or "width" and "height" (None: neither)."""
    has_sides = "width" in record or "height" in record
    try:
        if "size" in record:
            if has_sides:
                raise SizeError('both "size" and "width"/"height"', 'give one of them')
            if not isinstance(record["size"], str):
                raise SizeError(f'"size" is {record["size"]!r}, not text', 'write "size": "1024x768"')
            return parse_size(record["size"])
        if has_sides:
            if "width" not in record or "height" not in record:
                raise SizeError('only one of "width" and "height"', "give both, or neither")
            return check_size(record["width"], record["height"])
    except SizeError as e:
        raise _size_error(path, n, e) from None
    return None


def _unquote_tsv(field_text: str) -> str:
    """A TSV cell as written, or its content when a spreadsheet quoted it (a cell in double quotes,
    with doubled quotes inside)."""
    inner = field_text[1:-1]
    if len(field_text) >= 2 and field_text[0] == field_text[-1] == '"' and '"' not in inner.replace('""', ""):
        return inner.replace('""', '"')
    return field_text


def _read_tsv(path: str, lines: list[str]) -> list[PromptItem]:
    """PartiPrompts ships a TSV with Prompt, Category, Challenge and Note columns; our default set
    uses prompt and category. Cells are split on tabs (prompts hold quotes, not tabs)."""
    rows = [(n, [_unquote_tsv(cell) for cell in line.split("\t")]) for n, line in enumerate(lines, 1)
            if line.strip()]
    return _read_table(path, rows, "\t")


def _read_csv(path: str, lines: list[str]) -> list[PromptItem]:
    """DrawBench ships a CSV with Prompts and Category columns; quoted cells may hold commas and
    line breaks, so Python's csv reader parses it (line numbers are where a row ends)."""
    reader = csv.reader(line + "\n" for line in lines)
    rows = []
    try:
        for cells in reader:
            if any(cell.strip() for cell in cells):
                rows.append((reader.line_num, cells))
    except csv.Error as e:
        raise FileFormatError(f"{path}:{reader.line_num}", f"line {reader.line_num} is not valid CSV ({e})",
                              "fix that line (quote cells that hold commas)") from None
    return _read_table(path, rows, ",")


def _prompt_column(columns: list[str]) -> int | None:
    return next((i for i, c in enumerate(columns) if c in PROMPT_COLUMNS), None)


def _read_table(path: str, rows: list[tuple[int, list[str]]], sep: str) -> list[PromptItem]:
    """Prompts of a header + rows table; the header names the prompt and (optional) category columns."""
    header_line, header = rows[0]
    columns = [c.strip().lower() for c in header]
    p = _prompt_column(columns)
    if p is None:
        found = ", ".join(repr(c.strip()) for c in header)
        example = "prompt\\tcategory" if sep == "\t" else "prompt,category"
        raise FileFormatError(f"{path}:{header_line}", f"no prompt column in the header (columns found: {found})",
                              f"start the file with a header line such as {example}")
    c = columns.index(CATEGORY_COLUMN) if CATEGORY_COLUMN in columns else None
    s = columns.index(SIZE_COLUMN) if SIZE_COLUMN in columns else None
    pairs = []
    for n, cells in rows[1:]:
        if len(cells) <= p:
            raise FileFormatError(f"{path}:{n}", f"line {n} has {len(cells)} cells, so no prompt (column {p + 1})",
                                  "give every line the header's columns")
        size = None
        if s is not None and s < len(cells) and cells[s].strip():  # an empty cell: the run's size
            try:
                size = parse_size(cells[s])
            except SizeError as e:
                raise _size_error(path, n, e) from None
        pairs.append((cells[p], cells[c] if c is not None and c < len(cells) else "", size))
    return _collect(path, pairs, _file_name(path))


def _read_compbench_txt(path: str, lines: list[str]) -> list[PromptItem]:
    """T2I-CompBench ships one prompt a line per skill and split (color_val.txt, spatial_train.txt ...),
    so the category is the skill: the file name less its _val/_train suffix."""
    category = _file_name(path)
    for suffix in ("_val", "_train"):
        if category.endswith(suffix) and len(category) > len(suffix):
            category = category[: -len(suffix)]
    pairs = [(line, category) for line in lines if line.strip() and not line.strip().startswith("#")]
    return _collect(path, pairs, category)


# Extension -> reader (an unknown extension is matched by content in `_detect_format`).
_READERS = {
    ".json": _read_hpsv2_json,
    ".jsonl": _read_jsonl,
    ".tsv": _read_tsv,
    ".csv": _read_csv,
    ".txt": _read_compbench_txt,
}
