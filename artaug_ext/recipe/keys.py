"""What every recipe key means, in a sentence, for the recipe-keys reference page.

The keys, their types and defaults come from the recipe's dataclasses (`config.py`, and
`train.settings.LoRATrainSettings` for [train]); this table holds only their meaning, so the
reference page (`docs/recipe-keys.md`, written by `docs/gen_recipe_keys.py`) cannot drift from
the code, and the docs tests fail when a key has no sentence here, or a sentence names a key
that no longer exists.
"""

from __future__ import annotations

SECTION_MEANINGS = {
    "run": "The run as a whole: which base model, how many rounds, when to stop, the final LoRA's rank.",
    "data": "The training prompts and how each round's images are generated.",
    "critic": "The understanding backend that looks at each image and suggests regions to improve.",
    "filter": "Which scorer compares original and enhanced images, and which pairs are kept for training.",
    "enhance": "The regional regeneration of an image from the critic's suggestions.",
    "train": "The differential LoRA of each round: how it is made and how it is optimised.",
    "eval": "The held-out check of the final LoRA against the base (the table is optional).",
    "estimate": "Per-unit figures the `--dry-run` GPU-hours estimate multiplies (the table is optional).",
}

KEY_MEANINGS = {
    "run": {
        "model": "The base model: a named model of `artaug_ext.cards` (`flux-dev`, `tiny`, `tiny-random`).",
        "rounds": "How many rounds of generate, critique, enhance, filter, train and merge to run at most.",
        "seed": "The first round's generation seed; later rounds add 100000 a round when "
                "`data.shuffle_seed_per_round` is on.",
        "stop_kept_fraction": "Stop after a round that keeps less than this share of its items (0: never).",
        "stop_mean_gain": "Stop after a round whose enhanced items, kept or not, gain less than this on "
                          "average; left out, no such rule.",
        "final_rank": "Rank of the combined LoRA in `final/` (QR + SVD truncation, retained energy reported); "
                      "left out, the exact sum of the round LoRAs.",
        "name": "A name for the run, recorded in the model card and shown in the report.",
        "quantize": "A DiffSynth quantisation method for the frozen DiT (`torchao_int8_w8a16`, "
                    "`torchao_fp8_w8a16`, `bitsandbytes_nf4`, ...; the `quant` extra): generation, enhancement and "
                    "both stages run on the quantised base, and every LoRA on it is hot-loaded instead of merged. "
                    "Checked at `--dry-run`: known to DiffSynth, its backend installed, differentiable.",
        "text_encoders": "How the CLIP and T5 encoders are held: `resident` (in the pipeline's dtype on the "
                         "device), `quantized` (with `run.quantize`'s method) or `offloaded` (on the host, each "
                         "layer moved to the device for its forward by DiffSynth's VRAM management).",
    },
    "data": {
        "prompts": "The training prompts: a prompt set name (`default/train`, `tiny-heldout-lit/dev`, ...), "
                   "a file relative to the recipe (any format `artaug eval` reads), or an inline list. A "
                   "file's `size` column (WxH) gives a prompt its own size: an aspect-ratio bucket under the "
                   "pixel budget of `data.size` (docs/recipes.md, aspect-ratio buckets).",
        "images_per_prompt": "Images generated per prompt and round, each on its own seed.",
        "size": "Generation size: N or [width, height], multiples of 16; left out, the model's default. With "
                "prompts that carry sizes, the pixel budget of their buckets.",
        "steps": "Denoising steps of each generation; left out, the model's default.",
        "guidance": "Embedded guidance for generating (training has its own, `train.guidance`).",
        "shuffle_seed_per_round": "New seeds each round (the same prompts, new images); false: every round "
                                  "generates from the same seeds.",
    },
    "critic": {
        "backend": "`heuristic` (reads the prompt's scene, no model), `openai` (any OpenAI-compatible VLM "
                   "server) or `transformers` (a local Qwen-VL through transformers).",
        "max_suggestions": "At most this many regions (box + local prompt) per image.",
        "model": "The VLM's name on the server (`openai`) or its local folder (`transformers`).",
        "base_url": "The OpenAI-compatible server's URL, e.g. `http://localhost:8000/v1` (`openai` only).",
        "api_key_env": "The environment variable that holds the server's API key (none set is fine for a "
                       "local server).",
        "convention": "How the VLM writes boxes: `qwen2-vl`, `qwen2.5-vl`, `qwen3-vl` or `glm-v`; left out, "
                      "guessed from the model's name.",
        "concurrency": "Requests in flight at once to the server (`openai` only).",
    },
    "filter": {
        "scorer": "The scorer, or several joined by `+`: `heuristic`, `analyser`, `separation`, `aesthetic`, "
                  "`pickscore`, `clip`, `hpsv2`, `imagereward`.",
        "margin": "A pair is kept when the enhanced image beats the original by more than this on every "
                  "quality score.",
        "relative": "Read `margin` relative to the original's score instead of as an absolute difference.",
        "alignment_tolerance": "How far an alignment score (text-image match) may drop in a kept pair.",
        "keep": "Which pairs a round trains on: `score` (the scorer's verdict: `margin` and "
                "`alignment_tolerance`) or `enhanced` (every item the critic had a usable suggestion for).",
        "keep_fraction": "Train on the best share of the kept pairs by gain, in (0, 1].",
        "max_pairs": "Train on at most this many pairs a round (the best by gain); left out, no limit.",
    },
    "enhance": {
        "region_scale": "Weight of each suggestion's local prompt in the regional blend (`s_i` of the "
                        "ArtAug formula).",
    },
    "train": {
        "mode": "`batched` (one LoRA_1 / LoRA_2 over all pairs), `per-pair` (one per pair, averaged "
                "exactly), `sft` (the ablation: the enhanced images only) or `dpo` (Flow-DPO: both images of "
                "each pair under the same noise and timestep, enhanced preferred, the running base as "
                "reference).",
        "dpo_sft_weight": "`dpo` mode: weight of the enhanced images' own flow-matching loss added to the DPO "
                          "loss (0: pure DPO), which keeps both images' errors from rising together.",
        "dpo_beta": "`dpo` mode: Flow-DPO's beta, how strongly the LoRA is held to the running base while it "
                    "ranks each pair's enhanced image above its original.",
        "rank": "LoRA rank.",
        "alpha": "LoRA alpha; left out, alpha = rank (scale 1).",
        "target_modules": "DiffSynth FLUX layer names that get a LoRA (DiffSynth's FLUX training defaults).",
        "steps_stage1": "Training steps of stage 1 (LoRA_1 on the originals); unused in `sft` and `dpo`.",
        "steps_stage2": "Training steps of stage 2 (LoRA_2 on the enhanced images, LoRA_1 merged), or of the "
                        "one stage of `sft` and `dpo`.",
        "resolution": "Longer side of the training images, a multiple of 16 at most the generation size; "
                      "left out, as generated. With prompts that carry sizes, each pair is trained at its "
                      "bucket under resolution x resolution pixels (the same for square images).",
        "gradient_checkpointing": "Recompute activations in the backward pass: the same gradients, less memory.",
        "timestep_sampling": "`diffsynth` (DiffSynth's FLUX training timesteps and weights) or `logit-normal` "
                             "(unweighted).",
        "weighting": "Loss weighting of `timestep_sampling = \"diffsynth\"`: `diffsynth` or `uniform`.",
        "guidance": "Embedded guidance the LoRAs train at; left out, the base model's authors' setting where "
                    "one is known (FLUX.1-dev: 1), else 3.5.",
        "per_pair_rank": "`per-pair` mode: rank of the averaged LoRA; left out, `rank`.",
        "lr": "Learning rate (of `optimizer`).",
        "batch_size": "Samples per process and micro-batch.",
        "grad_accum": "Micro-batches accumulated per optimizer step.",
        "schedule": "Learning-rate schedule after warm-up: `constant`, `cosine` or `linear`.",
        "warmup_steps": "Linear warm-up steps.",
        "max_grad_norm": "Gradient-norm clipping bound (0: no clipping).",
        "mixed_precision": "`auto` (bf16 on CUDA, fp32 on CPU), `no`, `bf16` or `fp16`.",
        "seed": "Training seed: noise, timesteps, sample order and the LoRA's initialisation.",
        "checkpoint_every": "Write a resumable checkpoint every this many steps (0: none).",
        "log_with": "An accelerate tracker, `tensorboard` or `wandb`, for the training losses.",
        "optimizer": "`adamw` (torch's AdamW) or `adamw8bit` (bitsandbytes' AdamW with 8-bit moments, a quarter "
                     "of the optimiser state's memory; needs the `quant` extra), with the same lr, betas and "
                     "weight decay.",
        "ema_decay": "An exponential moving average of the LoRA weights, updated after every step with this "
                     "decay in (0, 1), is the stage's LoRA (and its paired gap); left out, the last step's weights.",
        "sample_every": "Every this many steps of each stage, and at its last step, the LoRA in training draws "
                        "the sample prompts into the stage's `samples/` folder, shown in `report.html` (0: none; "
                        "the trained weights are the same either way).",
        "sample_prompts": "The prompts of the sample images, the same for every stage and round; left out, the "
                          "first 2 training prompts.",
        "sample_seed": "The seed of every sample image, so images of different steps, stages and rounds differ "
                       "only by the model.",
    },
    "eval": {
        "prompts": "Held-out prompts: a prompt set name or a file.",
        "limit": "A sample of this many prompts, drawn with `run.seed` and kept in their order (all when there are fewer).",
        "seeds": "Images per prompt and arm, on the same seeds for the base and the LoRA.",
        "seed": "Where the held-out seeds start (far from the training seeds).",
        "scorer": "The scorers of the check, joined by `+` (`fidelity`, the tiny model's judge, allowed here).",
        "steps": "Denoising steps; left out, `data.steps`.",
        "size": "Image side; left out, `data.size` when it is one number, else the model's default.",
    },
    "estimate": {
        "image_seconds": "Seconds for one image at the recipe's size and steps on one GPU; left out, the model "
                         "card's figure.",
        "critic_seconds": "Seconds for one critic answer (a VLM critic; the heuristic costs nothing).",
        "train_step_seconds": "Seconds for one training step on one GPU; left out, the model card's figure.",
        "source": "Where the figures come from, printed beside the estimate.",
    },
}
