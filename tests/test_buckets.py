"""Aspect-ratio buckets: a size a prompt (the prompt files' size column), the bucket rule against
hand-computed sizes, generation at the bucket sizes, a latent cache of several sizes, training
batches of one bucket each (resumed bitwise), and the dry run's memory at the largest bucket."""

import json
import os
import shutil

import pytest
import torch
from PIL import Image

from artaug_ext.buckets import SizeError, bucket_size, parse_size, training_bucket
from artaug_ext.errors import FileFormatError
from artaug_ext.eval.prompts import prompt_sizes, read_prompt_file

pytestmark = pytest.mark.usefixtures("one_thread")


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------------------- the size column


def test_size_column_in_tsv_csv_and_jsonl(tmp_path):
    tsv = write(tmp_path, "p.tsv", "prompt\tcategory\tsize\na cat\tanimal\t1024x768\na dog\tanimal\t\n"
                                   "a tree\tplant\t 512 X 1024 \n")
    items = read_prompt_file(tsv)
    assert [(i.prompt, i.category, i.size) for i in items] == [
        ("a cat", "animal", (1024, 768)), ("a dog", "animal", None), ("a tree", "plant", (512, 1024))]
    csv_path = write(tmp_path, "p.csv", 'Prompts,Size\n"a cat, sitting",768x1024\na dog,\n')
    assert [(i.prompt, i.size) for i in read_prompt_file(csv_path)] == [("a cat, sitting", (768, 1024)),
                                                                        ("a dog", None)]
    jsonl = write(tmp_path, "p.jsonl", '{"prompt": "a", "size": "640x480"}\n{"prompt": "b", "width": 480, '
                                       '"height": 640}\n{"prompt": "c"}\n')
    items = read_prompt_file(jsonl)
    assert [i.size for i in items] == [(640, 480), (480, 640), None]
    assert prompt_sizes(items) == [(640, 480), (480, 640), None]
    # files without sizes: every item None, and no sizes for the run (made as before)
    plain = read_prompt_file(write(tmp_path, "q.txt", "a cat\na dog\n"))
    assert [i.size for i in plain] == [None, None] and prompt_sizes(plain) is None


@pytest.mark.parametrize("name,text,line,says", [
    ("a.tsv", "prompt\tsize\nok\t64x64\nbad\t1024\n", 3, "is not WxH"),
    ("b.tsv", "prompt\tsize\nbad\t1000x768\n", 2, "multiples of 16.*use 1008x768"),
    ("c.csv", "prompt,size\nbad,0x64\n", 2, "a side of 0 or less"),
    ("d.csv", "prompt,size\nok,64x64\nok,32x32\nbad,8208x1024\n", 4, "above 8192"),
    ("e.tsv", "prompt\tsize\nbad\t2048x128\n", 2, "more elongated than 8:1"),
    ("f.jsonl", '{"prompt": "a", "size": 1024}\n', 1, '"size" is 1024, not text'),
    ("g.jsonl", '{"prompt": "a"}\n{"prompt": "b", "width": 64}\n', 2, 'only one of "width" and "height"'),
    ("h.jsonl", '{"prompt": "a", "width": 64.5, "height": 64}\n', 1, "not two whole numbers"),
    ("i.jsonl", '{"prompt": "a", "size": "64x64", "width": 64, "height": 64}\n', 1, 'both "size" and'),
])
def test_a_bad_size_is_one_line_naming_the_file_and_line(tmp_path, name, text, line, says):
    path = write(tmp_path, name, text)
    with pytest.raises(FileFormatError, match=says) as e:
        read_prompt_file(path)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{path}:{line}: line {line}: ") and "Fix: " in message


def test_parse_size_refuses_what_check_refuses():
    assert parse_size("1024x768") == (1024, 768) and parse_size("16×16") == (16, 16)
    for bad in ("", "x", "1024x", "-16x16", "16x16x16", "16.0x16"):
        with pytest.raises(SizeError):
            parse_size(bad)


# ---------------------------------------------------------------------------- the bucket rule

# (requested width, height, budget in pixels) -> the bucket, worked out by hand from the rule in
# artaug_ext/buckets.py (sides multiples of 16, area <= budget, the nearest aspect among the
# largest heights a width allows, then the larger area).
TABLE = [
    ((1024, 768, 1024 * 1024), (1024, 768)),    # fits: itself
    ((768, 1024, 1024 * 1024), (768, 1024)),
    ((2048, 2048, 1024 * 1024), (1024, 1024)),  # square: the budget's side
    ((2048, 1024, 1024 * 1024), (1440, 720)),   # 2:1: 1440 x 720 = 1,036,800 (H 736 needs W 1472: too large)
    ((1536, 1024, 1024 * 1024), (1248, 832)),   # 3:2: 1248 x 832 = 1,038,336
    ((2560, 1024, 1024 * 1024), (1600, 640)),   # 5:2: 1600 x 640 = 1,024,000 (docs/recipes.md's example)
    ((8192, 1024, 1024 * 1024), (2864, 352)),   # 8:1: H 352 needs W >= 2864 (8.14); H 368 allows W 2848 (7.74)
    ((128, 64, 64 * 64), (80, 48)),             # 2:1 on a tiny budget: 80x48 (5:3) beats 96x32 (3:1)
    ((64, 128, 64 * 64), (48, 80)),             # and its mirror
    ((64, 48, 64 * 64), (64, 48)),
    ((256, 192, 128 * 128), (144, 112)),        # 4:3 at 16384: 144 x 112 = 16128
]


@pytest.mark.parametrize("request_,bucket", TABLE)
def test_bucket_against_a_hand_computed_table(request_, bucket):
    assert bucket_size(*request_) == bucket


def test_every_bucket_is_in_budget_on_the_patch_grid_and_its_mirror_is_mirrored():
    for budget in (64 * 64, 128 * 128, 512 * 512, 1024 * 1024, 1024 * 768):
        for w in range(16, 1025, 48):
            for h in range(16, 1025, 80):
                if max(w, h) > 8 * min(w, h):
                    continue
                bw, bh = bucket_size(w, h, budget)
                assert bw % 16 == 0 and bh % 16 == 0 and bw * bh <= budget
                if w * h <= budget:
                    assert (bw, bh) == (w, h)
                if w * h > budget and budget in (64 * 64, 128 * 128, 512 * 512, 1024 * 1024):  # square budgets
                    assert bucket_size(h, w, budget) == (bh, bw)


def test_training_resolution_is_the_side_for_square_pairs_and_a_budget_for_others():
    assert training_bucket(1024, 1024, 512) == (512, 512)  # as `[train] resolution` means without buckets
    assert training_bucket(1024, 768, None) == (1024, 768)
    assert training_bucket(1024, 768, 1024) == (1024, 768)  # fits the budget: as generated
    assert training_bucket(2048, 1024, 1024) == (1440, 720)


# ---------------------------------------------------------------------------- generation


def test_interact_makes_each_prompt_at_its_bucket_and_records_it(tmp_path, pipe, monkeypatch):
    from artaug_ext.interact.config import InteractConfig
    from artaug_ext.interact.loop import run_interact
    from artaug_ext.interact.manifest import read_manifest

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    prompts = ["a red circle on a blue background, dim light", "a yellow star in the top left, bright light",
               "a white square on a black background, overexposed"]
    # budget 64 x 64: 64x48 fits; 128x64 (2:1) is scaled down to 80x48; no size: 64x64
    cfg = InteractConfig(prompts=prompts, model="tiny-random", steps=2, height=64, width=64,
                         sizes=[(64, 48), (128, 64), None])
    run = tmp_path / "run"
    run_interact(cfg, str(run), pipe=pipe, progress=False)
    records = read_manifest(str(run / "manifest.jsonl"))
    want = [(64, 48), (80, 48), (64, 64)]
    assert [(r["width"], r["height"]) for r in records] == want
    enhanced = 0
    for r, size in zip(records, want, strict=True):
        assert Image.open(run / r["original"]).size == size
        if r["enhanced"]:
            enhanced += 1
            assert Image.open(run / r["enhanced"]).size == size
    assert enhanced, "the heuristic critic enhanced nothing: the test would not see an enhanced image"
    assert json.loads((run / "run.json").read_text())["sizes"] == [[64, 48], [128, 64], None]
    # without sizes, run.json holds no sizes key (folders made before sizes existed still resume)
    plain = tmp_path / "plain"
    run_interact(InteractConfig(prompts=prompts[:1], model="tiny-random", steps=2, height=64, width=64), str(plain),
                 pipe=pipe, progress=False)
    assert "sizes" not in json.loads((plain / "run.json").read_text())
    with pytest.raises(ValueError, match="2 sizes for 3 prompts"):
        run_interact(InteractConfig(prompts=prompts, model="tiny-random", steps=2, sizes=[None, (64, 64)]),
                     str(tmp_path / "x"), pipe=pipe, progress=False)


def test_artaug_interact_refuses_a_bad_size_before_any_model_loads(tmp_path, monkeypatch, capsys):
    from artaug_ext import pipeline
    from artaug_ext.cli import main

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the prompt file was checked")

    monkeypatch.setattr(pipeline, "load_pipeline", no_model)
    prompts = write(tmp_path, "p.tsv", "prompt\tsize\na cat\t100x100\n")
    assert main(["interact", "--model", "tiny-random", "--prompts", prompts, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{prompts}:2: line 2: size 100x100" in err and "use 96x96" in err


# ---------------------------------------------------------------------------- cache and training


def _pairs(tmp_path, sizes):
    """Pairs of random images (original, enhanced) of the given sizes."""
    from artaug_ext.interact.pairs import Pair

    g = torch.Generator().manual_seed(0)
    pairs = []
    for i, (w, h) in enumerate(sizes):
        paths = []
        for side in ("original", "enhanced"):
            pixels = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
            path = tmp_path / f"{i}.{side}.png"
            Image.fromarray(pixels).save(path)
            paths.append(str(path))
        pairs.append(Pair(f"{i:05d}-00", f"a red circle number {i}", *paths))
    return pairs


SIZES = [(64, 48), (48, 64), (64, 48), (64, 64), (48, 64)]


@pytest.fixture(scope="module")
def bucketed_cache(tmp_path_factory, pipe):
    from artaug_ext.pipeline import t5_sequence_length
    from artaug_ext.train.cache import build_cache, load_cache

    tmp = tmp_path_factory.mktemp("buckets")
    pairs = _pairs(tmp, SIZES)
    folder = tmp / "cache"
    assert build_cache(pipe, pairs, str(folder), t5_sequence_length=t5_sequence_length("tiny-random"), bucketed=True,
                       progress=False) == len(pairs)
    return pairs, folder, load_cache(str(folder), [p.id for p in pairs])


def test_the_cache_keeps_each_pairs_size(bucketed_cache, pipe, tmp_path):
    from safetensors import safe_open

    from artaug_ext.pipeline import t5_sequence_length
    from artaug_ext.train.cache import build_cache

    pairs, folder, cache = bucketed_cache
    assert cache.buckets() == [(16, h // 8, w // 8) for w, h in SIZES]
    assert isinstance(cache.original, list) and torch.is_tensor(cache.prompt_emb)
    for p, (w, h) in zip(pairs, SIZES, strict=True):
        with safe_open(str(folder / f"{p.id}.safetensors"), "pt") as f:
            meta = f.metadata()
            assert (meta["width"], meta["height"]) == (str(w), str(h))
            assert tuple(f.get_tensor("enhanced").shape) == (16, h // 8, w // 8)
    info = json.loads((folder / "cache.json").read_text())
    assert info["buckets"] is True and "width" not in info
    # without buckets, pairs of several sizes are refused as before
    with pytest.raises(FileFormatError, match="but the round's images are 64x48"):
        build_cache(pipe, pairs, str(tmp_path / "flat"), t5_sequence_length=t5_sequence_length("tiny-random"),
                    progress=False)


def test_bucket_batches_are_one_bucket_each_seeded_and_full():
    from artaug_ext.train.loop import BucketBatches, EpochPermutation, sample_order

    keys = ["a", "b", "a", "c", "b", "a", "a"]
    order = BucketBatches(keys, seed=3, batch_size=2)
    assert order.per_epoch == 2 + 1 + 1  # a: 4 samples, b: 2, c: 1 (filled up to 2)
    epoch = [order.indices(k * 2, 2) for k in range(order.per_epoch)]
    for batch in epoch:
        assert len(batch) == 2 and len({keys[i] for i in batch}) == 1
    assert sorted({i for b in epoch for i in b}) == list(range(len(keys)))
    again = BucketBatches(keys, seed=3, batch_size=2)
    assert [again.indices(k * 2, 2) for k in range(3 * order.per_epoch)] == \
        [order.indices(k * 2, 2) for k in range(3 * order.per_epoch)]
    other = BucketBatches(keys, seed=4, batch_size=2)
    assert [other.indices(k * 2, 2) for k in range(3 * order.per_epoch)] != \
        [order.indices(k * 2, 2) for k in range(3 * order.per_epoch)]
    with pytest.raises(ValueError, match="a whole batch at a time"):
        order.indices(1, 2)
    # one bucket: the order of a run without buckets
    one = sample_order(5, 7, 2, ["x"] * 5)
    assert isinstance(one, EpochPermutation) and one.indices(0, 10) == EpochPermutation(5, 7).indices(0, 10)


def test_a_bucketed_stage_batches_by_bucket_and_resumes_bitwise(bucketed_cache, pipe, tmp_path, monkeypatch):
    from artaug_ext.train import cache as cache_module
    from artaug_ext.train.differential import BUCKET_BATCHES, LoRATrainSettings, train_round_lora

    _, _, cache = bucketed_cache
    shapes = []
    batch = cache_module.LatentCache.batch

    def recording(self, image_side, indices):
        out = batch(self, image_side, indices)
        shapes.append(tuple(out["latents"].shape[1:]))
        return out

    monkeypatch.setattr(cache_module.LatentCache, "batch", recording)
    settings = LoRATrainSettings(rank=2, steps_stage1=3, steps_stage2=4, batch_size=2, checkpoint_every=1, lr=1e-2)
    done = tmp_path / "done"
    train_round_lora(pipe.dit, cache, settings, str(done), progress=False)
    assert len(shapes) == 3 + 4 and set(shapes) == set(cache.buckets())  # every bucket drawn, a batch each
    record = json.loads((done / "stage2" / "stage.json").read_text())
    assert record["batches"] == BUCKET_BATCHES
    # killed inside stage 2 after its 3rd step's checkpoint: the same command resumes bitwise
    mid = tmp_path / "mid"
    shutil.copytree(done, mid)
    for name in ("lora.safetensors", "train.json", "stage2/lora.safetensors", "stage2/gap.json"):
        os.remove(mid / name)
    shutil.rmtree(mid / "stage2" / "checkpoint-4")
    train_round_lora(pipe.dit, cache, settings, str(mid), progress=False)
    assert (mid / "lora.safetensors").read_bytes() == (done / "lora.safetensors").read_bytes()
    assert (mid / "stage2" / "loss.jsonl").read_text().count("\n") == 4
    # one bucket: no batches key, the identity of a stage made before buckets existed
    one = cache.subset([0, 2])
    train_round_lora(pipe.dit, one, settings, str(tmp_path / "one"), progress=False)
    assert "batches" not in json.loads((tmp_path / "one" / "stage2" / "stage.json").read_text())


# ---------------------------------------------------------------------------- the dry run


def test_the_dry_run_counts_memory_at_the_largest_bucket(tmp_path):
    from artaug_ext.recipe.config import load_recipe
    from artaug_ext.recipe.plan import describe, recipe_buckets

    def recipe(prompts):
        path = tmp_path / f"{prompts}.toml"
        path.write_text(f'[run]\nmodel = "flux-dev"\n[data]\nprompts = "{prompts}"\nsize = 1024\n'
                        '[train]\nresolution = 512\n')
        return load_recipe(str(path))

    write(tmp_path, "wide.tsv", "prompt\tsize\na beach\t2048x1024\na road\t1536x1024\n")
    write(tmp_path, "plain.txt", "a beach\na road\n")
    wide, plain = recipe("wide.tsv"), recipe("plain.txt")
    assert recipe_buckets(plain) is None
    made, trained = recipe_buckets(wide)
    assert made == [(1440, 720), (1248, 832)]  # 1,036,800 and 1,038,336 pixels: the second is the largest
    assert trained == [(720, 352), (624, 416)]  # under 512 x 512 = 262,144 pixels
    text = describe(wide)
    assert "2 generated (1440x720, 1248x832), 2 trained (720x352, 624x416)" in text
    assert "at the largest buckets: 1248x832 generated, 624x416 trained" in text
    assert "buckets (" not in describe(plain)

    def gpu_training(text):
        line = next(line for line in text.splitlines() if "GPU memory per process" in line)
        return float(line.split("generation, ")[1].split(" GB")[0]), float(line.split(", activations ")[1].split(" GB")[0])

    (wide_gb, wide_act), (plain_gb, plain_act) = gpu_training(text), gpu_training(describe(plain))
    # 624 x 416 = 259,584 pixels = 1014 tokens against 512 x 512 = 1024: a little less activation memory
    assert wide_act < plain_act and wide_gb <= plain_gb


# ---------------------------------------------------------------------------- artaug run


def _bucketed_recipe(tmp_path, sizes=("64x48", "48x64", "")):
    from helpers import MICRO_PROMPTS, micro_recipe

    rows = "".join(f"{p}\t{s}\n" for p, s in zip(MICRO_PROMPTS, sizes, strict=True))
    (tmp_path / "sized.tsv").write_text("prompt\tsize\n" + rows, encoding="utf-8")
    return micro_recipe(tmp_path / "bucketed.toml", run={"rounds": 1}, data={"prompts": "sized.tsv"},
                        filter={"margin": -1.0}, train={"resolution": None})


def test_artaug_run_dry_run_refuses_a_bad_size_naming_the_line(tmp_path, capsys):
    from artaug_ext.cli import main

    recipe = _bucketed_recipe(tmp_path, sizes=("64x48", "64x40", ""))
    assert main(["run", str(recipe), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "sized.tsv:3: line 3: size 64x40" in err and "use 64x48" in err


@pytest.mark.slow
def test_artaug_run_of_a_bucketed_recipe_generates_caches_and_trains_by_bucket(tmp_path):
    """A round whose prompts carry sizes, in this process: items at their buckets, a cache of
    several buckets, stages recorded as batched by bucket, and the run record holding the sizes."""
    from artaug_ext.recipe.config import load_recipe
    from artaug_ext.recipe.runner import run_recipe
    from artaug_ext.train.cache import load_cache
    from artaug_ext.train.differential import BUCKET_BATCHES

    recipe = _bucketed_recipe(tmp_path)
    out = tmp_path / "run"
    summary = run_recipe(load_recipe(str(recipe)), str(out), device="cpu", progress=False)
    assert summary["stopped"] is None and os.path.isfile(out / "final" / "lora.safetensors")
    assert json.loads((out / "run.json").read_text())["sizes"] == [[64, 48], [48, 64], None]
    round_dir = out / "rounds" / "round-01"
    records = [json.loads(line) for line in (round_dir / "interact" / "manifest.jsonl").read_text().splitlines()]
    assert [(r["width"], r["height"]) for r in records] == [(64, 48), (48, 64), (64, 64)]
    kept = [r for r in records if r["kept"]]
    cache = load_cache(str(round_dir / "cache"), [r["id"] for r in kept])
    assert cache.buckets() == [(16, r["height"] // 8, r["width"] // 8) for r in kept]
    assert len(set(cache.buckets())) >= 2, "the micro round kept pairs of one size: nothing batched by bucket"
    for stage in ("stage1", "stage2"):
        assert json.loads((round_dir / stage / "stage.json").read_text())["batches"] == BUCKET_BATCHES
