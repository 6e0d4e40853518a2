"""Prompt sets for `artaug eval`: the shipped default set, the tiny held-out set, every benchmark
file format, deterministic sampling, and one-line errors naming the file (and line)."""

import json

import pytest

from artaug_ext import scenes
from artaug_ext.errors import FileFormatError, UsageError
from artaug_ext.eval.prompts import FORMATS, PROMPT_SETS, PromptItem, read_prompt_set

CATEGORIES = {"portrait", "animal", "landscape", "architecture", "interior", "food", "object", "vehicle",
              "fantasy", "style", "lighting", "composition"}


def write(tmp_path, name, text, encoding="utf-8"):
    path = tmp_path / name
    path.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return str(path)


def pairs(items):
    return [(i.prompt, i.category) for i in items]


# ---------------------------------------------------------------------------- named sets

def test_default_set_has_300_unique_prompts_in_the_12_categories():
    items = read_prompt_set("default")
    assert len(items) == 300
    assert {i.category for i in items} == CATEGORIES
    for category in CATEGORIES:
        assert sum(i.category == category for i in items) >= 20, category
    prompts = [i.prompt for i in items]
    assert all(p and p == p.strip() and "\t" not in p and "\n" not in p for p in prompts)
    assert len({p.lower() for p in prompts}) == 300
    assert all(4 <= len(p.split()) <= 40 for p in prompts)
    assert all(i.scene is None for i in items)


def test_tiny_heldout_prompts_are_captions_of_held_out_scenes():
    items = read_prompt_set("tiny-heldout")
    assert len(items) == 256 and "tiny-heldout" in PROMPT_SETS
    for item in items:
        scene = item.scene
        assert isinstance(scene, scenes.Scene)
        main = scene.main
        assert scenes.is_held_out(main.colour, main.shape, main.position, scene.background)
        assert item.prompt == scene.caption == scenes.describe(scene)
        assert item.category == main.shape
    assert items[5].prompt == scenes.held_out_scene(5).caption
    assert {i.category for i in items} <= set(scenes.SHAPES)
    short = read_prompt_set("tiny-heldout:7")
    assert pairs(short) == pairs(items[:7])


def _combination(scene):
    m = scene.main
    return (m.colour, m.shape, m.position, scene.background)


def test_tiny_heldout_lit_keeps_its_meaning_the_first_scenes_under_each_lighting_in_turn():
    lightings = ["dim", "overexposed", "backlit", "bright", "normal"]  # the published order
    items = read_prompt_set("tiny-heldout-lit")
    assert len(items) == 256
    assert pairs(items[:10]) == [(scenes.held_out_scene(i, lightings[i % 5]).caption, lightings[i % 5])
                                 for i in range(10)]
    assert pairs(read_prompt_set("tiny-heldout-lit:9")) == pairs(items[:9])


@pytest.mark.parametrize("whole", ["tiny-heldout-lit", "tiny-heldout-multi"])
def test_dev_and_test_split_the_set_by_combination_never_sharing_one(whole):
    every = read_prompt_set(whole)
    dev, test = read_prompt_set(f"{whole}/dev"), read_prompt_set(f"{whole}/test")
    # together the whole set, each in the set's order, neither nearly empty
    assert sorted(pairs(dev) + pairs(test)) == sorted(pairs(every))
    assert [i for i in pairs(every) if i in set(pairs(dev))] == pairs(dev)
    assert min(len(dev), len(test)) > len(every) // 3
    dev_combos, test_combos = {_combination(i.scene) for i in dev}, {_combination(i.scene) for i in test}
    assert not dev_combos & test_combos
    # a split by index would share combinations: the set repeats them under other lightings
    halves = ({_combination(i.scene) for i in every[:128]}, {_combination(i.scene) for i in every[128:]})
    assert halves[0] & halves[1]
    assert {i.category for i in dev} == {i.category for i in test} == set(scenes.LIGHTINGS)
    assert pairs(read_prompt_set(f"{whole}/dev:5")) == pairs(dev[:5])


def test_a_combination_is_on_the_same_side_in_the_lit_and_the_multi_set():
    side = {}
    for part in ("dev", "test"):
        for item in read_prompt_set(f"tiny-heldout-lit/{part}") + read_prompt_set(f"tiny-heldout-multi/{part}"):
            assert side.setdefault(_combination(item.scene), part) == part


def test_tiny_heldout_multi_holds_two_or_three_objects_only_the_main_one_held_out():
    items = read_prompt_set("tiny-heldout-multi")
    assert len(items) == 256 and "tiny-heldout-multi" in PROMPT_SETS
    assert {len(i.scene.objects) for i in items} == {2, 3}
    trained = {scenes.random_scene(s, held_out=False).caption for s in range(3000)}
    for item in items:
        scene = item.scene
        held = [scenes.is_held_out(o.colour, o.shape, o.position, scene.background) for o in scene.objects]
        assert held[0] and not any(held[1:])
        assert all(o.colour != scene.background for o in scene.objects)
        assert scenes.parse_caption(item.prompt).to_dict() == {**scene.to_dict(), "seed": 0}
        assert item.category == scene.lighting and item.prompt not in trained
    assert read_prompt_set("tiny-heldout-multi:4")[3].prompt == items[3].prompt


@pytest.mark.parametrize("spec", ["tiny-heldout-lit/dev:1000", "tiny-heldout-multi/test:257"])
def test_a_part_asked_for_more_scenes_than_it_holds_is_a_one_line_error(spec):
    held = len(read_prompt_set(spec.split(":")[0]))
    with pytest.raises(UsageError, match=rf"holds {held} scenes; ask for at most {spec.split(':')[0]}:{held}") as e:
        read_prompt_set(spec)
    assert "\n" not in str(e.value)
    with pytest.raises(UsageError, match="at least 1"):
        read_prompt_set("tiny-heldout-lit/dev:0")


def test_prompt_item_equality_ignores_the_scene():
    a = PromptItem("a red circle", "circle", scenes.held_out_scene(0))
    assert a == PromptItem("a red circle", "circle") and hash(a) == hash(PromptItem("a red circle", "circle"))


# ---------------------------------------------------------------------------- file formats

def test_hpsv2_json_list_and_object(tmp_path):
    path = write(tmp_path, "anime.json", json.dumps(["a girl with a paper umbrella", "  a robot  in rain "]))
    assert pairs(read_prompt_set(path)) == [("a girl with a paper umbrella", "anime"), ("a robot in rain", "anime")]
    path = write(tmp_path, "styles.json", json.dumps({"photo": ["a pier at dawn"], "paintings": ["a vase", "a bell"]}))
    assert pairs(read_prompt_set(path)) == [("a pier at dawn", "photo"), ("a vase", "paintings"), ("a bell", "paintings")]


def test_partiprompts_tsv(tmp_path):
    text = ("Prompt\tCategory\tChallenge\tNote\n"
            'a sign that says "open"\tWorld Knowledge\tWriting & Symbols\t\n'
            "a green apple\tProduce & Plants\tBasic\tsimple\n")
    path = write(tmp_path, "PartiPrompts.tsv", text)
    assert pairs(read_prompt_set(path)) == [('a sign that says "open"', "World Knowledge"),
                                            ("a green apple", "Produce & Plants")]


def test_our_tsv_with_quoted_cells_and_crlf(tmp_path):
    text = 'prompt\tcategory\r\n"a ""quoted"" word"\tstyle\r\na lamp\t\r\n\r\n'
    path = write(tmp_path, "mine.tsv", text)
    assert pairs(read_prompt_set(path)) == [('a "quoted" word', "style"), ("a lamp", "mine")]


def test_drawbench_csv_and_lower_case_columns(tmp_path):
    text = 'Prompts,Category\n"A red cube, on a blue sphere.",Colors\nA bird,Counting\n"two\nlines",Misspellings\n'
    path = write(tmp_path, "drawbench.csv", text)
    assert pairs(read_prompt_set(path)) == [("A red cube, on a blue sphere.", "Colors"), ("A bird", "Counting"),
                                            ("two lines", "Misspellings")]
    path = write(tmp_path, "other.csv", "id,PROMPT\n1,a kite\n2,a tent\n")
    assert pairs(read_prompt_set(path)) == [("a kite", "other"), ("a tent", "other")]


def test_t2i_compbench_txt(tmp_path):
    path = write(tmp_path, "color_val.txt", "# colour binding\na blue bench and a red car\n\n  a green bowl  \n")
    assert pairs(read_prompt_set(path)) == [("a blue bench and a red car", "color"), ("a green bowl", "color")]
    path = write(tmp_path, "spatial_train.txt", "a cat on the left of a dog")
    assert pairs(read_prompt_set(path)) == [("a cat on the left of a dog", "spatial")]
    path = write(tmp_path, "plain.txt", "\ufeffa boat\n")  # a BOM is dropped
    assert pairs(read_prompt_set(path)) == [("a boat", "plain")]


def test_geneval_metadata_and_plain_jsonl(tmp_path):
    text = ('{"tag": "counting", "include": [{"class": "cup", "count": 2}], "prompt": "a photo of two cups"}\n'
            '\n{"tag": "colors", "prompt": "a photo of a pink clock"}\n')
    path = write(tmp_path, "evaluation_metadata.jsonl", text)
    assert pairs(read_prompt_set(path)) == [("a photo of two cups", "counting"), ("a photo of a pink clock", "colors")]
    path = write(tmp_path, "mine.jsonl", '{"prompt": "a fern"}\n{"prompt": "a kettle", "category": "object"}')
    assert pairs(read_prompt_set(path)) == [("a fern", "mine"), ("a kettle", "object")]


def test_other_extension_is_read_by_content(tmp_path):
    assert pairs(read_prompt_set(write(tmp_path, "a.prompts", '["a hat"]'))) == [("a hat", "a")]
    assert pairs(read_prompt_set(write(tmp_path, "b.prompts", '{"prompt": "a cap"}\n'))) == [("a cap", "b")]
    assert pairs(read_prompt_set(write(tmp_path, "c.data", "prompt\tcategory\na mug\tobject\n"))) == [("a mug", "object")]
    assert pairs(read_prompt_set(write(tmp_path, "d.data", "Prompts,Category\na pen,object\n"))) == [("a pen", "object")]


# ---------------------------------------------------------------------------- limit

def test_limit_is_a_deterministic_subset_in_file_order():
    everything = read_prompt_set("default")
    a = read_prompt_set("default", limit=40, seed=3)
    assert a == read_prompt_set("default", limit=40, seed=3)
    assert len(a) == 40 and len(set(a)) == 40
    positions = [everything.index(item) for item in a]
    assert positions == sorted(positions)
    assert read_prompt_set("default", limit=40, seed=4) != a
    assert len({i.category for i in read_prompt_set("default", limit=100)}) > 1
    assert read_prompt_set("default", limit=1000) == everything
    assert read_prompt_set("default", limit=None) == everything
    assert pairs(read_prompt_set("tiny-heldout:20", limit=5, seed=1)) == pairs(
        read_prompt_set("tiny-heldout:20", limit=5, seed=1))


@pytest.mark.parametrize("limit", [0, -3, 2.5, True])
def test_bad_limit(limit):
    with pytest.raises(UsageError, match="limit"):
        read_prompt_set("default", limit=limit)


# ---------------------------------------------------------------------------- errors

def test_missing_file_and_unknown_set_and_folder(tmp_path):
    missing = str(tmp_path / "nope.tsv")
    with pytest.raises(UsageError, match="nope.tsv: no such file"):
        read_prompt_set(missing)
    names = "default, default/train, default/test, tiny-heldout, tiny-heldout-lit"
    with pytest.raises(UsageError, match=f"unknown prompt set 'partiprompts'.*{names}"):
        read_prompt_set("partiprompts")
    with pytest.raises(UsageError, match=names):
        read_prompt_set("default:3")
    with pytest.raises(UsageError, match="tiny-heldout:"):
        read_prompt_set("tiny-heldout:x")
    with pytest.raises(UsageError, match="tiny-heldout:"):
        read_prompt_set("tiny-heldout:0")
    with pytest.raises(UsageError, match="a folder"):
        read_prompt_set(str(tmp_path))


def test_unknown_format_names_the_formats(tmp_path):
    for name, data in [("image.png", b"\x89PNG\r\n\x1a\n\x00\xff"), ("notes.md", "# some notes\njust text\n")]:
        path = write(tmp_path, name, data)
        with pytest.raises(FileFormatError) as e:
            read_prompt_set(path)
        message = str(e.value)
        assert message.startswith(path + ": ") and "\n" not in message
        assert all(f in message for f in FORMATS) and ".jsonl" in message and "T2I-CompBench" in message


@pytest.mark.parametrize("name,text", [
    ("empty.txt", ""), ("blank.txt", "\n  \n"), ("comments.txt", "# only a comment\n"), ("header.tsv", "prompt\tcategory\n"),
    ("empty.json", "[]"), ("nothing.jsonl", "\n\n"), ("blank-cells.csv", "prompt,category\n ,a\n"),
])
def test_empty_or_promptless_file(tmp_path, name, text):
    path = write(tmp_path, name, text)
    with pytest.raises(FileFormatError, match="empty|no prompts") as e:
        read_prompt_set(path)
    assert str(e.value).startswith(path + ": ")


def test_not_utf8_names_the_line(tmp_path):
    path = write(tmp_path, "latin1.txt", "a cafe\na caf\u00e9 by night\n", encoding="latin-1")
    with pytest.raises(FileFormatError, match="not UTF-8") as e:
        read_prompt_set(path)
    assert str(e.value).startswith(f"{path}:2: ")


def test_broken_json_names_file_and_line(tmp_path):
    path = write(tmp_path, "anime.json", '[\n  "a girl",\n  "a boy"\n  "a dog"\n]')
    with pytest.raises(FileFormatError, match="not valid JSON at line 4") as e:
        read_prompt_set(path)
    assert str(e.value).startswith(f"{path}:4: ")
    path = write(tmp_path, "numbers.json", "[1, 2]")
    with pytest.raises(FileFormatError, match="item 0 .* not a prompt string") as e:
        read_prompt_set(path)
    assert str(e.value).startswith(path + ": ")
    path = write(tmp_path, "scalar.json", '"a cat"')
    with pytest.raises(FileFormatError, match="not a list of prompts"):
        read_prompt_set(path)


@pytest.mark.parametrize("text,line", [
    ('{"prompt": "a cup"}\n{"prompt": "a plate"\n', 2),
    ('{"prompt": "a cup"}\n\n{"text": "a plate"}\n', 3),
    ('["a cup"]\n', 1),
])
def test_broken_jsonl_names_file_and_line(tmp_path, text, line):
    path = write(tmp_path, "metadata.jsonl", text)
    with pytest.raises(FileFormatError, match=f"line {line}") as e:
        read_prompt_set(path)
    assert str(e.value).startswith(f"{path}:{line}: ") and "\n" not in str(e.value)


@pytest.mark.parametrize("name,text,found", [
    ("parti.tsv", "Text\tCategory\na cup\tobject\n", "'Text', 'Category'"),
    ("drawbench.csv", "Caption,Category\na cup,object\n", "'Caption', 'Category'"),
    ("noheader.tsv", "a cup\tobject\n", "'a cup', 'object'"),
])
def test_table_without_a_prompt_column_names_the_columns(tmp_path, name, text, found):
    path = write(tmp_path, name, text)
    with pytest.raises(FileFormatError, match="no prompt column") as e:
        read_prompt_set(path)
    assert str(e.value).startswith(f"{path}:1: ") and f"columns found: {found}" in str(e.value)


def test_table_row_without_the_prompt_cell_names_the_line(tmp_path):
    path = write(tmp_path, "short.tsv", "category\tprompt\nobject\ta cup\nobject\n")
    with pytest.raises(FileFormatError, match="line 3") as e:
        read_prompt_set(path)
    assert str(e.value).startswith(f"{path}:3: ")


def test_no_network_is_needed(tmp_path, monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("a prompt set opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    assert len(read_prompt_set("default", limit=3)) == 3
    assert len(read_prompt_set(write(tmp_path, "x.txt", "a cup\n"))) == 1
