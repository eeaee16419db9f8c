"""
common.py: everything that is not a method.

The three method files (dive_k.py, speciarl.py, fine_r1.py) each hold their own prompt, rollout, reward, advantage,
loss and update loop. What they share lives here, in execution order:

  1. distributed setup for torchrun (nccl on GPU, gloo on CPU) and rank-0 printing
  2. model + processor loading: any Qwen2.5-VL checkpoint, the `tiny` stand-in, random presets of the real shapes
  3. datasets: readers for the official layouts (CUB, Flowers102, Pets, Cars, Aircraft, Dogs, Food-101, a JSON/JSONL
     file of your own), the synthetic toy set, CoOp base / novel classes, few-shot sampling, class hierarchies
  4. answer parsing (the first <answer>, as the papers' code), name normalisation, the format check
 4a. the papers' prompts, one wording for the methods, eval.py and the stand-in's pretraining
 4b. answer judges: six verifier labels from `rules` (offline), `hf:<model>` (an LLM scoring each label) or
     `openai:<model>` (an LLM behind an OpenAI-compatible server), cached
  5. prompt encoding and the rollout sampler (prefill once per prompt, KV cache shared by the group)
  6. per-token log-probs of completions: each group's prompt run once (shared prefix), vocabulary scores only at
     completion positions, in chunks of a bounded size
  7. DDP / FSDP2 wrapping, gathering FSDP2 parameters once per rollout phase
  8. checkpoints (atomic, auto-resume) and export of a standard Hugging Face directory
  9. metrics logging (metrics.jsonl, optional wandb), phase timers, learning-rate schedules, shared flags
 10. the tiny stand-in: tokenizer trained in-process + a short deterministic "pretraining" on toy
 11. LoRA written by hand (SpeciaRL), merged into the exported weights
 12. robustness: non-finite guard, memory budget at start, fault injection for the tests, cache repair

Facts about Qwen2.5-VL in transformers 5.x that shape this file (see ../shared/research/feasibility.md):
  * the stock Qwen2_5_VLProcessor needs torchvision; we use an image-only subclass with the PIL image processor;
  * `mm_token_type_ids` must reach every forward, or positions silently fall back to 1-D; we go further and pass
    explicit 3-row M-RoPE `position_ids` computed once per prompt, so prefill, decode and scoring agree exactly;
  * `pixel_values` has one row per image patch: expanding a batch means repeating each image's block of rows;
  * sampled `<|image_pad|>` tokens break later forwards: the sampler suppresses image / video pad ids.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import glob
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import threading
import time
import unicodedata
import warnings
from collections import Counter
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw

# transformers is imported lazily inside functions where it is slow and not always needed; these are cheap.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

QWEN_SPECIAL_IDS = {  # the real Qwen2.5 ids; the random presets use them too
    "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
    "<|vision_end|>": 151653, "<|image_pad|>": 151655, "<|video_pad|>": 151656,
}
DEFAULT_SYSTEM = "You are a helpful assistant."
CACHE_DIR = os.environ.get("FGRL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "fgrl"))


# =====================================================================================================================
# 1. Distributed setup
# =====================================================================================================================

@dataclasses.dataclass
class Dist:
    rank: int = 0  # global rank
    local_rank: int = 0  # rank on this node (picks the GPU)
    world_size: int = 1  # number of processes
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> Dist:
    """Read torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE) and start the process group if there is one.
    nccl on GPU, gloo on CPU. A plain `python script.py` gives a single-process Dist."""
    rank, local_rank, world = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    use_cuda = torch.cuda.is_available() and device != "cpu"
    dev = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        # a generous timeout: mining or evaluation on one rank can take long while others wait at a barrier
        # on GPU two backends: nccl for CUDA tensors, gloo for the small CPU tensors (token counts, metrics) that
        # are all-reduced too; nccl alone cannot reduce CPU tensors
        dist.init_process_group("cpu:gloo,cuda:nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=60))
    if not use_cuda and world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    return Dist(rank, local_rank, world, dev)


def print0(*args, **kwargs):
    """print on rank 0 only (flushes, so logs interleave sensibly under torchrun)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (in place, returned for chaining). A no-op without a process group."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_gather_objects(obj: Any) -> list:
    """Gather one picklable object from every rank into a list (rank order). [obj] without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


# =====================================================================================================================
# 2. Model and processor loading
# =====================================================================================================================

# The Qwen2-VL / Qwen2.5-VL chat format: system, then user turns whose content is a list of image and text items,
# `<|vision_start|><|image_pad|><|vision_end|>` per image, `<|im_start|>assistant\n` as the generation prompt.
# Written for the locally built tokenizers; real checkpoints bring their own template.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _processor_class():
    from transformers import Qwen2_5_VLProcessor

    class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
        """Qwen2.5-VL processor without the video half. The stock class builds a video processor, which imports
        torchvision; ProcessorMixin derives the list of sub-processors from this __init__ signature, so leaving
        `video_processor` out of it gives an image-only processor that saves and loads like the stock one."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                             chat_template=chat_template, **kwargs)

    return ImageOnlyQwen2_5_VLProcessor


_PROCESSOR_CLS = None


def processor_class():
    """The image-only processor class (built once; needs transformers imported)."""
    global _PROCESSOR_CLS
    if _PROCESSOR_CLS is None:
        _PROCESSOR_CLS = _processor_class()
    return _PROCESSOR_CLS


def make_image_processor(min_pixels: int, max_pixels: int):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)


def load_processor(path: str, min_pixels: int | None = None, max_pixels: int | None = None):
    """Load the image-only processor from a checkpoint directory or hub id; optionally override the pixel budget.
    (AutoProcessor would silently return a bare tokenizer for this class, so we name the class.)"""
    proc = processor_class().from_pretrained(path)
    set_pixel_budget(proc, min_pixels, max_pixels)
    return proc


def set_pixel_budget(processor, min_pixels: int | None, max_pixels: int | None):
    """Override the image processor's pixel budget (its `size` dict; the min_pixels / max_pixels call arguments
    are deprecated in transformers 5.x)."""
    ip = processor.image_processor
    if min_pixels is not None:
        ip.size["shortest_edge"] = min_pixels
    if max_pixels is not None:
        ip.size["longest_edge"] = max_pixels


DTYPES = ("auto", "bf16-mixed", "bf16", "fp32")  # the --dtype choices (see precision_for)


def resolve_dtype(name: str | torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype weights are loaded in: 'auto' = bf16 on GPU, fp32 on CPU; 'bf16-mixed' loads fp32 (bf16 is the
    compute, see precision_for). A torch.dtype is returned as it is."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16-mixed": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32,
            "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16}[name]


RANDOM_PRESETS = {  # the published shapes of Qwen2.5-VL-3B / 7B (SPEC section 2), random weights, and two small ones
    # for bench.py on CPU: 30m has a small vocabulary, so its time goes to the decoder layers as a big model's does;
    # 35m has the real 151,936-token vocabulary, for the memory of scoring at that vocabulary
    "qwen2.5-vl-30m-random": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                                  num_key_value_heads=2, vocab_size=None, tie=False,
                                  vision=dict(depth=4, hidden_size=256, intermediate_size=1024, num_heads=4,
                                              fullatt_block_indexes=[3])),
    "qwen2.5-vl-35m-random": dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=151936, tie=True,
                                  vision=dict(depth=4, hidden_size=256, intermediate_size=1024, num_heads=4,
                                              fullatt_block_indexes=[3])),
    "qwen2.5-vl-3b-random": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                                 num_attention_heads=16, num_key_value_heads=2, vocab_size=151936, tie=True),
    "qwen2.5-vl-7b-random": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                 num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie=False),
}


def qwen_vl_config(*, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads,
                   vocab_size, tie, special_ids, vision: dict | None = None, rope_theta=1e6, max_positions=32768):
    """A Qwen2_5_VLConfig with every size given at construction (changing sizes afterwards breaks the build)."""
    from transformers import Qwen2_5_VLConfig
    head_dim = hidden_size // num_attention_heads
    # M-RoPE splits head_dim/2 rotary frequencies into (temporal, height, width) sections: [16,24,24] for 128
    quarter = head_dim // 2 // 8
    mrope_section = [2 * quarter, 3 * quarter, 3 * quarter]
    assert sum(mrope_section) == head_dim // 2, "head_dim must be a multiple of 16 for the M-RoPE split"
    vision = vision or dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                            fullatt_block_indexes=[7, 15, 23, 31])
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                         num_key_value_heads=num_key_value_heads, max_position_embeddings=max_positions,
                         rms_norm_eps=1e-6, tie_word_embeddings=tie,
                         rope_parameters={"rope_type": "default", "rope_theta": rope_theta,
                                          "mrope_section": mrope_section},
                         bos_token_id=special_ids["<|endoftext|>"], eos_token_id=special_ids["<|im_end|>"],
                         pad_token_id=special_ids["<|endoftext|>"]),
        vision_config=dict(in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           out_hidden_size=hidden_size, tokens_per_second=2, **vision),
        image_token_id=special_ids["<|image_pad|>"], video_token_id=special_ids["<|video_pad|>"],
        vision_start_token_id=special_ids["<|vision_start|>"], vision_end_token_id=special_ids["<|vision_end|>"],
        tie_word_embeddings=tie)


def train_tokenizer(corpus: Iterable[str], vocab_size: int, special_ids: dict[str, int] | None = None):
    """A byte-level BPE with Qwen's pre-tokenizer regex, trained in-process (a fraction of a second), wrapped as a
    Qwen2Tokenizer with the Qwen special tokens and the Qwen2.5-VL chat template. `special_ids` places the special
    tokens at given ids (the real Qwen ids for the random presets); by default they follow the BPE vocabulary."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    state = json.loads(bpe.to_str())
    vocab = dict(state["model"]["vocab"])
    if special_ids is None:
        special_ids = {tok: len(vocab) + i for i, tok in enumerate(QWEN_SPECIAL_IDS)}
    vocab.update(special_ids)  # a special token already in the vocab keeps its id when registered below
    tok = Qwen2Tokenizer(vocab=vocab, merges=[tuple(m) for m in state["model"]["merges"]], eos_token="<|im_end|>",
                         pad_token="<|endoftext|>", unk_token=None, chat_template=CHAT_TEMPLATE)
    tok.add_tokens([AddedToken(s, special=True) for s in special_ids], special_tokens=True)
    assert tok.convert_tokens_to_ids(list(special_ids)) == list(special_ids.values())
    return tok, special_ids


def build_random_preset(name: str, min_pixels: int, max_pixels: int, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32):
    """A random-initialised Qwen2.5-VL of a preset's shape and a small tokenizer whose special tokens sit at the real
    ids (or, for a preset with vocab_size None, right after its few hundred tokens), built directly on `device` in
    `dtype` (no host copy, no fp32 copy first). For speed and memory measurements only: its outputs are noise."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    spec = dict(RANDOM_PRESETS[name])
    real_ids = spec["vocab_size"] is not None
    tok, special = train_tokenizer(["a photo of a bird <think> </think> <answer> </answer>"] * 4, 300,
                                   QWEN_SPECIAL_IDS if real_ids else None)
    if not real_ids:
        spec["vocab_size"] = len(tok)
    cfg = qwen_vl_config(special_ids=special, **spec)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, dtype=dtype)
    proc = processor_class()(image_processor=make_image_processor(min_pixels, max_pixels), tokenizer=tok,
                             chat_template=CHAT_TEMPLATE)
    return model, proc


def load_model(name: str, *, device: torch.device, dtype: str | torch.dtype = "auto", attn: str = "sdpa",
               min_pixels: int | None = None, max_pixels: int | None = None):
    """(model, processor) for `name`: a hub id or local directory of any Qwen2.5-VL checkpoint, `tiny` (the locally
    built stand-in, built once and cached), or a random preset (`qwen2.5-vl-3b-random`, `qwen2.5-vl-7b-random`).
    bf16 on GPU and fp32 on CPU by default; attention `sdpa` or `flash_attention_2` (only if installed).

    The weights go straight to `device` in `dtype`: a checkpoint is read tensor by tensor from its (memory-mapped)
    safetensors onto the device, a random preset is initialised there. No rank holds a host copy of the model, nor a
    copy in another dtype; under FSDP2 each rank holds one full copy on its GPU until wrap_model shards it."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    torch_dtype = resolve_dtype(dtype, device)
    if attn == "flash_attention_2":
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            raise SystemExit("--attn flash_attention_2 asked for, but the flash-attn package is not installed "
                             "(pip install flash-attn); use --attn sdpa")
    if name in RANDOM_PRESETS:
        model, proc = build_random_preset(name, min_pixels or 3136, max_pixels or 401408, device, torch_dtype)
        model.set_attn_implementation(attn)
        return model, proc
    path = tiny_model_dir() if name == "tiny" else name
    if name != "tiny" and not os.path.exists(path) and (path.startswith((".", "/")) or os.sep in path.strip("/").replace("/", "", 1)):
        raise SystemExit(f"--model {name}: no such directory. Expected a local Qwen2.5-VL checkpoint directory "
                         f"(config.json, *.safetensors, tokenizer and processor files), a hub id, 'tiny', or one of "
                         f"{sorted(RANDOM_PRESETS)}")
    if os.path.isdir(path):
        cfg_path = os.path.join(path, "config.json")
        if not os.path.exists(cfg_path):
            raise SystemExit(f"--model {path}: config.json is missing; expected a Hugging Face Qwen2.5-VL checkpoint "
                             f"directory (config.json, model*.safetensors, tokenizer.json, preprocessor/processor config)")
        with open(cfg_path) as f:
            model_type = json.load(f).get("model_type")
        if model_type != "qwen2_5_vl":
            raise SystemExit(f"--model {path}: config.json says model_type={model_type!r}; this project trains "
                             f"Qwen2.5-VL checkpoints (model_type 'qwen2_5_vl')")
    import importlib.util
    straight = importlib.util.find_spec("accelerate") is not None  # transformers needs it for any device_map
    if not straight and device.type != "cpu":
        print0("note: the accelerate package is not installed, so the weights pass through host memory on their way "
               "to the GPU (pip install accelerate reads them straight onto it)")
    try:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            path, dtype=torch_dtype, attn_implementation=attn, **({"device_map": {"": device}} if straight else {}))
        proc = load_processor(path, min_pixels, max_pixels)
    except OSError as e:  # no weights in the folder, an unknown hub id, no network for a hub id, ...
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise SystemExit(f"--model {name}: cannot load a Qwen2.5-VL checkpoint from it ({first}). Expected a local "
                         f"directory with config.json, model*.safetensors, tokenizer and processor files, or a hub id "
                         f"that is downloaded already or reachable") from None
    return model.to(device), proc


def special_token_ids(processor) -> dict[str, int]:
    tok = processor.tokenizer
    return {name: tok.convert_tokens_to_ids(name) for name in QWEN_SPECIAL_IDS}


# =====================================================================================================================
# 3. Records, and the toy dataset
# =====================================================================================================================

@dataclasses.dataclass
class Example:
    image: str  # path to the image file
    label: int  # class index into Dataset.class_names
    class_name: str  # the clean class name ("Black footed Albatross")
    id: str = ""  # a stable identifier (relative path), used for caching and logs


@dataclasses.dataclass
class Dataset:
    name: str
    examples: list[Example]
    class_names: list[str]  # every class of the dataset, in class-id order
    kind: str  # what the objects are ("bird", "aircraft", "shape"), used in prompts
    hierarchy: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # normalised name -> ancestors, near first
    synonyms: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # normalised name -> other names
    classes: list[int] | None = None  # the class ids this split was restricted to (None = all)
    generic: list[str] = dataclasses.field(default_factory=list)  # broad words that are 'generic' for any class
    split: str = ""  # train / val / test / trainval
    root: str | None = None  # the --data-root (or the JSON file) it was read from
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)  # images dropped at load time, by reason

    def __len__(self):
        return len(self.examples)

    @property
    def split_class_names(self) -> list[str]:
        """The class names of this split (base, novel or all), in class-id order."""
        ids = self.classes if self.classes is not None else range(len(self.class_names))
        return [self.class_names[i] for i in ids]


TOY_COLOURS = {"red": (205, 40, 40), "green": (40, 160, 60), "blue": (45, 70, 210), "yellow": (225, 200, 40)}
TOY_PATTERNS = ["plain", "striped"]
TOY_SHAPES = ["circle", "square", "triangle"]
TOY_IMAGE_SIZE = 112  # 8 x 8 patches of 14 px -> 16 visual tokens after the 2x2 merge
TOY_SPLITS = {"train": (20, 1), "val": (5, 2), "test": (15, 3)}  # images per class, seed


def toy_class_names() -> list[str]:
    """24 classes = colour x pattern x shape, in a fixed shuffled order so that the CoOp base / novel halves
    (first 12 / last 12 ids) each mix every colour, pattern and shape."""
    names = [f"{c} {p} {s}" for c in TOY_COLOURS for p in TOY_PATTERNS for s in TOY_SHAPES]
    random.Random(0).shuffle(names)
    return names


def toy_hierarchy() -> dict[str, list[str]]:
    """'red striped circle' -> ['circle', 'shape']: family (the last word, like a CUB group noun), then the kind."""
    return {name: [name.split()[-1], "shape"] for name in toy_class_names()}


def draw_toy_image(name: str, rng: random.Random) -> Image.Image:
    """One toy image: a large, roughly centred shape of the class colour, plain or with white stripes, on a light
    tinted background with pixel noise. Large and centred so that a two-block vision tower can tell the shapes apart
    from which patches are covered (corners for a square, a flat base for a triangle)."""
    colour, pattern, shape = name.split()
    s = TOY_IMAGE_SIZE
    bg = tuple(rng.randint(215, 250) for _ in range(3))
    img = Image.new("RGB", (s, s), bg)
    draw = ImageDraw.Draw(img)
    fill = tuple(min(255, max(0, v + rng.randint(-25, 25))) for v in TOY_COLOURS[colour])
    half = rng.randint(36, 46)
    cx, cy = s // 2 + rng.randint(-5, 5), s // 2 + rng.randint(-5, 5)
    box = [cx - half, cy - half, cx + half, cy + half]
    mask = Image.new("L", (s, s), 0)
    mdraw = ImageDraw.Draw(mask)
    if shape == "circle":
        mdraw.ellipse(box, fill=255)
    elif shape == "square":
        mdraw.rectangle(box, fill=255)
    else:
        mdraw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=255)
    layer = Image.new("RGB", (s, s), fill)
    if pattern == "striped":
        period = rng.randint(8, 12)
        ldraw = ImageDraw.Draw(layer)
        for y in range(0, s, period):
            ldraw.rectangle([0, y, s, y + period // 2 - 1], fill=(250, 250, 250))
    img.paste(layer, (0, 0), mask)
    arr = np.asarray(img).astype(np.int16)
    noise = np.random.default_rng(rng.randint(0, 2 ** 31)).normal(0, 8, arr.shape).astype(np.int16)
    return Image.fromarray(np.clip(arr + noise, 0, 255).astype(np.uint8))


def toy_root() -> str:
    """Write the toy images once (deterministic) under the cache directory and return the folder."""
    root = os.path.join(CACHE_DIR, "toy-v1")
    if os.path.exists(os.path.join(root, "DONE")):
        return root
    tmp = f"{root}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    names = toy_class_names()
    for split, (per_class, seed) in TOY_SPLITS.items():
        rng = random.Random(seed)
        records = []
        for label, name in enumerate(names):
            for i in range(per_class):
                rel = f"{split}/{name.replace(' ', '_')}_{i:03d}.png"
                os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
                draw_toy_image(name, rng).save(os.path.join(tmp, rel))
                records.append({"image": rel, "label": label, "class_name": name})
        with open(os.path.join(tmp, f"{split}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    with open(os.path.join(tmp, "classes.txt"), "w") as f:
        f.writelines(n + "\n" for n in names)
    open(os.path.join(tmp, "DONE"), "w").close()
    try:
        os.makedirs(os.path.dirname(root), exist_ok=True)
        os.rename(tmp, root)  # atomic: a concurrent builder that lost the race just uses the winner's copy
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def load_toy(split: str) -> Dataset:
    """The synthetic toy set: train / val / test (trainval = train + val). Hierarchy: class -> shape family (the last
    word, like a CUB group noun) -> 'shape'. Each class has one synonym, colour and pattern swapped ('striped red
    circle' for 'red striped circle'), so the judges' synonym rule is exercised on toy too."""
    if split not in (*TOY_SPLITS, "trainval"):
        raise SystemExit(f"--data toy: unknown split {split!r} (train, val, test, trainval)")
    root = toy_root()
    names = toy_class_names()
    recs = []
    for part in (["train", "val"] if split == "trainval" else [split]):
        with open(os.path.join(root, f"{part}.jsonl")) as f:
            recs += [json.loads(line) for line in f]
    examples = [Example(os.path.join(root, r["image"]), r["label"], r["class_name"], r["image"]) for r in recs]
    synonyms = NameMap({n: [" ".join([n.split()[1], n.split()[0], n.split()[2]])] for n in names})
    return Dataset("toy", examples, names, "shape", hierarchy=NameMap(toy_hierarchy()), synonyms=synonyms,
                   generic=["shape", "object"], split=split, root=root)


def coop_base_novel(num_classes: int) -> tuple[list[int], list[int]]:
    """CoOp base-to-novel rule: sorted class ids, base = the first ceil(n/2), novel = the rest."""
    n_base = math.ceil(num_classes / 2)
    return list(range(n_base)), list(range(n_base, num_classes))


def select_classes(ds: Dataset, classes: str) -> Dataset:
    """Restrict a split to `base`, `novel` or `all` classes (labels keep their global ids)."""
    if classes == "all":
        return ds
    base, novel = coop_base_novel(len(ds.class_names))
    keep = {"base": base, "novel": novel}[classes]
    keep_set = set(keep)
    return dataclasses.replace(ds, examples=[e for e in ds.examples if e.label in keep_set], classes=keep)


def few_shot(ds: Dataset, shots: int, seed: int) -> Dataset:
    """k images per class, drawn with a seed (classes with fewer images keep all of theirs)."""
    rng = random.Random(seed)
    by_class: dict[int, list[Example]] = {}
    for e in ds.examples:
        by_class.setdefault(e.label, []).append(e)
    picked = []
    for label in sorted(by_class):
        items = by_class[label]
        picked.extend(rng.sample(items, min(shots, len(items))))
    return dataclasses.replace(ds, examples=picked)


# ----- the real datasets, read from their official on-disk layouts -----
# Every reader returns one split with examples in a stable order (index-file order), the full class list in class-id
# order (the CoOp base / novel rule slices it), the object kind used in prompts, and a hierarchy for the rules judge.
# Splits, as the papers use them: `test` = the official test split (CoOp test for Flowers); `val` = the official val
# where one exists (Aircraft, Flowers without CoOp file), else the CoOp split file's val when present, else 20% per
# class carved from the official train with a fixed seed (the CoOp / DiVE-k recipe); `train` = the rest of the
# official train; `trainval` = train + val (SpeciaRL samples its 3000 CUB images from the official train = trainval).

SPLITS = ("train", "val", "test", "trainval")

LAYOUTS = {
    "cub": """CUB_200_2011/
  images/NNN.Class_Name/*.jpg
  images.txt              <image_id> <path under images/>
  classes.txt             <class_id> <NNN.Class_Name>
  image_class_labels.txt  <image_id> <class_id>
  train_test_split.txt    <image_id> <1 = train, 0 = test>""",
    "flowers": """oxford_flowers/
  jpg/image_00001.jpg ...
  split_zhou_OxfordFlowers.json   CoOp split {"train": [[path under jpg/, label0, name], ...], "val": .., "test": ..}
                                  (used when present; then nothing else is needed)
  otherwise: imagelabels.mat (labels 1..102), setid.mat (trnid / valid / tstid), cat_to_name.json ("1".."102")""",
    "pets": """oxford-iiit-pet/
  images/<Breed>_<n>.jpg          (cat breeds capitalised, dog breeds lower case)
  annotations/trainval.txt        <stem> <class 1..37> <species 1 = cat, 2 = dog> <breed id>
  annotations/test.txt
  split_zhou_OxfordPets.json      optional CoOp split (paths under images/), preferred when present""",
    "cars": """stanford_cars/
  cars_train/00001.jpg ...   cars_test/00001.jpg ...
  devkit/cars_meta.mat            class_names (1 x 196)
  devkit/cars_train_annos.mat     annotations: fname, class (1-based)
  cars_test_annos_withlabels.mat  (at the root or in devkit/) annotations: fname, class
  split_zhou_StanfordCars.json    optional CoOp split (paths under the root), preferred when present""",
    "aircraft": """fgvc-aircraft-2013b/data/   (or its parent folder)
  images/<7-digit id>.jpg
  variants.txt                                   one variant per line; the order defines the labels
  images_variant_{train,val,trainval,test}.txt   <id> <variant>
  images_family_*.txt, images_manufacturer_*.txt optional: variant -> family -> manufacturer hierarchy""",
    "dogs": """stanford_dogs/
  Images/<wnid>-<Breed>/<wnid>_<n>.jpg
  train_list.mat   file_list (paths under Images/), labels (1..120)
  test_list.mat""",
    "food": """food-101/
  images/<class>/<id>.jpg
  meta/classes.txt               one class folder name per line; the order defines the labels
  meta/labels.txt                optional readable names, same order
  meta/train.txt, meta/test.txt  <class>/<id> (no extension)
  split_zhou_Food101.json        optional CoOp split (paths under images/), preferred when present""",
    "json": """a .json or .jsonl file (use {split} in the path for one file per split, e.g. data/{split}.jsonl):
  records {"image": path, "class_name": name, "split": "train"}   ("split" optional; paths relative to
  --data-root if given, else to the file's folder)
  .json may also be an object {"classes": [...], "kind": "bird", "hierarchy": {name: [parent, grandparent, ...]},
  "synonyms": {name: [...]}, "train": [records], "val": [...], "test": [...]}
  class list: the "classes" key, else classes.txt next to the file (one name per line), else the sorted names""",
}
GENERIC_TERMS = {  # broad words that count as a correct but 'generic' answer for every class of the dataset
    "cub": ["bird", "animal"], "flowers": ["flower", "plant", "flowering plant"], "pets": ["pet", "animal"],
    "cars": ["car", "vehicle", "automobile"], "dogs": ["dog", "animal", "canine"], "food": ["food", "dish", "meal"],
    "aircraft": ["aircraft", "airplane", "aeroplane", "plane", "airliner", "jet"], "json": ["object"],
}


class NameMap(dict):
    """A dict keyed by normalised names: `hierarchy["Black-footed Albatross"]` and `hierarchy["black footed
    albatross"]` are the same entry. Values stay as given (display forms)."""

    def __init__(self, items=()):
        super().__init__()
        for key, value in dict(items).items():
            self[key] = value

    def __setitem__(self, key, value):
        super().__setitem__(normalize(key), value)

    def __getitem__(self, key):
        return super().__getitem__(normalize(key))

    def __contains__(self, key):
        return isinstance(key, str) and super().__contains__(normalize(key))

    def get(self, key, default=None):
        return super().get(normalize(key), default) if isinstance(key, str) else default

    def __reduce__(self):  # pickles (all_gather_objects) as a plain mapping rebuilt through __init__
        return (NameMap, (dict(self),))


def _missing(name: str, root: str, what: str):
    raise SystemExit(f"--data {name}: {what} not found under --data-root {root}.\nExpected layout:\n{LAYOUTS[name]}")


def _need_root(name: str, root: str | None) -> str:
    if not root:
        raise SystemExit(f"--data {name} needs --data-root pointing at the dataset folder.\nExpected layout:\n"
                         f"{LAYOUTS[name]}")
    if not os.path.isdir(root):
        raise SystemExit(f"--data {name}: --data-root {root} is not a directory.\nExpected layout:\n{LAYOUTS[name]}")
    return root


def _descend(root: str, marker: str, subdirs: Sequence[str]) -> str:
    """Accept the dataset folder or a parent of it: return the first of root, root/sub... that holds `marker`."""
    for sub in ("", *subdirs):
        if os.path.exists(os.path.join(root, sub, marker)):
            return os.path.join(root, sub) if sub else root
    return root


def _require(name: str, root: str, *relpaths: str) -> list[str]:
    """Absolute paths of required files / folders; a clear SystemExit naming the first missing one."""
    out = []
    for rel in relpaths:
        path = os.path.join(root, rel)
        if not os.path.exists(path):
            _missing(name, root, rel)
        out.append(path)
    return out


def _rows(name: str, path: str, columns: int) -> list[list[str]]:
    """Whitespace-separated rows of an index file (the last column may contain spaces), '#' lines skipped; a
    malformed line stops with the file, the line number and what was expected."""
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split(None, columns - 1)
            if len(parts) < columns:
                raise SystemExit(f"--data {name}: {path} line {i}: expected {columns} columns, got {line!r}.\n"
                                 f"Expected layout:\n{LAYOUTS[name]}")
            rows.append(parts)
    return rows


def _int(name: str, path: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"--data {name}: {path}: expected an integer, got {value!r}.\n"
                         f"Expected layout:\n{LAYOUTS[name]}")


def load_mat(name: str, path: str) -> dict:
    """A MATLAB .mat file via scipy (imported only here, only for the datasets that ship .mat files)."""
    try:
        import scipy.io
    except ImportError:
        raise SystemExit(f"--data {name}: reading {path} needs scipy (pip install scipy); only the .mat-based "
                         f"datasets (flowers without its CoOp split file, cars without it, dogs) need it")
    try:
        return scipy.io.loadmat(path, squeeze_me=True, struct_as_record=True)
    except Exception as e:  # a truncated or non-MATLAB file
        raise SystemExit(f"--data {name}: cannot read {path} as a MATLAB file ({e}).\n"
                         f"Expected layout:\n{LAYOUTS[name]}")


def _mat_field(name: str, path: str, mat: dict, key: str) -> np.ndarray:
    if key not in mat:
        present = sorted(k for k in mat if not k.startswith("__"))
        raise SystemExit(f"--data {name}: {path} has no variable {key!r} (it has {present}).\n"
                         f"Expected layout:\n{LAYOUTS[name]}")
    return np.atleast_1d(mat[key])


def _mat_strings(values) -> list[str]:
    """A MATLAB cell array of strings, however scipy squeezed it, as a list of str."""
    out = []
    for v in np.atleast_1d(values).ravel():
        while isinstance(v, np.ndarray):
            v = v.ravel()[0] if v.size else ""
        out.append(str(v))
    return out


def carve_val(items: list[tuple[str, int]], frac: float = 0.2, seed: int = 1) -> tuple[list, list]:
    """Split (path, label) items into train / val per class, `frac` of each class (rounded, at least one when the
    class has two or more) to val, with a fixed seed: the CoOp `split_trainval` recipe, deterministic here."""
    by_class: dict[int, list] = {}
    for item in items:
        by_class.setdefault(item[1], []).append(item)
    rng = random.Random(seed)
    val_set = set()
    for label in sorted(by_class):
        group = sorted(by_class[label])
        rng.shuffle(group)
        n_val = max(1, round(frac * len(group))) if len(group) >= 2 else 0
        val_set.update(path for path, _ in group[:n_val])
    return [it for it in items if it[0] not in val_set], [it for it in items if it[0] in val_set]


def _pick_split(name: str, split: str, train: list, test: list, val: list | None = None) -> list:
    """train / val / test / trainval from the official train (+ val) and test lists; val carved when absent."""
    if split not in SPLITS:
        raise SystemExit(f"--data {name}: unknown split {split!r} (choose from {', '.join(SPLITS)})")
    if split == "test":
        return test
    if val is None:
        if split == "trainval":
            return train
        train, val = carve_val(train)
    return {"train": train, "val": val, "trainval": train + val}[split]


def _read_coop_json(name: str, path: str, prefix: str, split: str) -> tuple[list, dict[int, str]]:
    """CoOp `split_zhou_*.json`: {"train": [[rel_path, label0, classname], ...], "val": ..., "test": ...}.
    Returns the split's (abs path, label) items and label -> class name over every split."""
    try:
        with open(path) as f:
            data = json.load(f)
        names: dict[int, str] = {}
        for part in ("train", "val", "test"):
            for rel, label, cname in data[part]:
                names[int(label)] = cname
    except (ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"--data {name}: {path} is not a CoOp split file ({e!r}); expected "
                         f'{{"train": [[path, label0, classname], ...], "val": [...], "test": [...]}}')
    if split not in SPLITS:
        raise SystemExit(f"--data {name}: unknown split {split!r} (choose from {', '.join(SPLITS)})")
    parts = ["train", "val"] if split == "trainval" else [split]
    items = [(os.path.join(prefix, rel), int(label)) for part in parts for rel, label, _ in data[part]]
    return items, names


def _examples(root: str, items: list[tuple[str, int]], class_names: list[str]) -> list[Example]:
    return [Example(path, label, class_names[label], os.path.relpath(path, root)) for path, label in items]


def _last_word_groups(names: list[str], kind: str, skip: Iterable[str] = ()) -> NameMap:
    """class -> [group noun = last word (CUB: warbler, sparrow, gull ...), kind]; single-word names and the
    `skip` words (compound names such as Chuck-will's-widow) get only [kind]."""
    skip = set(skip)
    out = NameMap()
    for n in names:
        words = normalize(n).split()
        group = words[-1] if len(words) > 1 and words[-1] not in skip else None
        out[n] = [group, kind] if group else [kind]
    return out


def read_cub(root: str | None, split: str) -> Dataset:
    """CUB-200-2011. Class name = folder without 'NNN.', '_' -> ' ' ("Black footed Albatross"). test = the official
    test (5,794); train / val = the official train (5,994) split 80/20 per class (DiVE-k); trainval = official train."""
    root = _descend(_need_root("cub", root), "images.txt", ["CUB_200_2011"])
    images_txt, classes_txt, labels_txt, split_txt, images_dir = _require(
        "cub", root, "images.txt", "classes.txt", "image_class_labels.txt", "train_test_split.txt", "images")
    classes = sorted((_int("cub", classes_txt, cid), folder) for cid, folder in _rows("cub", classes_txt, 2))
    class_names = [re.sub(r"^\d+\.", "", folder).replace("_", " ").strip() for _, folder in classes]
    class_index = {cid: i for i, (cid, _) in enumerate(classes)}
    paths = {iid: rel for iid, rel in _rows("cub", images_txt, 2)}
    labels = {iid: cid for iid, cid in _rows("cub", labels_txt, 2)}
    is_train = {iid: flag for iid, flag in _rows("cub", split_txt, 2)}
    train, test = [], []
    for iid, rel in paths.items():
        if iid not in labels or iid not in is_train:
            raise SystemExit(f"--data cub: image id {iid} ({rel}) is missing from image_class_labels.txt or "
                             f"train_test_split.txt under {root}")
        cid = _int("cub", labels_txt, labels[iid])
        if cid not in class_index:
            raise SystemExit(f"--data cub: {labels_txt}: class id {cid} is not in classes.txt")
        (train if is_train[iid] == "1" else test).append((os.path.join(images_dir, rel), class_index[cid]))
    items = _pick_split("cub", split, train, test)
    # Chuck-will's-widow and Whip-poor-will are nightjars: their last word is not a group noun
    hierarchy = _last_word_groups(class_names, "bird", skip=["widow", "will"])
    synonyms = NameMap({n: [n.replace("Grey", "Gray"), n.replace("Gray", "Grey")] for n in class_names
                        if "Gray" in n or "Grey" in n})
    return Dataset("cub", _examples(root, items, class_names), class_names, "bird", hierarchy=hierarchy,
                   synonyms=synonyms, generic=GENERIC_TERMS["cub"], split=split, root=root)


def read_flowers(root: str | None, split: str) -> Dataset:
    """Oxford Flowers102: the CoOp split file when present (train 4,093 / val 1,633 / test 2,463), else the official
    setid.mat (trnid / valid / tstid) with names from cat_to_name.json."""
    root = _need_root("flowers", root)
    jpg = os.path.join(root, "jpg")
    coop = os.path.join(root, "split_zhou_OxfordFlowers.json")
    if os.path.exists(coop):
        _require("flowers", root, "jpg")
        items, names = _read_coop_json("flowers", coop, jpg, split)
        class_names = [names[i] for i in range(max(names) + 1)] if names else []
    else:
        labels_mat, setid_mat, cat_json, _ = _require("flowers", root, "imagelabels.mat", "setid.mat",
                                                      "cat_to_name.json", "jpg")
        labels = _mat_field("flowers", labels_mat, load_mat("flowers", labels_mat), "labels").astype(int)
        setid = load_mat("flowers", setid_mat)
        with open(cat_json) as f:
            cat = json.load(f)
        try:
            class_names = [cat[str(i)] for i in range(1, int(labels.max()) + 1)]
        except KeyError as e:
            raise SystemExit(f"--data flowers: {cat_json} has no name for class {e}; expected keys '1'..'102'")

        def ids(key):
            return [(os.path.join(jpg, f"image_{int(i):05d}.jpg"), int(labels[int(i) - 1]) - 1)
                    for i in _mat_field("flowers", setid_mat, setid, key)]
        items = _pick_split("flowers", split, ids("trnid"), ids("tstid"), ids("valid"))
    hierarchy = NameMap({n: ["flower"] for n in class_names})
    # the dataset's own spelling "barbeton daisy"; DiVE-k maps the correct "barberton" to it
    synonyms = NameMap({n: [n.replace("barbeton", "barberton")] for n in class_names if "barbeton" in n})
    return Dataset("flowers", _examples(root, items, class_names), class_names, "flower", hierarchy=hierarchy,
                   synonyms=synonyms, generic=GENERIC_TERMS["flowers"], split=split, root=root)


def _pet_name(stem: str) -> str:
    """'american_pit_bull_terrier_12' / 'Abyssinian_100' -> 'american pit bull terrier' / 'abyssinian' (CoOp's
    lower-case breed names, '_' -> ' ')."""
    return stem.rsplit("_", 1)[0].replace("_", " ").lower()


def read_pets(root: str | None, split: str) -> Dataset:
    """Oxford-IIIT Pets, 37 breeds. The CoOp split file when present (2,944 / 736 / 3,669), else trainval.txt split
    80/20 per class and test.txt. Hierarchy: breed -> cat / dog (species column, else the file-name case)."""
    root = _need_root("pets", root)
    images = os.path.join(root, "images")
    coop = os.path.join(root, "split_zhou_OxfordPets.json")
    species: dict[str, str] = {}
    if os.path.exists(coop):
        _require("pets", root, "images")
        items, names = _read_coop_json("pets", coop, images, split)
        class_names = [names[i].replace("_", " ").lower() for i in range(max(names) + 1)] if names else []
        for path, label in items:
            species.setdefault(class_names[label], "cat" if os.path.basename(path)[:1].isupper() else "dog")
    else:
        trainval_txt, test_txt, _ = _require("pets", root, os.path.join("annotations", "trainval.txt"),
                                             os.path.join("annotations", "test.txt"), "images")
        names_by_id: dict[int, str] = {}

        def read(path):
            out = []
            for row in _rows("pets", path, 4):
                stem, cid, sp = row[0], _int("pets", path, row[1]), row[2].split()[0]
                names_by_id[cid] = _pet_name(stem)
                species[_pet_name(stem)] = "cat" if sp == "1" else "dog"
                out.append((os.path.join(images, stem + ".jpg"), cid - 1))
            return out
        train, test = read(trainval_txt), read(test_txt)
        class_names = [names_by_id[i] for i in range(1, max(names_by_id) + 1)]
        items = _pick_split("pets", split, train, test)
    hierarchy = NameMap({n: [species.get(n, "pet")] for n in class_names})
    return Dataset("pets", _examples(root, items, class_names), class_names, "pet", hierarchy=hierarchy,
                   generic=GENERIC_TERMS["pets"], split=split, root=root)


CAR_MAKES_TWO_WORDS = ("AM General", "Aston Martin", "Land Rover")
CAR_BODY_TYPES = ("Crew Cab", "Extended Cab", "Regular Cab", "Club Cab", "Quad Cab", "SuperCab", "Cab", "Sedan",
                  "Coupe", "Convertible", "SUV", "Hatchback", "Wagon", "Minivan", "Cargo Van", "Van", "Type-S",
                  "Roadster")


def car_name(meta_name: str) -> str:
    """cars_meta.mat 'Audi TTS Coupe 2012' -> CoOp's '2012 Audi TTS Coupe' (the trailing year moved to the front)."""
    words = meta_name.split()
    if words and re.fullmatch(r"(19|20)\d\d", words[-1]):
        words = [words[-1]] + words[:-1]
    return " ".join(words)


def car_hierarchy(name: str) -> list[str]:
    """'2012 Audi TTS Coupe' -> ['Audi TTS Coupe', 'Audi TTS', 'Audi', 'car']: model line without the year, without
    the body type, the make, then 'car' (entries equal to the previous one dropped)."""
    words = name.split()
    if words and re.fullmatch(r"(19|20)\d\d", words[0]):
        words = words[1:]
    line = " ".join(words)
    no_type = line
    for body in CAR_BODY_TYPES:  # longest first where it matters ("Crew Cab" before "Cab")
        if no_type.endswith(" " + body):
            no_type = no_type[: -len(body) - 1]
            break
    make = next((m for m in CAR_MAKES_TWO_WORDS if line.startswith(m + " ")), words[0] if words else line)
    out = []
    for a in (line, no_type, make, "car"):
        if normalize(a) != normalize(name) and (not out or normalize(out[-1]) != normalize(a)):
            out.append(a)
    return out


def read_cars(root: str | None, split: str) -> Dataset:
    """Stanford Cars, 196 classes. The CoOp split file when present (6,509 / 1,635 / 8,041), else the devkit .mat
    files (official train 8,144 split 80/20 per class; test 8,041). Names 'YEAR Make Model Type' (CoOp)."""
    root = _need_root("cars", root)
    coop = os.path.join(root, "split_zhou_StanfordCars.json")
    if os.path.exists(coop):
        items, names = _read_coop_json("cars", coop, root, split)
        class_names = [names[i] for i in range(max(names) + 1)] if names else []
    else:
        meta_path, train_path, _, _ = _require("cars", root, os.path.join("devkit", "cars_meta.mat"),
                                               os.path.join("devkit", "cars_train_annos.mat"), "cars_train",
                                               "cars_test")
        test_path = next((p for p in (os.path.join(root, "cars_test_annos_withlabels.mat"),
                                      os.path.join(root, "devkit", "cars_test_annos_withlabels.mat"))
                          if os.path.exists(p)), None)
        if test_path is None:
            _missing("cars", root, "cars_test_annos_withlabels.mat")
        meta = load_mat("cars", meta_path)
        class_names = [car_name(n) for n in _mat_strings(_mat_field("cars", meta_path, meta, "class_names"))]

        def read(path, folder):
            annos = _mat_field("cars", path, load_mat("cars", path), "annotations")
            if annos.dtype.names is None or not {"fname", "class"} <= set(annos.dtype.names):
                raise SystemExit(f"--data cars: {path}: 'annotations' must be a struct array with fields fname and "
                                 f"class.\nExpected layout:\n{LAYOUTS['cars']}")
            return [(os.path.join(root, folder, str(f)), int(c) - 1)
                    for f, c in zip(_mat_strings(annos["fname"]), np.atleast_1d(annos["class"]).ravel())]
        items = _pick_split("cars", split, read(train_path, "cars_train"), read(test_path, "cars_test"))
    hierarchy = NameMap({n: car_hierarchy(n) for n in class_names})
    synonyms = NameMap()
    for n in class_names:  # the devkit's own word order "Audi TTS Coupe 2012"
        w = n.split()
        if w and re.fullmatch(r"(19|20)\d\d", w[0]):
            synonyms[n] = [" ".join(w[1:] + w[:1])]
    return Dataset("cars", _examples(root, items, class_names), class_names, "car", hierarchy=hierarchy,
                   synonyms=synonyms, generic=GENERIC_TERMS["cars"], split=split, root=root)


def read_aircraft(root: str | None, split: str) -> Dataset:
    """FGVC-Aircraft 2013b at the variant level (100 classes, variants.txt order), official train / val / test
    (3,334 / 3,333 / 3,333), trainval = the official trainval file. Hierarchy variant -> family -> manufacturer ->
    'aircraft' from the family / manufacturer files when present."""
    root = _descend(_need_root("aircraft", root), "variants.txt", ["data", os.path.join("fgvc-aircraft-2013b", "data")])
    variants_txt, images = _require("aircraft", root, "variants.txt", "images")
    if split not in SPLITS:
        raise SystemExit(f"--data aircraft: unknown split {split!r} (choose from {', '.join(SPLITS)})")
    with open(variants_txt) as f:
        class_names = [line.strip() for line in f if line.strip()]
    index = {n: i for i, n in enumerate(class_names)}
    (split_txt,) = _require("aircraft", root, f"images_variant_{split}.txt")
    items = []
    for iid, variant in _rows("aircraft", split_txt, 2):
        if variant not in index:
            raise SystemExit(f"--data aircraft: {split_txt}: variant {variant!r} is not in variants.txt")
        items.append((os.path.join(images, iid + ".jpg"), index[variant]))
    parents: dict[str, list[str]] = {}  # variant -> [family, manufacturer] from any split's files
    for part in SPLITS:
        paths = [os.path.join(root, f"images_{level}_{part}.txt") for level in ("variant", "family", "manufacturer")]
        if all(os.path.exists(p) for p in paths):
            variant, family, maker = (dict(_rows("aircraft", p, 2)) for p in paths)
            for iid, v in variant.items():
                if iid in family and iid in maker:
                    parents.setdefault(v, [family[iid], maker[iid]])
    hierarchy, synonyms = NameMap(), NameMap()
    for v in class_names:
        chain = [a for a in parents.get(v, []) if normalize(a) != normalize(v)] + ["aircraft"]
        hierarchy[v] = [a for i, a in enumerate(chain) if normalize(a) not in {normalize(b) for b in chain[:i]}]
        maker = parents.get(v, [None, None])[1]
        if maker and not normalize(v).startswith(normalize(maker)):  # "Boeing 707-320" for "707-320"
            synonyms[v] = [f"{maker} {v}"]
            family = parents[v][0]
            if not normalize(family).startswith(normalize(maker)):  # "Airbus A340" for the family "A340"
                synonyms[family] = [f"{maker} {family}"]
    return Dataset("aircraft", _examples(root, items, class_names), class_names, "aircraft", hierarchy=hierarchy,
                   synonyms=synonyms, generic=GENERIC_TERMS["aircraft"], split=split, root=root)


def read_dogs(root: str | None, split: str) -> Dataset:
    """Stanford Dogs, 120 breeds: official train 12,000 (val carved 20% per class) / test 8,580 from
    train_list.mat / test_list.mat. Class name = folder without the WordNet id, '_' -> ' '."""
    root = _need_root("dogs", root)
    train_mat, test_mat, images = _require("dogs", root, "train_list.mat", "test_list.mat", "Images")
    folders: dict[int, str] = {}

    def read(path):
        mat = load_mat("dogs", path)
        files = _mat_strings(_mat_field("dogs", path, mat, "file_list"))
        labels = _mat_field("dogs", path, mat, "labels").astype(int).ravel()
        if len(files) != len(labels):
            raise SystemExit(f"--data dogs: {path}: file_list and labels differ in length")
        for f, lab in zip(files, labels):
            folders.setdefault(int(lab), f.split("/")[0])
        return [(os.path.join(images, f), int(lab) - 1) for f, lab in zip(files, labels)]
    train, test = read(train_mat), read(test_mat)
    if sorted(folders) != list(range(1, len(folders) + 1)):
        raise SystemExit(f"--data dogs: labels in {train_mat} / {test_mat} must run 1..N without gaps")
    class_names = [folders[i].split("-", 1)[-1].replace("_", " ") for i in range(1, len(folders) + 1)]
    items = _pick_split("dogs", split, train, test)
    return Dataset("dogs", _examples(root, items, class_names), class_names, "dog",
                   hierarchy=NameMap({n: ["dog"] for n in class_names}), generic=GENERIC_TERMS["dogs"], split=split,
                   root=root)


def read_food(root: str | None, split: str) -> Dataset:
    """Food-101: the CoOp split file when present, else meta/train.txt (val carved 20% per class) / meta/test.txt.
    Class names from meta/labels.txt, else the folder names with '_' -> ' '."""
    root = _descend(_need_root("food", root), os.path.join("meta", "classes.txt"), ["food-101"])
    classes_txt, images = _require("food", root, os.path.join("meta", "classes.txt"), "images")
    with open(classes_txt) as f:
        folders = [line.strip() for line in f if line.strip()]
    labels_txt = os.path.join(root, "meta", "labels.txt")
    class_names = [n.replace("_", " ") for n in folders]
    if os.path.exists(labels_txt):
        with open(labels_txt) as f:
            readable = [line.strip() for line in f if line.strip()]
        if len(readable) == len(folders):
            class_names = readable
    coop = os.path.join(root, "split_zhou_Food101.json")
    if os.path.exists(coop):
        items, _ = _read_coop_json("food", coop, images, split)
    else:
        index = {n: i for i, n in enumerate(folders)}
        train_txt, test_txt = _require("food", root, os.path.join("meta", "train.txt"),
                                       os.path.join("meta", "test.txt"))

        def read(path):
            out = []
            for (rel,) in _rows("food", path, 1):
                folder = rel.split("/")[0]
                if folder not in index:
                    raise SystemExit(f"--data food: {path}: class folder {folder!r} is not in meta/classes.txt")
                out.append((os.path.join(images, rel + ".jpg"), index[folder]))
            return out
        items = _pick_split("food", split, read(train_txt), read(test_txt))
    return Dataset("food", _examples(root, items, class_names), class_names, "food",
                   hierarchy=NameMap({n: ["food"] for n in class_names}), generic=GENERIC_TERMS["food"], split=split,
                   root=root)


def read_json(path: str, split: str, root: str | None = None) -> Dataset:
    """A user's own data: a .json / .jsonl file of {image, class_name[, split]} records and a class list (see
    LAYOUTS['json']). `{split}` in the path selects one file per split. Records without a split field belong to
    whichever split is asked for (so use one file per split, or the split field)."""
    path = path.replace("{split}", split)
    if not os.path.exists(path):
        raise SystemExit(f"--data {path}: file not found.\nExpected:\n{LAYOUTS['json']}")
    meta: dict = {}
    try:
        with open(path) as f:
            if path.endswith(".jsonl"):
                records = []
                for number, line in enumerate(f, 1):  # line numbers as an editor shows them, blank lines counted
                    if line.strip():
                        try:
                            records.append(json.loads(line))
                        except ValueError as e:
                            raise SystemExit(f"--data {path}: line {number} is not valid JSON ({e.msg}); expected "
                                             f"one {{\"image\": path, \"class_name\": name}} record per line") from None
            else:
                data = json.load(f)
                if isinstance(data, dict):
                    meta = data
                    records = [dict(r, split=part) for part in SPLITS if part != "trainval" for r in data.get(part, [])]
                    records += data.get("records", [])
                else:
                    records = data
    except ValueError as e:
        raise SystemExit(f"--data {path}: not valid JSON ({e}).\nExpected:\n{LAYOUTS['json']}")
    for i, r in enumerate(records):
        if (not isinstance(r, dict) or not isinstance(r.get("image"), str) or not isinstance(r.get("class_name"), str)
                or not isinstance(r.get("split", ""), (str, type(None)))):
            raise SystemExit(f"--data {path}: record {i + 1} is {r!r}; expected {{\"image\": path, \"class_name\": "
                             f"name}} with text values (and an optional \"split\" name).\nExpected:\n{LAYOUTS['json']}")
    classes_txt = os.path.join(os.path.dirname(path), "classes.txt")
    if "classes" in meta:
        class_names = list(meta["classes"])
    elif os.path.exists(classes_txt):
        with open(classes_txt) as f:
            class_names = [line.strip() for line in f if line.strip()]
    else:
        class_names = sorted({r["class_name"] for r in records})
    index = {normalize(n): i for i, n in enumerate(class_names)}
    base = root or os.path.dirname(os.path.abspath(path))
    wanted = {"train", "val"} if split == "trainval" else {split}
    examples = []
    for i, r in enumerate(records):
        if r.get("split") is not None and r["split"] not in wanted:
            continue  # (a split spelled differently, "Test", is named when the split comes out empty)
        label = index.get(normalize(r["class_name"]))
        if label is None:
            raise SystemExit(f"--data {path}: record {i + 1} has class_name {r['class_name']!r}, which is not in the "
                             f"class list ({'the classes key' if 'classes' in meta else classes_txt})")
        image = r["image"] if os.path.isabs(r["image"]) else os.path.join(base, r["image"])
        examples.append(Example(image, label, class_names[label], r.get("id", r["image"])))
    if not examples and any(str(r.get("split")).lower() in wanted for r in records):  # "Test" for "test"
        present = sorted({str(r.get("split")) for r in records if r.get("split") is not None})
        raise SystemExit(f"--data {path}: no record of split {split!r}; the file's splits are {present} (split names "
                         f"are lowercase: {', '.join(s for s in SPLITS if s != 'trainval')})")
    kind = meta.get("kind", "object")
    hierarchy = NameMap({n: list(chain) for n, chain in meta.get("hierarchy", {}).items()})  # name -> ancestors
    for n in class_names:  # every class ends its chain with the kind, the 'generic' answer
        chain = hierarchy.get(n, [])
        hierarchy[n] = chain if chain and normalize(chain[-1]) == normalize(kind) else chain + [kind]
    return Dataset(os.path.basename(path), examples, class_names, kind, hierarchy=hierarchy,
                   synonyms=NameMap(meta.get("synonyms", {})), generic=[kind, *GENERIC_TERMS["json"]], split=split,
                   root=base)


READERS = {"cub": read_cub, "flowers": read_flowers, "pets": read_pets, "cars": read_cars, "aircraft": read_aircraft,
           "dogs": read_dogs, "food": read_food}


# ----- robust image access: a missing, empty, truncated or non-image file never crashes a run -----

IMAGE_PROBLEMS: Counter = Counter()  # reason -> count, for this process (load-time checks and failed opens)


class UnreadableImage(OSError):
    """An image file that cannot be decoded (raised by open_image; try_open_image returns None instead)."""


MAX_ASPECT = 200  # Qwen2.5-VL's image processor refuses images whose long side is over 200 times the short one


def probe_image(path: str) -> str | None:
    """None if the file looks like a whole image, else why not: 'missing', 'empty', 'not an image', 'truncated',
    'aspect ratio over 200' (Qwen2.5-VL's processor refuses those).
    Cheap (header + last KB): JPEGs must end with the end-of-image marker, PNGs with IEND; when the marker is not in
    the last KB (trailing bytes after it happen), the image is fully decoded to decide."""
    try:
        size = os.path.getsize(path)
    except OSError:
        return "missing"
    if size == 0:
        return "empty"
    try:
        with Image.open(path) as im:
            fmt, (width, height) = im.format, im.size
        if max(width, height) > MAX_ASPECT * min(width, height):
            return f"aspect ratio over {MAX_ASPECT}"
        marker = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}.get(fmt)
        if marker is not None:
            with open(path, "rb") as f:
                f.seek(max(0, size - 1024))
                if marker not in f.read():
                    with Image.open(path) as im:
                        im.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return "truncated" if "truncated" in str(e).lower() else "not an image"
    return None


def drop_unreadable(ds: Dataset) -> Dataset:
    """Probe every image of the split; drop the bad ones with one warning naming a few, and count them by reason in
    `ds.skipped` (and the process-wide IMAGE_PROBLEMS)."""
    keep, bad = [], []
    for ex in ds.examples:
        reason = probe_image(ex.image)
        if reason is None:
            keep.append(ex)
        else:
            bad.append((ex.image, reason))
    if not bad:
        return ds
    skipped = Counter(reason for _, reason in bad)
    IMAGE_PROBLEMS.update(skipped)
    shown = "; ".join(f"{p} ({r})" for p, r in bad[:3]) + (" ..." if len(bad) > 3 else "")
    print0(f"warning: --data {ds.name} {ds.split}: skipped {len(bad)} of {len(ds.examples)} images "
           f"({dict(skipped)}): {shown}", file=sys.stderr)
    return dataclasses.replace(ds, examples=keep, skipped={**ds.skipped, **skipped})


def load_dataset(name: str, split: str, *, root: str | None = None, classes: str = "all", shots: int | None = None,
                 limit: int | None = None, seed: int = 0) -> Dataset:
    """One split of a dataset, optionally restricted to base / novel classes, k shots per class and a limit.
    `name` is toy, cub, flowers, pets, cars, aircraft, dogs, food, or a .json / .jsonl file (LAYOUTS['json']).
    Images that are missing or unreadable are dropped here (warned, counted in `.skipped`), before the few-shot
    draw, so an epoch never meets a broken file."""
    if name == "toy":
        ds = load_toy(split)
    elif name in READERS:
        ds = READERS[name](root, split)
    elif name.endswith((".json", ".jsonl")):
        ds = read_json(name, split, root)
    else:
        raise SystemExit(f"--data {name}: unknown dataset (known: toy, {', '.join(READERS)}, or a .json / .jsonl "
                         f"file of {{image, class_name}} records)")
    if classes not in ("all", "base", "novel"):
        raise SystemExit(f"--classes {classes}: expected all, base or novel")
    ds = select_classes(ds, classes)
    if name != "toy":  # toy images are written by this file and never broken
        ds = drop_unreadable(ds)
    if not ds.examples:  # an empty index file, a split or class half with no image, or every image unreadable
        dropped = f", after dropping {sum(ds.skipped.values())} unreadable images {dict(ds.skipped)}" if ds.skipped else ""
        raise SystemExit(f"--data {name}: split {split!r} ({classes} classes) has no usable image (read from "
                         f"{ds.root}{dropped}). Expected at least one readable image.\nExpected layout:\n"
                         f"{LAYOUTS.get(name, LAYOUTS['json'])}")
    if shots:
        ds = few_shot(ds, shots, seed)
    if limit:
        rng = random.Random(seed)
        ds = dataclasses.replace(ds, examples=rng.sample(ds.examples, min(limit, len(ds.examples))))
    return ds


def open_image(path: str) -> Image.Image:
    """The image as RGB; an undecodable file raises UnreadableImage naming it (and is counted in IMAGE_PROBLEMS)."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        IMAGE_PROBLEMS["unreadable at open"] += 1
        raise UnreadableImage(f"cannot read image {path}: {e}") from e


def try_open_image(path: str) -> Image.Image | None:
    """open_image, or None with a warning when the file cannot be decoded (callers skip the example)."""
    try:
        return open_image(path)
    except UnreadableImage as e:
        print(f"warning: skipping an image: {e}", file=sys.stderr, flush=True)
        return None


# =====================================================================================================================
# 4. Answer parsing, normalisation, format check
# =====================================================================================================================

FORMAT_RE = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL)
ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)  # the first opening tag, up to the next closing one
APOSTROPHES = "'\u2019\u02bc"  # ' and the typographic ones a model may write


def normalize(text: str) -> str:
    """The one key for comparing names (mining, rewards, splits, the rules judge): Unicode NFC, lowercase, a
    possessive "'s" dropped, every run of characters that is not a letter or a digit (any script) -> one space.
    So a hyphen equals a space (DiVE-k's rule) and accented letters stay.
    >>> normalize("Chuck-will's-Widow"), normalize("Crème Brûlée"), normalize("F-16A/B")
    ('chuck will widow', 'crème brûlée', 'f 16a b')
    """
    text = unicodedata.normalize("NFC", text).lower()
    text = re.sub(f"[{APOSTROPHES}]s\\b", "", text)
    return " ".join(re.sub(r"[\W_]+", " ", text).split())


def verifier_text(text: str) -> str:
    """What a verifier reads of a name or an answer, as SpeciaRL's verifier prepares both: lowercase, letters (any
    script), digits and dashes kept, every other character a space, spaces collapsed. It keys the judge cache.
    >>> verifier_text("Anna's Black-chinned Hummingbird?"), verifier_text("???"), verifier_text("Crème brûlée")
    ('anna s black-chinned hummingbird', '', 'crème brûlée')
    """
    text = unicodedata.normalize("NFC", text)
    text = "".join(ch if ch.isalnum() or ch.isspace() or unicodedata.category(ch) == "Pd" else " " for ch in text)
    return " ".join(text.lower().split())


def parse_answer(completion: str) -> str | None:
    """The text inside the FIRST <answer>...</answer>, stripped, as all three papers' released code reads it
    (`<answer>x</answer><answer>y</answer>` -> 'x'). None when there is no closed answer tag or the text is blank
    (SpeciaRL's code treats a blank answer as a missing one)."""
    found = ANSWER_RE.search(completion)
    return found.group(1).strip() or None if found else None


# Answer-format prefixes DiVE-k's released code strips before matching ("species name: Laysan Albatross"): mining
# strips the dataset's own format (one of the first two), two-step evaluation all four; case-insensitive, a colon
# and one space, every occurrence.
DIVEK_PREFIXES = ("species name: ", "make model: ", "species: ", "make and model: ")


def strip_prefixes(answer: str, prefixes: Sequence[str]) -> str:
    """`answer` lowercased with every occurrence of each prefix removed, as DiVE-k's mining and evaluation do.
    >>> strip_prefixes("Species name: Laysan Albatross", DIVEK_PREFIXES[:2])
    'laysan albatross'
    """
    text = answer.strip().lower()
    for prefix in prefixes:
        text = text.replace(prefix, "")
    return text


def format_ok(completion: str) -> bool:
    """The whole completion is `<think>...</think> <answer>...</answer>` (whitespace allowed between and around)."""
    return FORMAT_RE.match(completion) is not None


ABSTAIN_ANSWERS = {  # normalised refusals (an empty answer is one too)
    "", "none", "unknown", "i don t know", "i do not know", "don t know", "do not know", "no idea", "i have no idea",
    "not sure", "i m not sure", "i am not sure", "unsure", "uncertain", "unclear", "cannot tell", "can t tell",
    "cannot determine", "can t determine", "cannot be determined", "undetermined", "n a", "na", "nothing",
    "no answer", "none of the above", "none of these", "unidentified", "unidentifiable", "not identifiable",
    "impossible to tell", "not possible to tell", "abstain", "pass",
}
ABSTAIN_RE = re.compile(r"^(i m |i am |i )?(cannot|can t|can not|could not|couldn t|am unable to|unable to|"
                        r"do not know|don t know|have no idea|m not sure|not sure)\b")
HEDGE_RE = re.compile(r"\b(or|either|versus|vs)\b")


def is_abstain(answer: str | None) -> bool:
    """An explicit refusal: empty, 'None', 'unknown', "I don't know", 'cannot tell', "I'm not sure which" ...
    >>> is_abstain("I don't know"), is_abstain("Unable to identify the species"), is_abstain("unknown warbler")
    (True, True, False)
    """
    text = normalize(answer or "")
    return text in ABSTAIN_ANSWERS or ABSTAIN_RE.match(text) is not None


def is_hedge(answer: str | None) -> bool:
    """Several options offered instead of one ('robin or cardinal', 'either a gull or a tern', 'A vs B', 'A and/or
    B'). Lists of names without a connective are caught by the rules judge, which knows the class names.
    >>> is_hedge("Laysan Albatross or Black-footed Albatross"), is_hedge("Orange crowned Warbler")
    (True, False)
    """
    return HEDGE_RE.search(normalize(answer or "")) is not None


# =====================================================================================================================
# 4a. The papers' prompts (every instruction of each paper's prompt, in this project's words)
# =====================================================================================================================
# One place for the wording that the methods train on, eval.py scores with and the tiny stand-in is pretrained on.
# What each instruction of the released prompt asks for is kept; the sentences are ours.

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
FORMAT_LINE = ("Write your reasoning inside <think> </think> and your final answer inside <answer> </answer>, in this "
               "form:\n<think> ... </think> <answer> {shape} </answer>\nFollow this format exactly.")

# SpeciaRL (released general_base / specific_base): classify; reasoning in <think>; one label or 'None' to abstain in
# <answer>; the format strictly. The "be specific" baseline differs only by ", be specific".
SPECIARL_PROMPT = "Classify the image.\n" + FORMAT_LINE.format(shape="a single label, or None to abstain")
SPECIARL_SPECIFIC_PROMPT = SPECIARL_PROMPT.replace("Classify the image.", "Classify the image, be specific.", 1)

# DiVE-k mining and two-step step 1 (released create_prompt): the object kind; give the most likely name in the
# dataset's answer format; it must be one of the listed categories (a Python list, as released); reasoning and answer
# tags with the answer's shape; the format strictly.
DIVEK_MINE_PROMPT = ("This is an image containing a {kind}. Give the most likely {answer_format} of the {kind} in the "
                     "image.\nThe {answer_format} must be one of these categories: {categories}.\n"
                     + FORMAT_LINE.format(shape="{answer_format}"))
# DiVE-k multiple choice (released build_mcq_prompt): the object kind; pick the most likely one from the options, one
# "X. name" per line; answer with the letter of the correct name; tags with '<answer> option letter </answer>'.
DIVEK_MCQ_PROMPT = ("This is an image containing a {kind}. Which of the options below is the {kind} in the image?\n"
                    "{options}\nAnswer with the letter of the correct {kind} name.\n"
                    + FORMAT_LINE.format(shape="option letter"))
# The answer format the released DiVE-k prompts name per dataset (a model often echoes it: "species name: X").
ANSWER_FORMATS = {"cars": "make model", "aircraft": "make model", "toy": "shape name"}  # others: "species name"


def answer_format(dataset_name: str) -> str:
    return ANSWER_FORMATS.get(dataset_name, "species name")


def divek_mine_prompt(kind: str, answer_fmt: str, class_names: Sequence[str]) -> str:
    return DIVEK_MINE_PROMPT.format(kind=kind, answer_format=answer_fmt, categories=str(list(class_names)))


def divek_mcq_prompt(kind: str, options: Sequence[str]) -> str:
    return DIVEK_MCQ_PROMPT.format(kind=kind, options="\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options)))


# Fine-R1 closed world (released eval_closedworld): the question, the options as a Python list (no letters), the
# reasoning in <think> and the chosen option in <answer>, the expected form.
FINE_R1_QUESTION = "Which {kind} is shown in this picture?"
FINE_R1_CLOSED_PROMPT = ("Question: {question} Choose one of the options {options}. Write your reasoning inside "
                         "<think> </think> and your final choice inside <answer> </answer>, in the form "
                         "<think>...</think> <answer>choice</answer>.")


def fine_r1_closed_prompt(kind: str, options: Sequence[str]) -> str:
    return FINE_R1_CLOSED_PROMPT.format(question=FINE_R1_QUESTION.format(kind=kind), options=str(list(options)))


# Fine-R1 open questions (its SFT data has 198 phrasings, its RL data one per domain). Its RL prompt is the question,
# a blank line, and the request to think it through as an inner monologue in <think> and answer in <answer>; its
# open-world evaluation asks the question, says it is a fine-grained question and asks for the two tags (here with
# the RL prompt's wording of that request, so that a model trained on it is asked the way it was trained).
FINE_R1_QUESTIONS = ["What is the {kind} in this image?", "Which {kind} is shown in this picture?",
                     "What is the specific name of this {kind}?", "Name the {kind} in the image."]
FINE_R1_RL_SUFFIX = ("\n\nFirst think the question through as an inner monologue inside <think> </think>, then give "
                     "the final answer inside <answer> </answer>.")
FINE_R1_OPEN_PROMPT = "{question} This is a fine-grained question." + FINE_R1_RL_SUFFIX


def fine_r1_open_prompt(kind: str) -> str:
    return FINE_R1_OPEN_PROMPT.format(question=FINE_R1_QUESTION.format(kind=kind))


# =====================================================================================================================
# 4b. Answer judges
# =====================================================================================================================
# A judge labels a (ground-truth class name, predicted answer) pair with one of six labels, ordered worst to best
# (SpeciaRL's verifier): wrong < abstain < generic < less_specific < specific < more_specific.
#   rules          offline and deterministic, from the dataset's names, synonyms and hierarchy;
#   hf:<model>     an LLM judge run with transformers: the six-label prompt, and the label chosen by scoring each
#                  label's likelihood after the prompt (greedy and constrained: it can never answer off-list).
# Both see only normalised strings, as SpeciaRL's judge does, and cache per normalised pair, persisted append-only
# to a JSONL file so that a long run (or a restarted one) judges each distinct pair once.

JUDGE_LABELS = ["wrong", "abstain", "generic", "less_specific", "specific", "more_specific"]
CORRECT_LABELS = ("generic", "less_specific", "specific", "more_specific")  # correct at some level
SPECIFIC_LABELS = ("specific", "more_specific")  # what 'accuracy' counts
JUDGE_ERROR = "judge_error"  # no usable label (an LLM judge's answer off the ladder): counted, never a silent 'wrong'


def label_metrics(labels: Sequence[str]) -> dict[str, float]:
    """Shares and counts of the six labels, and SpeciaRL's metrics: correctness = share correct at any level;
    specificity = share of specific or more-specific among the correct ones (the paper's definition is not public,
    so `specificity_of_all`, the unconditional share, is reported too); hm = their harmonic mean; accuracy = share
    specific or more specific. Judge errors are left out of every share and counted in `judge_errors`."""
    errors = sum(lab == JUDGE_ERROR for lab in labels)
    labels = [lab for lab in labels if lab != JUDGE_ERROR]
    n = len(labels)
    counts = Counter(labels)
    unknown = set(counts) - set(JUDGE_LABELS)
    if unknown:
        raise ValueError(f"labels outside JUDGE_LABELS: {sorted(unknown)}")
    correct = sum(counts[lab] for lab in CORRECT_LABELS)
    specific = sum(counts[lab] for lab in SPECIFIC_LABELS)
    correctness = correct / n if n else 0.0
    specificity = specific / correct if correct else 0.0
    out = {"n": n, "judge_errors": errors, "accuracy": specific / n if n else 0.0, "correctness": correctness,
           "specificity": specificity, "specificity_of_all": specific / n if n else 0.0,
           "hm": 2 * specificity * correctness / (specificity + correctness) if specificity + correctness else 0.0}
    for lab in JUDGE_LABELS:
        out[f"count/{lab}"] = counts[lab]
        out[f"share/{lab}"] = counts[lab] / n if n else 0.0
    return out


class Judge:
    """The shared part: the normalised-pair cache and its append-only JSONL file. Subclasses set `name` (records of
    another judge in the same file are ignored) and implement `_judge(pairs of normalised strings) -> labels`
    (None for a pair it could not label)."""
    name = "judge"
    writes_as_it_goes = False  # True: _judge persists each label itself as it arrives

    def __init__(self, dataset: Dataset, cache_path: str | None = None):
        self.dataset = dataset
        self.cache_path = cache_path
        self.cache: dict[tuple[str, str], str] = {}
        self.judged = 0  # pairs sent to _judge in this process
        self.hits = 0  # pairs answered from the cache
        self.bad_cache_lines = 0
        self.errors = 0  # pairs the judge gave no usable label for
        if cache_path and os.path.exists(cache_path):
            with open(cache_path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                        if rec["judge"] == self.name and rec["label"] in JUDGE_LABELS:
                            self.cache[(rec["truth"], rec["prediction"])] = rec["label"]
                    except (ValueError, KeyError, TypeError):
                        self.bad_cache_lines += 1  # e.g. a last line cut short by a kill: skipped, judged again

    def judge(self, pairs: Sequence[tuple[str, str | None]]) -> list[str]:
        """One label from JUDGE_LABELS per (ground-truth class name, predicted answer) pair, or JUDGE_ERROR where the
        judge gave no usable label (counted in `errors`, never cached: asked again next time)."""
        keys = [(verifier_text(gt), verifier_text(pred or "")) for gt, pred in pairs]
        todo = list(dict.fromkeys(k for k in keys if k not in self.cache))
        if todo:
            labels = self._judge(todo)
            assert len(labels) == len(todo) and all(lab in JUDGE_LABELS or lab is None for lab in labels), labels
            good = [(k, lab) for k, lab in zip(todo, labels) if lab is not None]
            self.cache.update(good)
            if not self.writes_as_it_goes:
                self._persist([k for k, _ in good], [lab for _, lab in good])
            self.errors += len(todo) - len(good)
        self.judged += len(todo)
        self.hits += len(keys) - len(todo)
        return [self.cache.get(k, JUDGE_ERROR) for k in keys]

    def stats(self) -> dict[str, float]:
        """Counters for the run log: pairs judged and answered from the cache, the hit rate, judge errors."""
        asked = self.judged + self.hits
        return {"judge/judged": self.judged, "judge/cache_hits": self.hits,
                "judge/cache_hit_rate": self.hits / asked if asked else 0.0, "judge/errors": self.errors}

    def _persist(self, keys, labels):
        if not self.cache_path:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.cache_path)), exist_ok=True)
        text = "".join(json.dumps({"judge": self.name, "truth": t, "prediction": p, "label": lab}) + "\n"
                       for (t, p), lab in zip(keys, labels))
        # one O_APPEND write per batch: ranks sharing the file never interleave inside a line; a file whose last line
        # was cut short gets a newline first so the new records stay parseable
        fd = os.open(self.cache_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size:
                with open(self.cache_path, "rb") as f:
                    f.seek(size - 1)
                    if f.read(1) != b"\n":
                        text = "\n" + text
            os.write(fd, text.encode("utf-8"))
        finally:
            os.close(fd)

    def _judge(self, pairs: list[tuple[str, str]]) -> list[str]:
        raise NotImplementedError


def _canon(text: str) -> str:
    """normalise, drop a lone 's' after a word (what is left of a possessive in the verifier's text: "anna s
    hummingbird"), drop a leading article, 'grey' -> 'gray'."""
    words = normalize(text).split()
    words = [w for i, w in enumerate(words) if not (w == "s" and i > 0)]
    if len(words) > 1 and words[0] in ("a", "an", "the"):
        words = words[1:]
    return " ".join("gray" if w == "grey" else w for w in words)


class RulesJudge(Judge):
    """Offline, deterministic labels from the dataset's names (in this order):
      empty, 'none', 'unknown', "I don't know" ...                      -> abstain
      the class name or a synonym (articles, hyphens, grey/gray, a trailing kind word such as 'dog' ignored)
                                                                        -> specific
      'X or Y', 'either ...', 'X vs Y'                                  -> wrong (hedge)
      an ancestor in dataset.hierarchy: the last one (the kind: 'bird', 'shape') or a dataset.generic word
      ('animal', 'vehicle')                                             -> generic; a nearer one -> less_specific
      a known descendant (a name whose ancestors include the truth)     -> more_specific
      the truth named inside a longer answer that names no other class ('adult male yellow warbler')
                                                                        -> more_specific
      two or more different class names ('laysan albatross black footed albatross')
                                                                        -> wrong (a list)
      anything else                                                     -> wrong
    Plurals of the answer ('warblers') match too."""

    def __init__(self, dataset: Dataset, cache_path: str | None = None):
        self.name = f"rules-v2:{dataset.name}"
        super().__init__(dataset, cache_path)
        ds = dataset
        self.hierarchy = NameMap(ds.hierarchy)  # normalised lookups even for a plain dict keyed by display names
        self.generic_words = {_canon(w) for w in [ds.kind, *ds.generic] if w}  # 'generic' for any class
        # words a trailing mention of which adds nothing ('golden retriever dog'): those and every chain's top
        self.kind_words = sorted(self.generic_words | {_canon(c[-1]) for c in self.hierarchy.values() if c},
                                 key=len, reverse=True)
        # synonym groups (symmetric): canon name -> every canon name of the same thing
        self.groups: dict[str, set[str]] = {}
        for name, others in ds.synonyms.items():
            group = {_canon(name), *(_canon(o) for o in others)}
            for member in list(group):
                group |= self.groups.get(member, set())
            for member in group:
                self.groups[member] = group
        # descendants: canon ancestor -> canon names below it
        self.below: dict[str, set[str]] = {}
        for name, chain in self.hierarchy.items():
            for a in chain:
                self.below.setdefault(_canon(a), set()).add(_canon(name))
        # every class (and synonym) form -> canon class name, for finding class names inside longer answers
        self.mentionable: dict[str, str] = {}
        for cname in ds.class_names:
            for n in self._names(cname):
                for form in self._forms(n, compact=False):
                    self.mentionable.setdefault(form, _canon(cname))

    def _names(self, name: str) -> set[str]:
        c = _canon(name)
        return self.groups.get(c, {c})

    def _strip_kind(self, text: str) -> str:
        for g in self.kind_words:
            if text.endswith(" " + g):
                return text[: -len(g) - 1]
        return text

    def _forms(self, text: str, compact: bool = True) -> set[str]:
        c = _canon(text)
        forms = {c, self._strip_kind(c)}
        return forms | {f.replace(" ", "") for f in forms} if compact else forms

    def _answer_forms(self, text: str) -> set[str]:
        c = _canon(text)
        words = c.split()
        out = self._forms(c)
        if words and len(words[-1]) > 3 and words[-1].endswith("s") and not words[-1].endswith("ss"):
            out |= self._forms(" ".join(words[:-1] + [words[-1][:-1]]))  # 'warblers' -> 'warbler'
        return out

    def _matches(self, answer: set[str], name: str) -> bool:
        return any(answer & self._forms(n) for n in self._names(name))

    def _mentions(self, text: str) -> set[str]:
        """Canon class names found as whole-word spans in `text`, keeping only maximal spans."""
        padded = f" {_canon(text)} "
        spans = []
        for form, cname in self.mentionable.items():
            start = padded.find(f" {form} ")
            while start >= 0:
                spans.append((start, start + len(form) + 1, cname))
                start = padded.find(f" {form} ", start + 1)
        return {c for s, e, c in spans if not any(s2 <= s and e <= e2 and (e2 - s2) > (e - s) for s2, e2, _ in spans)}

    def label(self, truth: str, answer: str) -> str:
        if not _canon(answer):  # nothing but punctuation ('???', '...'): malformed, as the paper's verifier rules
            return "wrong"
        if is_abstain(answer):
            return "abstain"
        forms = self._answer_forms(answer)
        if self._matches(forms, truth):
            return "specific"
        if is_hedge(answer):
            return "wrong"
        chain = list(self.hierarchy.get(truth, []))
        for i, a in enumerate(chain):
            if self._matches(forms, a):
                return "generic" if i == len(chain) - 1 or _canon(a) in self.generic_words else "less_specific"
        if forms & set(self.generic_words):
            return "generic"
        for n in self._names(truth):
            if any(self._matches(forms, d) for d in self.below.get(n, ())):
                return "more_specific"
        mentioned = self._mentions(answer)
        truth_names = self._names(truth)
        if not mentioned:  # the truth may not be a class of the dataset: look for it directly
            padded = f" {_canon(answer)} "
            mentioned = {_canon(truth)} if any(f" {n} " in padded for n in truth_names) else set()
        if mentioned and all(m in truth_names or self._names(m) & truth_names for m in mentioned):
            return "more_specific"
        return "wrong"

    def _judge(self, pairs):
        return [self.label(truth, answer) for truth, answer in pairs]


JUDGE_PROMPT = """You check the answer of an image classifier against the correct class.
Correct class: "{truth}"
Answer: "{answer}"

Pick the one category that describes the answer:
wrong: incorrect, unrelated, garbled, or several options offered instead of one (e.g. "robin or cardinal").
abstain: the answer declines to name anything ("none", "unknown", "i don't know").
generic: correct but much broader than the correct class (e.g. "dog" for "samoyed", "aircraft" for "757 200").
less specific: correct but a close parent of the correct class: its group, genus, family or product line (e.g. "warbler" for "yellow warbler", "boeing 707" for "707 320").
specific: the correct class itself, exactly or by a synonym or its scientific name.
more specific: a correct subtype or a finer description of the correct class (e.g. "adult male yellow warbler" for "yellow warbler").

Reply with the category only."""
JUDGE_LABEL_TEXT = {"wrong": "wrong", "abstain": "abstain", "generic": "generic", "less_specific": "less specific",
                    "specific": "specific", "more_specific": "more specific"}


class HFJudge(Judge):
    """An LLM judge with transformers. For every pair the prompt is scored once with each of the six label texts
    appended; the label with the highest total log-probability wins (temperature 0, constrained to the six labels).
    Rows are left-padded so the label tokens sit at the end, and only those positions reach the vocabulary layer."""

    def __init__(self, model_path: str, dataset: Dataset, cache_path: str | None = None, *, device=None,
                 dtype: str = "auto", pairs_per_batch: int = 8):
        self.name = f"hf:{model_path}"
        super().__init__(dataset, cache_path)
        self.model_path = model_path
        self.pairs_per_batch = pairs_per_batch
        self.model = self.tokenizer = None
        if device is None:
            local = int(os.environ.get("LOCAL_RANK", 0))
            device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
        self.device = torch.device(device)
        self.dtype = dtype

    def _load(self):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        path = self.model_path
        local = path.startswith((".", "/")) or os.path.isdir(path)
        if local and not os.path.exists(os.path.join(path, "config.json")):
            raise SystemExit(f"--judge hf:{path}: no config.json there; expected a Hugging Face causal-LM directory "
                             f"(config.json, *.safetensors, tokenizer files) or a hub id")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(self.dtype, self.device))
        self.model.to(self.device).eval()
        tok = self.tokenizer
        self.label_ids = [tok(JUDGE_LABEL_TEXT[lab], add_special_tokens=False)["input_ids"] for lab in JUDGE_LABELS]
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    def prompt_ids(self, truth: str, answer: str) -> list[int]:
        text = JUDGE_PROMPT.format(truth=truth, answer=answer)
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
            return tok(text, add_special_tokens=False)["input_ids"]
        return tok(text + "\nCategory: ", add_special_tokens=True)["input_ids"]

    @torch.no_grad()
    def label_scores(self, pairs: list[tuple[str, str]]) -> torch.Tensor:
        """[len(pairs), 6] total log-probability of each label's tokens after the judge prompt."""
        if self.model is None:
            self._load()
        rows = [self.prompt_ids(t, a) + ids for t, a in pairs for ids in self.label_ids]
        lens = [len(ids) for _ in pairs for ids in self.label_ids]
        width, keep = max(len(r) for r in rows), max(lens) + 1
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding: every row ends at the last column
            input_ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        logits = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                            position_ids=positions.to(self.device), logits_to_keep=keep).logits  # [R, keep, V]
        logp = logits[:, :-1].float().log_softmax(-1)  # [R, keep-1, V] predicts the last keep-1 tokens
        targets = input_ids[:, width - keep + 1:].to(self.device)  # [R, keep-1]
        tok_logp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [R, keep-1]
        first = keep - 1 - torch.tensor(lens, device=self.device)  # [R] column of each row's first label token
        label_mask = torch.arange(keep - 1, device=self.device)[None] >= first[:, None]  # [R, keep-1]
        return (tok_logp * label_mask).sum(1).view(len(pairs), len(JUDGE_LABELS)).cpu()  # [P, 6]

    def _judge(self, pairs):
        out = []
        for s in range(0, len(pairs), self.pairs_per_batch):
            scores = self.label_scores(pairs[s:s + self.pairs_per_batch])
            out += [JUDGE_LABELS[i] for i in scores.argmax(1).tolist()]
        return out


# ----- a judge or a teacher behind an OpenAI-compatible server (vLLM, SGLang, a hosted API) -----
# Plain HTTP with the standard library (no extra dependency). The papers run their verifier (SpeciaRL: Qwen3-30B-A3B
# for training, Llama-3-70B for evaluation) behind a vLLM server; at that size it cannot sit next to the policy.

class ServerError(RuntimeError):
    """The server did not answer after the retries (connection refused or dropped, timeouts, 429, 5xx)."""


class OpenAIServer:
    """A chat-completions endpoint: `base_url` (e.g. http://host:8000/v1) and a model name. Requests run in a bounded
    pool (`concurrency`), each with a timeout, retried with exponential backoff on connection errors, timeouts,
    malformed replies, 429 and 5xx; a 401, an unknown model or another 4xx stops at once with one message."""

    BACKOFF = 1.0  # seconds before the first retry, doubling (with jitter): 0.5-1, 1-2, 2-4, 4-8, 8-16 s

    def __init__(self, base_url: str | None, model: str, *, api_key: str | None = None, what: str = "--judge-url",
                 concurrency: int = 16, timeout: float = 60.0, retries: int = 5, backoff: float | None = None):
        base_url = base_url or os.environ.get("OPENAI_BASE_URL")
        if not base_url:
            raise SystemExit(f"{what}: no server address; pass {what} http://HOST:PORT/v1 or set OPENAI_BASE_URL")
        self.url, self.model, self.what = base_url.rstrip("/"), model, what
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.concurrency, self.timeout, self.retries = max(1, concurrency), timeout, retries
        self.backoff = self.BACKOFF if backoff is None else backoff
        self.counts = Counter()  # requests, retries, seconds (summed latency), wall (seconds with requests running)
        self._lock = threading.Lock()

    def _once(self, method: str, path: str, body: dict | None, timeout: float) -> dict:
        import http.client
        import urllib.error
        import urllib.request
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")[:300]
            if e.code == 429 or e.code >= 500:
                raise _Retry(f"HTTP {e.code} {detail}")
            if e.code == 401:
                raise SystemExit(f"{self.what} {self.url}: 401 unauthorized; set OPENAI_API_KEY to the server's key")
            if e.code == 404 and "model" in detail.lower():
                raise SystemExit(f"{self.what} {self.url}: the server does not serve the model {self.model!r} "
                                 f"({detail.strip()})")
            raise _BadRequest(e.code, detail)
        except (OSError, TimeoutError, http.client.HTTPException) as e:  # refused, reset, dropped, cut, timed out
            raise _Retry(f"{type(e).__name__}: {e}")
        try:
            return json.loads(raw)
        except ValueError:
            raise _Retry(f"a reply that is not JSON: {raw[:80]!r}")

    def request(self, method: str, path: str, body: dict | None = None, retries: int | None = None,
                timeout: float | None = None) -> dict:
        """One request with retries; ServerError after the last one."""
        retries = self.retries if retries is None else retries
        for attempt in range(retries + 1):
            t0 = time.perf_counter()
            try:
                out = self._once(method, path, body, timeout or self.timeout)
                with self._lock:
                    self.counts["requests"] += 1
                    self.counts["seconds"] += time.perf_counter() - t0
                return out
            except _Retry as e:
                if attempt == retries:
                    raise ServerError(f"{self.what} {self.url}: no answer after {retries + 1} tries (last: {e})")
                with self._lock:
                    self.counts["retries"] += 1
                time.sleep(self.backoff * 2 ** attempt * (0.5 + random.random() / 2))

    def check(self):
        """At start: the server answers within seconds and serves the model (else one message naming the URL)."""
        try:
            listing = self.request("GET", "/models", retries=1, timeout=5.0)
        except ServerError as e:
            raise SystemExit(f"{self.what} {self.url}: cannot reach the server ({e}); start it (README: vLLM) or fix "
                             f"the address")
        served = [m.get("id") for m in listing.get("data", [])] if isinstance(listing, dict) else []
        if served and self.model not in served:
            raise SystemExit(f"{self.what} {self.url}: the server does not serve {self.model!r}; it serves {served}")

    def chat(self, body: dict) -> list[str]:
        """POST /chat/completions with this model; the texts of the choices."""
        reply = self.request("POST", "/chat/completions", {"model": self.model, **body})
        try:
            return [c["message"]["content"] or "" for c in reply["choices"]]
        except (KeyError, TypeError, IndexError):
            raise ServerError(f"{self.what} {self.url}: a reply without choices/message/content: {str(reply)[:200]}")

    def map(self, fn: Callable, items: Sequence) -> list:
        """[fn(item) for item in items], `concurrency` at a time; the first error cancels what has not started."""
        from concurrent.futures import ThreadPoolExecutor
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=min(self.concurrency, max(1, len(items)))) as pool:
            futures = [pool.submit(fn, item) for item in items]
            try:
                results = [fut.result() for fut in futures]
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise
            finally:
                self.counts["wall"] += time.perf_counter() - t0
        return results

    def stats(self, prefix: str) -> dict[str, float]:
        c = self.counts
        return {f"{prefix}/requests": c["requests"], f"{prefix}/retries": c["retries"],
                f"{prefix}/requests_per_s": c["requests"] / c["wall"] if c["wall"] else 0.0,
                f"{prefix}/mean_latency_s": c["seconds"] / c["requests"] if c["requests"] else 0.0}


class _Retry(Exception):
    pass


class _BadRequest(Exception):
    def __init__(self, code: int, detail: str):
        super().__init__(f"HTTP {code}: {detail}")
        self.code, self.detail = code, detail


def label_from_text(text: str) -> str | None:
    """The ladder label an LLM's answer names ('Less specific.', 'less_specific', 'Category: generic'), or None
    when it names none or several."""
    words = f" {' '.join(re.sub(r'[^a-z]+', ' ', text.lower()).split())} "
    found = set()
    for label in sorted(JUDGE_LABELS, key=len, reverse=True):  # 'more specific' before 'specific'
        phrase = f" {JUDGE_LABEL_TEXT[label]} "
        if phrase in words:
            found.add(label)
            words = words.replace(phrase, " ")
    return found.pop() if len(found) == 1 else None


class OpenAIJudge(Judge):
    """The six-label verifier behind an OpenAI-compatible server: the same prompt as HFJudge, temperature 0, the
    answer constrained to the six labels with vLLM's guided choice (dropped, once, for a server that refuses the
    field) and mapped to a label; an answer that names no label is a judge error. Every answer goes to the cache
    file as it arrives, so a killed run loses nothing judged."""
    writes_as_it_goes = True

    def __init__(self, model: str, dataset: Dataset, cache_path: str | None = None, *, url: str | None = None,
                 concurrency: int = 16, timeout: float = 60.0, check: bool = True):
        self.name = f"openai:{model}"  # the cache is keyed by the model, whatever server serves it
        super().__init__(dataset, cache_path)
        self.server = OpenAIServer(url, model, what="--judge-url", concurrency=concurrency, timeout=timeout)
        self.guided = True
        self._cache_lock = threading.Lock()  # the pool's threads append to one cache file
        if check:
            self.server.check()

    def _ask(self, pair: tuple[str, str]) -> str | None:
        body = {"messages": [{"role": "user", "content": JUDGE_PROMPT.format(truth=pair[0], answer=pair[1])}],
                "temperature": 0.0, "max_tokens": 16}
        guided = self.guided
        if guided:
            body["guided_choice"] = [JUDGE_LABEL_TEXT[lab] for lab in JUDGE_LABELS]
        try:
            return label_from_text(self.server.chat(body)[0])
        except _BadRequest as e:
            if guided and "guided" in e.detail.lower():  # a server without guided decoding: ask plainly
                self.guided = False
                return self._ask(pair)
            raise SystemExit(f"--judge-url {self.server.url}: the server refused the request ({e})")

    def _judge(self, pairs):
        def ask_and_keep(pair):  # each label goes to the cache file the moment it arrives
            label = self._ask(pair)
            if label is not None:
                with self._cache_lock:
                    self._persist([pair], [label])
            return label
        return self.server.map(ask_and_keep, pairs)

    def stats(self) -> dict[str, float]:
        return {**super().stats(), **self.server.stats("judge")}


def get_judge(spec: str, dataset: Dataset, cache_path: str | None = None, *, url: str | None = None,
              concurrency: int = 16):
    """'rules', 'hf:<model dir or hub id>' or 'openai:<model>' (a server at `url`, default $OPENAI_BASE_URL);
    `judge.judge([(truth, answer), ...]) -> labels`."""
    if spec == "rules":
        return RulesJudge(dataset, cache_path)
    if spec.startswith("hf:") and len(spec) > 3:
        return HFJudge(spec[3:], dataset, cache_path)
    if spec.startswith("openai:") and len(spec) > 7:
        return OpenAIJudge(spec[7:], dataset, cache_path, url=url, concurrency=concurrency)
    raise SystemExit(f"--judge {spec}: expected 'rules', 'hf:<causal LM directory or hub id>' or 'openai:<model "
                     f"served at --judge-url>'")


# =====================================================================================================================
# 5. Prompt encoding and the rollout sampler
# =====================================================================================================================

@dataclasses.dataclass
class EncodedPrompt:
    """One chat prompt with one image, tokenised and processed, without padding."""
    input_ids: torch.Tensor  # [L] prompt token ids (image pads already expanded to the image's token count)
    mm_token_type_ids: torch.Tensor  # [L] 0 text, 1 image
    pixel_values: torch.Tensor  # [n_patches, 3*2*14*14] this image's patch rows
    image_grid_thw: torch.Tensor  # [1, 3]
    position_ids: torch.Tensor | None = None  # [3, L] M-RoPE positions, filled in by prompt_positions()

    def __len__(self):
        return self.input_ids.shape[0]


def chat_messages(text: str, system: str | None = None) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    msgs.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]})
    return msgs


def encode_prompt(processor, image: Image.Image | str, text: str, system: str | None = None) -> EncodedPrompt:
    """Render the chat template for [image, text], run the processor (expands the image pad to the image's token
    count and makes the patch rows) and keep the unpadded tensors."""
    if isinstance(image, str):
        image = open_image(image)
    prompt = processor.apply_chat_template(chat_messages(text, system), tokenize=False, add_generation_prompt=True)
    out = processor(text=[prompt], images=[image], return_tensors="pt")
    return EncodedPrompt(out["input_ids"][0], out["mm_token_type_ids"][0].long(), out["pixel_values"],
                         out["image_grid_thw"])


def encode_text_prompt(processor, messages: list[dict]) -> torch.Tensor:
    """Token ids of a text-only chat (used by the LLM judge)."""
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return processor(text=[prompt], return_tensors="pt")["input_ids"][0]


def unwrap(model):
    """The Hugging Face model inside a DDP wrapper (FSDP2 modules are the model itself)."""
    return model.module if hasattr(model, "module") else model


def prompt_positions(model, prompt: EncodedPrompt) -> torch.Tensor:
    """[3, L] M-RoPE positions of an unpadded prompt (temporal / height / width rows; text tokens share one value),
    computed once and cached on the prompt. Uses only the config, so it works on sharded models too."""
    if prompt.position_ids is None:
        pos, _ = unwrap(model).model.get_rope_index(
            prompt.input_ids[None], mm_token_type_ids=prompt.mm_token_type_ids[None],
            image_grid_thw=prompt.image_grid_thw)
        prompt.position_ids = pos[:, 0]
    return prompt.position_ids


def collate_prompts(model, prompts: Sequence[EncodedPrompt], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Left-pad a list of prompts into one batch, with 3-row positions and each image's patch rows concatenated
    in row order (a prompt listed twice contributes its block twice: that is how rows share an image)."""
    lengths = [len(p) for p in prompts]
    width = max(lengths)
    n = len(prompts)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    mm_types = torch.zeros((n, width), dtype=torch.long)
    position_ids = torch.zeros((3, n, width), dtype=torch.long)
    for row, p in enumerate(prompts):
        start = width - len(p)
        input_ids[row, start:] = p.input_ids
        attention_mask[row, start:] = 1
        mm_types[row, start:] = p.mm_token_type_ids
        position_ids[:, row, start:] = prompt_positions(model, p)
    pixel_values = torch.cat([p.pixel_values for p in prompts])
    grid = torch.cat([p.image_grid_thw for p in prompts])
    return dict(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                mm_token_type_ids=mm_types.to(device), position_ids=position_ids.to(device),
                pixel_values=pixel_values.to(device), image_grid_thw=grid.to(device))


@dataclasses.dataclass
class Rollout:
    """G completions for each of P prompts, rows grouped by prompt: prompt i owns rows i*G .. i*G+G-1."""
    prompts: list[EncodedPrompt]  # the P prompts
    group_size: int  # G
    completion_ids: torch.Tensor  # [P*G, T] sampled ids, pad after the first EOS
    completion_mask: torch.Tensor  # [P*G, T] 1 up to and including the first EOS
    logprobs: torch.Tensor  # [P*G, T] temperature-scaled log-prob of each sampled token under the sampling model
    truncated: torch.Tensor  # [P*G] bool: no EOS within max_new_tokens
    texts: list[str]  # [P*G] decoded completions (special tokens dropped)
    stats: dict = dataclasses.field(default_factory=dict)  # prefill_s, decode_s, decode_steps (for bench.py, logs)

    @property
    def row_prompts(self) -> list[EncodedPrompt]:
        return [p for p in self.prompts for _ in range(self.group_size)]


def sampling_filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask logits outside the top-k and outside the smallest set with cumulative probability >= top_p."""
    if top_k and top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        # Trick "nucleus among candidates": sorting the whole vocabulary (152k) every step is slow; the nucleus
        # lives among the most likely tokens, so sort only the top `k` and check that they hold mass >= top_p in
        # every row (then every other token has mass >= top_p before it and is dropped, exactly as with a full
        # sort); if not, widen k (x8) up to the full vocabulary.
        probs = logits.softmax(-1)  # [B, V]
        k = min(1024, probs.shape[-1])
        while True:
            top_probs, top_ids = probs.topk(k, dim=-1)  # [B, k], sorted descending
            cum = top_probs.cumsum(-1)  # [B, k]
            if k == probs.shape[-1] or bool((cum[:, -1] >= top_p).all()):
                break
            k = min(8 * k, probs.shape[-1])
        keep_sorted = (cum - top_probs) < top_p  # keep tokens until the mass before them reaches p
        keep = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, top_ids, keep_sorted)  # [B, V]
        logits = logits.masked_fill(~keep, float("-inf"))
    return logits


_PREALLOCATED_LAYER = None


def preallocated_kv_layer():
    """The cache-layer class used by the sampler's decode (built once; needs transformers imported)."""
    global _PREALLOCATED_LAYER
    if _PREALLOCATED_LAYER is None:
        from transformers.cache_utils import DynamicLayer

        class PreallocatedLayer(DynamicLayer):
            """Trick "preallocated KV cache": a DynamicLayer whose keys and values live in buffers with room for the
            whole rollout. The stock layer appends with torch.cat, which copies the whole cache on every decode
            step (a second full read + write of the KV on top of attention's read); this one writes the new position
            in place and hands attention a view of the filled part, i.e. exactly the tensors the stock layer gives.
            It is built from the prefill's cache of P prompts and holds each prompt's rows G times."""

            def __init__(self, keys: torch.Tensor, values: torch.Tensor, repeats: int, capacity: int):
                super().__init__()
                P, H, L, _ = keys.shape  # [P, kv_heads, prompt width, head_dim]
                # under autocast RoPE hands over fp32 keys (and the stock layer then keeps fp32 values too), while
                # attention casts both to the autocast dtype anyway: store them in that dtype, half the memory
                kind = keys.device.type
                dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
                self.buffers = []
                for t in (keys, values):
                    buf = t.new_empty((P * repeats, H, capacity, t.shape[-1]), dtype=dtype or t.dtype)  # [P*G,H,cap,D]
                    buf.view(P, repeats, H, capacity, -1)[:, :, :, :L] = t[:, None]  # row p*G+g <- prompt p
                    self.buffers.append(buf)
                self.length = L
                self.dtype, self.device, self.is_initialized = self.buffers[0].dtype, keys.device, True
                self.keys, self.values = (buf[:, :, :L] for buf in self.buffers)

            def update(self, key_states, value_states, *args, **kwargs):
                n = key_states.shape[-2]
                self.buffers[0][:, :, self.length:self.length + n] = key_states
                self.buffers[1][:, :, self.length:self.length + n] = value_states
                self.length += n
                self.keys, self.values = (buf[:, :, :self.length] for buf in self.buffers)
                return self.keys, self.values

        _PREALLOCATED_LAYER = PreallocatedLayer
    return _PREALLOCATED_LAYER


def expand_cache(cache, repeats: int, capacity: int):
    """Share each prompt's prefill KV with its G samples: row p of the prefill cache becomes rows p*G .. p*G+G-1,
    in preallocated buffers of `capacity` positions (plain DynamicLayers). Other layer kinds (e.g. sliding-window)
    fall back to transformers' own `batch_repeat_interleave`."""
    from transformers.cache_utils import DynamicLayer
    layers = getattr(cache, "layers", None)
    if layers is None:
        cache.batch_repeat_interleave(repeats)
        return cache
    for i, layer in enumerate(layers):
        if type(layer) is DynamicLayer and layer.keys is not None and layer.keys.numel():
            layers[i] = preallocated_kv_layer()(layer.keys, layer.values, repeats, capacity)
        elif repeats > 1:
            layer.batch_repeat_interleave(repeats)
    return cache


def static_cache(model, cache, repeats: int, capacity: int):
    """transformers' StaticCache of `capacity` positions for P*G rows, filled with each prompt's prefill KV (a
    DynamicCache of P rows) G times. Fixed shapes and fixed buffer addresses: what a compiled / CUDA-graph decode step
    needs. Attention then runs over all `capacity` positions, the unwritten ones masked by causality. Under autocast
    (fp32 weights, bf16 compute) the buffers hold the autocast dtype and every write is cast to it, as the
    preallocated layer does: RoPE hands over fp32 keys there while attention reads bf16."""
    from transformers import StaticCache
    static = StaticCache(config=unwrap(model).config, max_cache_len=capacity)
    kind = cache.layers[0].keys.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
    for layer, prefill in zip(static.layers, cache.layers):
        P, H, L, D = prefill.keys.shape
        layer.lazy_initialization(prefill.keys.new_empty((P * repeats, H, 0, D), dtype=dtype or prefill.keys.dtype),
                                  prefill.values.new_empty((P * repeats, H, 0, prefill.values.shape[-1]),
                                                           dtype=dtype or prefill.values.dtype))
        layer.keys.view(P, repeats, H, capacity, D)[:, :, :, :L] = prefill.keys[:, None]  # row p*G+g <- prompt p
        layer.values.view(P, repeats, H, capacity, -1)[:, :, :, :L] = prefill.values[:, None]
        layer.cumulative_length.fill_(L)
        if dtype is not None:
            stock_update = layer.update
            layer.update = lambda k, v, *a, _up=stock_update, _dt=dtype, **kw: _up(k.to(_dt), v.to(_dt), *a, **kw)
    return static


_CACHE_KEYWORD = None


def cache_keyword() -> str:
    """The forward's name for the KV cache: `cache` from transformers 5.2x (where `past_key_values` warns on every
    call and goes away in 5.40), `past_key_values` before (5.17 on the GPU machine)."""
    global _CACHE_KEYWORD
    if _CACHE_KEYWORD is None:
        import inspect
        from transformers import Qwen2_5_VLForConditionalGeneration
        params = inspect.signature(Qwen2_5_VLForConditionalGeneration.forward).parameters
        _CACHE_KEYWORD = "cache" if "cache" in params else "past_key_values"
    return _CACHE_KEYWORD


def returned_cache(out):
    """The KV cache a forward returned (`out.cache`, or `out.past_key_values` before transformers 5.2x)."""
    return out["cache"] if "cache" in out.keys() else out.past_key_values


def compiled_decode(model):
    """Trick "compiled decode step" (opt-in: sample(..., compile_decode=True)): the one-token forward compiled with
    torch.compile, in "reduce-overhead" mode on GPU, i.e. replayed as a CUDA graph, so the Python and kernel-launch
    cost of the ~10 kernels per layer is paid once per graph instead of once per step. Compiled once per model; a new
    rows x capacity shape compiles again (capacity is rounded up to a multiple of 256 to make that rare)."""
    fn = model.__dict__.get("_fgrl_compiled_decode")
    if fn is None:
        kw = cache_keyword()

        def decode_step(input_ids, attention_mask, position_ids, cache):  # [B, 1] ids -> [B, V] logits
            return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, **{kw: cache}).logits[:, -1]
        on_gpu = next(model.parameters()).device.type == "cuda"
        fn = torch.compile(decode_step, mode="reduce-overhead" if on_gpu else None, dynamic=False)
        model.__dict__["_fgrl_compiled_decode"] = fn
    return fn


FINISHED_CHECK_EVERY = 8  # decode steps between two looks at "has every row ended?" (each look is a host sync)


class NonFiniteLogits(RuntimeError):
    """The policy produced NaN / inf logits while sampling."""


def nonfinite_message(rows: torch.Tensor, step: int) -> str:
    bad = rows.nonzero().flatten().tolist()
    return (f"sampling stopped: the model's logits are NaN or inf (rows {bad[:8]}{' ...' if len(bad) > 8 else ''} "
            f"of {rows.numel()}, by decode step {step}). The weights or the inputs hold NaN / inf: a diverged update "
            f"(lower the learning rate, resume from the last checkpoint), a corrupt checkpoint, or fp16 overflow "
            f"(use bf16 or fp32, --dtype)")


def compile_decode_problem(model) -> str | None:
    """Why the compiled decode cannot run on this model (None if it can)."""
    hf = unwrap(model)
    if _fsdp_modules(hf):
        return ("the compiled decode needs an unsharded model (one GPU, or --parallel ddp); under FSDP2 sample with "
                "--compile-decode 0")
    if getattr(hf.config, "_attn_implementation", None) == "flash_attention_2":
        return ("the compiled decode attends over the whole static cache, unwritten slots included, with a mask that "
                "flash-attention 2 ignores: use --attn sdpa with --compile-decode 1, or --compile-decode 0")
    return None


@torch.no_grad()
def sample(model, processor, prompts: Sequence[EncodedPrompt], *, group_size: int, max_new_tokens: int,
           temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0,
           generator: torch.Generator | None = None, prompt_batch: int | None = None,
           compile_decode: bool = False, row_seeds: Sequence[int] | None = None) -> Rollout:
    """Draw `group_size` completions for every prompt. temperature 0 = greedy.

    Speed tricks, each exact (the tokens are those of HF `generate` under the same settings):
      * prefill once per prompt: the image is encoded and the prompt's KV cache built once, then each prompt's cache
        rows are copied G times into the decode cache, instead of prefilling G copies of a long image prompt;
      * preallocated buffers: the KV cache (see `preallocated_kv_layer`), the attention mask (one [B, Lp+T] tensor,
        sliced per step), the output tokens and log-probs; nothing grows by concatenation inside the loop;
      * one batched decode over all prompts x samples, with explicit M-RoPE positions (next position = the prompt's
        largest position + 1 + step), so no per-step position bookkeeping inside the model;
      * light per-step sampling math: one log-sum-exp per row for the recorded log-probs (no [B, V] log-softmax
        kept), no vocabulary sort unless top_p < 1 and then only of the top candidates (`sampling_filter`), no
        processor or tokenizer call inside the loop;
      * stop once every row has produced an EOS, looked at every FINISHED_CHECK_EVERY steps (each look waits for the
        GPU; the extra steps only write padding, cut off at the end).
    Sampling knobs are explicit (no hidden top_k=50 or repetition penalty from a generation_config); image and video
    pad tokens are suppressed. The recorded log-probs are those of the unfiltered, temperature-scaled distribution,
    i.e. what the policy-gradient loss uses. `prompt_batch` splits the prompts into chunks to bound memory.
    `compile_decode` (off by default; for GPU) decodes with a static KV cache and a compiled step (`compiled_decode`):
    the first call per shape pays the compilation; refused for FSDP2-sharded models and with flash-attention 2
    (`check_compile_decode`).
    `row_seeds` (one per output row, prompt-major: row p*G+g): each row samples from its own random stream (inverse
    CDF with its own uniforms) instead of `generator`, so what a row draws does not depend on which other prompts
    share the call: the same samples on 1 or 8 ranks and with any prompt batch (evaluation uses it).
    `Rollout.stats` holds the prefill and decode wall times and the number of decode steps.
    Non-finite logits (NaN / inf weights or inputs) raise NonFiniteLogits naming the step, instead of a device-side
    assert inside torch.multinomial.
    """
    model = unwrap(model)
    if prompt_batch and len(prompts) > prompt_batch:
        parts = [sample(model, processor, prompts[i:i + prompt_batch], group_size=group_size,
                        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                        repetition_penalty=repetition_penalty, generator=generator, compile_decode=compile_decode,
                        row_seeds=row_seeds[i * group_size:(i + prompt_batch) * group_size] if row_seeds else None)
                 for i in range(0, len(prompts), prompt_batch)]
        return concat_rollouts(parts, pad_id=special_token_ids(processor)["<|endoftext|>"])
    ids = special_token_ids(processor)
    pad_id, eos_ids = ids["<|endoftext|>"], [ids["<|im_end|>"], ids["<|endoftext|>"]]
    suppress = [ids["<|image_pad|>"], ids["<|video_pad|>"]]
    device = next(model.parameters()).device
    if generator is not None and generator.device.type != device.type:
        # torch.multinomial needs a generator on the tensors' device: a CPU generator given for a GPU model seeds a
        # device one, so the draws stay a function of the caller's seed
        generator = torch.Generator(device=device).manual_seed(int(torch.randint(2 ** 62, (1,), generator=generator)))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    batch = collate_prompts(model, prompts, pad_id, device)
    G = group_size
    Lp = batch["input_ids"].shape[1]
    # --- prefill: one row per prompt; logits only for the last position
    if compile_decode:
        problem = compile_decode_problem(model)
        if problem:
            raise ValueError(f"sample(compile_decode=True): {problem}")
    out = model(**batch, use_cache=True, logits_to_keep=1)
    if compile_decode:
        capacity = -(-(Lp + max_new_tokens) // 256) * 256  # rounded up: fewer distinct shapes, fewer compilations
        cache = static_cache(model, returned_cache(out), G, capacity)
        decode = compiled_decode(model)
    else:
        capacity = Lp + max_new_tokens
        cache = expand_cache(returned_cache(out), G, capacity)  # [P, ...] -> [P*G, ...] KV shared, not recomputed
    logits = out.logits[:, -1].float().repeat_interleave(G, 0)  # [B, V], B = P*G
    del out  # the prefill's outputs (its cache now lives on in `cache`)
    B, V = logits.shape
    attention_mask = torch.ones((B, capacity), dtype=torch.long, device=device)  # [B, capacity] preallocated
    attention_mask[:, :Lp] = batch["attention_mask"].repeat_interleave(G, 0)
    next_pos = batch["position_ids"].amax(dim=(0, 2)).repeat_interleave(G, 0) + 1  # [B]
    seen = None
    if repetition_penalty != 1.0:  # HF semantics: every token of prompt and completion so far is penalised
        seen = torch.zeros((B, V), dtype=torch.bool, device=device)
        seen.scatter_(1, batch["input_ids"].repeat_interleave(G, 0), True)
    tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)  # preallocated outputs
    token_logps = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    nonfinite = torch.zeros(B, dtype=torch.bool, device=device)  # rows whose logits held a NaN / inf (checked below)
    eos = torch.tensor(eos_ids, device=device)
    cache_kw = cache_keyword()
    uniforms = None
    if row_seeds is not None and temperature > 0:
        if len(row_seeds) != B:
            raise ValueError(f"sample: {len(row_seeds)} row_seeds for {B} rows ({len(prompts)} prompts x {G})")
        uniforms = torch.stack([torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(int(s)),
                                           dtype=torch.float64) for s in row_seeds]).to(device)  # [B, T]
    inv_t = 1.0 / temperature if temperature > 0 else 1.0
    sync()
    t1 = time.perf_counter()
    steps = 0
    for step in range(max_new_tokens):
        scores = logits * inv_t  # [B, V] temperature-scaled logits (a fresh tensor: edited in place below)
        lse = scores.logsumexp(-1)  # [B] normaliser of the policy's distribution (for the recorded log-probs)
        bad = lse.isnan() | (lse == float("inf"))  # [B] a NaN or +inf logit in the row (sync-free: raised below)
        nonfinite |= bad
        scores = scores.masked_fill(bad[:, None], 0.0)  # keeps multinomial from a device assert until we raise
        scores[:, suppress] = float("-inf")
        if seen is not None:
            scores = torch.where(seen, torch.where(scores > 0, scores / repetition_penalty,
                                                   scores * repetition_penalty), scores)
        if temperature > 0:
            scores = sampling_filter(scores, top_k, top_p)
            if uniforms is None:
                nxt = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)  # [B]
            else:  # inverse CDF: the first token whose cumulative probability exceeds the row's uniform
                cdf = scores.double().softmax(-1).cumsum(-1)  # [B, V]
                target = (uniforms[:, step:step + 1] * cdf[:, -1:]).contiguous()  # [B, 1]
                nxt = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=V - 1)  # [B]
        else:
            nxt = scores.argmax(-1)  # [B]
        nxt = torch.where(finished, torch.full_like(nxt, pad_id), nxt)
        tokens[:, step] = nxt
        token_logps[:, step] = logits.gather(1, nxt[:, None]).squeeze(1) * inv_t - lse  # log softmax(logits/T)[nxt]
        if seen is not None:
            seen[torch.arange(B, device=device), nxt] = True
        finished |= torch.isin(nxt, eos)
        steps = step + 1
        if step == max_new_tokens - 1:
            break
        if step % FINISHED_CHECK_EVERY == FINISHED_CHECK_EVERY - 1:  # one host sync every few steps
            if bool(nonfinite.any()):
                raise NonFiniteLogits(nonfinite_message(nonfinite, step))
            if bool(finished.all()):
                break
        pos = (next_pos + step).view(1, B, 1).expand(3, B, 1)  # [3, B, 1]
        if compile_decode:  # fixed shapes: the whole mask every step, causality hides the unwritten positions
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs are no longer used
            logits = decode(nxt[:, None], attention_mask, pos.contiguous(), cache).float().clone()  # [B, V]
        else:  # the mask is a view of the preallocated one (tokens after an EOS are masked later, when scored)
            logits = model(input_ids=nxt[:, None], attention_mask=attention_mask[:, :Lp + step + 1], position_ids=pos,
                           use_cache=True, **{cache_kw: cache}).logits[:, -1].float()  # [B, V]
    if bool(nonfinite.any()):
        raise NonFiniteLogits(nonfinite_message(nonfinite, steps - 1))
    sync()
    stats = {"prefill_s": t1 - t0, "decode_s": time.perf_counter() - t1, "decode_steps": steps}
    mask = completion_mask_from(tokens[:, :steps], eos_ids)
    width = int(mask.sum(1).max()) if steps else 0  # the longest completion: steps past the last EOS wrote padding
    tokens, token_logps, mask = tokens[:, :width], token_logps[:, :width], mask[:, :width]
    truncated = ~torch.isin(tokens, eos).any(1)
    token_logps = token_logps * mask
    texts = processor.tokenizer.batch_decode(tokens.masked_fill(mask == 0, pad_id).tolist(), skip_special_tokens=True)
    return Rollout(list(prompts), G, tokens.cpu(), mask.cpu(), token_logps.cpu(), truncated.cpu(), texts, stats)


def completion_mask_from(tokens: torch.Tensor, eos_ids: Sequence[int]) -> torch.Tensor:
    """1 for every token up to and including the first EOS, 0 after it.
    >>> completion_mask_from(torch.tensor([[5, 7, 2, 0, 0]]), [2])
    tensor([[1, 1, 1, 0, 0]])
    """
    is_eos = torch.isin(tokens, torch.tensor(list(eos_ids), device=tokens.device)).long()  # [B, T]
    eos_before = is_eos.cumsum(1) - is_eos  # number of EOS strictly before each position
    return (eos_before == 0).long()


def concat_rollouts(parts: Sequence[Rollout], pad_id: int) -> Rollout:
    width = max(r.completion_ids.shape[1] for r in parts)

    def pad(t, value):
        return F.pad(t, (0, width - t.shape[1]), value=value)
    return Rollout([p for r in parts for p in r.prompts], parts[0].group_size,
                   torch.cat([pad(r.completion_ids, pad_id) for r in parts]),
                   torch.cat([pad(r.completion_mask, 0) for r in parts]),
                   torch.cat([pad(r.logprobs, 0.0) for r in parts]),
                   torch.cat([r.truncated for r in parts]), [t for r in parts for t in r.texts],
                   {k: sum(r.stats.get(k, 0) for r in parts) for k in parts[0].stats})  # times and steps add up


# =====================================================================================================================
# 6. Per-token log-probs of completions
# =====================================================================================================================

def scoring_inputs(model, prompts: Sequence[EncodedPrompt], completion_ids: torch.Tensor,
                   completion_mask: torch.Tensor, pad_id: int, device) -> dict[str, torch.Tensor]:
    """Model inputs for rows of (prompt, completion): [left-padded prompt | completion, right-padded]. Completion
    positions continue the prompt's M-RoPE positions; `mm_token_type_ids` gets zeros for completion tokens."""
    batch = collate_prompts(model, prompts, pad_id, device)
    comp = completion_ids.to(device)  # [B, T]
    cmask = completion_mask.to(device)  # [B, T]
    T = comp.shape[1]
    start = batch["position_ids"].amax(dim=(0, 2)) + 1  # [B] first completion position
    comp_pos = (start[:, None] + torch.arange(T, device=device)).unsqueeze(0).expand(3, -1, -1)  # [3, B, T]
    return dict(input_ids=torch.cat([batch["input_ids"], comp], 1),
                attention_mask=torch.cat([batch["attention_mask"], cmask.long()], 1),
                mm_token_type_ids=torch.cat([batch["mm_token_type_ids"], torch.zeros_like(comp)], 1),
                position_ids=torch.cat([batch["position_ids"], comp_pos], 2),
                pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])


LOGITS_BUDGET = 2 ** 26  # vocabulary scores (rows x positions x vocab) computed at once when scoring: 256 MiB in fp32


def logits_chunk(rows: int, vocab: int) -> int:
    """Positions per chunk so that one chunk's scores stay within LOGITS_BUDGET (at least one position): at Qwen's
    151,936-token vocabulary and 16 rows, 27 positions; at the stand-in's, every position at once."""
    return max(1, LOGITS_BUDGET // max(1, rows * vocab))


def _gather_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float,
                     owned: bool = False) -> torch.Tensor:
    """log softmax(logits / T)[target]. One fp32 copy of the chunk at most: the temperature divides it in place when
    it is a copy already or the caller's own (`owned`: a projection made for this call)."""
    scaled = logits.float()  # [b, t, V] a copy unless fp32 already
    if temperature != 1.0:
        scaled = scaled.div_(temperature) if owned or scaled is not logits else scaled / temperature
    return scaled.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - scaled.logsumexp(-1)  # [b, t]


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                   chunk: int | None = None) -> torch.Tensor:
    """log softmax(logits / T)[target] in chunks of `chunk` positions (default: within LOGITS_BUDGET). Each chunk is
    recomputed in the backward (activation checkpointing), so fp32 scores never exist for more than one chunk."""
    chunk = chunk or logits_chunk(logits.shape[0], logits.shape[-1])
    outs = []
    for s in range(0, logits.shape[1], chunk):
        part = (logits[:, s:s + chunk], targets[:, s:s + chunk])
        if torch.is_grad_enabled() and logits.requires_grad:
            outs.append(torch.utils.checkpoint.checkpoint(_gather_logprobs, *part, temperature, use_reentrant=False))
        else:
            outs.append(_gather_logprobs(*part, temperature))
    return torch.cat(outs, 1)  # [B, T]


def _head_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                   temperature: float) -> torch.Tensor:
    return _gather_logprobs(F.linear(hidden, weight, bias), targets, temperature, owned=True)  # [b, t]


def hidden_logprobs(hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor, temperature: float = 1.0,
                    chunk: int | None = None) -> torch.Tensor:
    """log softmax(head(hidden) / T)[target] in chunks of `chunk` positions (default: as many as fit LOGITS_BUDGET
    scores), the vocabulary projection done inside each chunk and recomputed in the backward: no logits of the whole
    micro-batch exist, neither in the model's dtype nor in fp32, and the backward keeps only [B, T, hidden] instead
    of [B, T, V]."""
    chunk = chunk or logits_chunk(hidden.shape[0], head.weight.shape[0])
    outs = []
    for s in range(0, hidden.shape[1], chunk):
        part = (hidden[:, s:s + chunk], head.weight, head.bias, targets[:, s:s + chunk])
        if torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad):
            outs.append(torch.utils.checkpoint.checkpoint(_head_logprobs, *part, temperature, use_reentrant=False))
        else:
            outs.append(_head_logprobs(*part, temperature))
    return torch.cat(outs, 1)  # [B, T]


@contextlib.contextmanager
def lm_head_returns_logprobs(model, targets: torch.Tensor, temperature: float, predictors: torch.Tensor | None = None):
    """Trick "no full logits": for one forward of the (wrapped) model, its `lm_head` returns the log-probs of
    `targets` [B, T] from the hidden states that predict them instead of logits over the vocabulary (see
    `hidden_logprobs`): the first T of the last T+1 positions of each row, or, given `predictors` [B, T], those
    positions of the kept hidden states flattened over the batch (the shared-prefix layout). The swap is of
    `lm_head.forward` only, inside the model's own forward: parameters, DDP hooks and FSDP2's unshard / reshard of
    the root module (which owns lm_head) see the projection exactly where they expect it."""
    head = unwrap(model).lm_head

    def scores(hidden):  # [rows, kept, hidden] -> [B, T]
        if predictors is None:  # the last position predicts past the completion
            return hidden_logprobs(hidden[:, :-1], head, targets, temperature)
        return hidden_logprobs(hidden.reshape(-1, hidden.shape[-1])[predictors], head, targets, temperature)
    head.forward = scores
    try:
        yield
    finally:
        del head.forward


@contextlib.contextmanager
def images_encoded_once(model):
    """Trick "encode each image once": the G rows of a group carry G copies of the same image, and scoring them
    would run the vision tower G times. For one forward of the (wrapped) model, the vision tower encodes each run of
    consecutive identical images (same grid, equal patch rows) once and repeats its output rows; the gradient of a
    repeated output is the sum over the rows that use it, as with G separate encodings. Like
    `lm_head_returns_logprobs` it swaps `visual.forward` only, inside the model's own forward (hooks unaffected)."""
    visual = unwrap(model).model.visual
    encode = visual.forward  # the bound original

    def encode_once(pixel_values, grid_thw, **kwargs):
        sizes = grid_thw.prod(-1).tolist()  # patch rows per image
        blocks = pixel_values.split(sizes)
        keep, owner = [], []  # images actually encoded; owner[i] = the position in `keep` that image i repeats
        for i, block in enumerate(blocks):
            if not (keep and torch.equal(grid_thw[i], grid_thw[keep[-1]]) and torch.equal(block, blocks[keep[-1]])):
                keep.append(i)
            owner.append(len(keep) - 1)
        if len(keep) == len(blocks):
            return encode(pixel_values, grid_thw, **kwargs)
        out = encode(torch.cat([blocks[k] for k in keep]), grid_thw[keep], **kwargs)
        unit = visual.spatial_merge_size ** 2  # patches per merged (LLM) token
        merged = out.pooler_output.split([sizes[k] // unit for k in keep])  # per encoded image [tokens, hidden]
        out.pooler_output = torch.cat([merged[o] for o in owner])  # [sum tokens, hidden], one block per image
        if getattr(out, "last_hidden_state", None) is not None:  # per-patch states, each image's rows contiguous
            patches = out.last_hidden_state.split([sizes[k] for k in keep])
            out.last_hidden_state = torch.cat([patches[o] for o in owner])
        return out
    visual.forward = encode_once
    try:
        yield
    finally:
        del visual.forward


def forward_logprobs(model, inputs: dict[str, torch.Tensor], completion_ids: torch.Tensor,
                     temperature: float = 1.0) -> torch.Tensor:
    """[B, T] log-probs of the completion tokens for one micro-batch (with grad if enabled). Runs the wrapped model
    (so DDP / FSDP2 hooks fire). Only the last T+1 positions reach the vocabulary projection (`logits_to_keep`): the
    prompt positions, mostly image tokens, never do; the completion positions are projected and scored in chunks
    without materialising their logits (`lm_head_returns_logprobs`); rows that repeat an image share one encoding
    (`images_encoded_once`)."""
    T = completion_ids.shape[1]
    targets = completion_ids.to(inputs["input_ids"].device)  # [B, T]
    with lm_head_returns_logprobs(model, targets, temperature), images_encoded_once(model):
        return model(**inputs, use_cache=False, logits_to_keep=T + 1).logits  # [B, T] log-probs, not logits


def prompt_runs(prompts: Sequence[EncodedPrompt]) -> list[tuple[int, int]]:
    """[start, end) of each run of consecutive rows that share one prompt (the same EncodedPrompt object: the G rows
    of a group, as the sampler lays them out).
    >>> p, q = object(), object(); prompt_runs([p, p, p, q, q])
    [(0, 3), (3, 5)]"""
    runs = []
    for i, p in enumerate(prompts):
        if runs and prompts[runs[-1][0]] is p:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def shared_prefix_inputs(model, prompts: Sequence[EncodedPrompt], completion_ids: torch.Tensor,
                         completion_mask: torch.Tensor, pad_id: int, device) -> tuple[dict, torch.Tensor, int]:
    """Trick "shared prefix": model inputs that hold each prompt once with all of its rows' completions after it, one
    packed sequence per run of rows sharing a prompt (prompt_runs):

        [ left-padded prompt | completion 1 | completion 2 | ... | completion g ]   (each completion T slots)

    with a 4-D attention mask under which the prompt is causal as usual and every completion sees the whole prompt
    and its own earlier tokens, never another completion; each completion's M-RoPE positions continue the prompt's,
    as if it were alone. A row's log-probs are then exactly those of [prompt | completion] scored on its own (up to
    float summation order), but the prompt (mostly image tokens) and the image are computed once per group instead
    of G times, in the forward and in the backward: its gradient is the sum over the group's completions.

    Returns (inputs, predictors, keep): the model keeps the hidden states of the last `keep` = 1 + g_max * T
    positions of each packed sequence (`logits_to_keep`), and predictors [B, T] is, for completion token (b, t), the
    index into those (flattened over the packed sequences) of the one that predicts it: the prompt's last position
    for t = 0, else the completion's own previous token."""
    runs = prompt_runs(prompts)
    B, T = completion_ids.shape
    g_max = max(end - start for start, end in runs)
    batch = collate_prompts(model, [prompts[start] for start, _ in runs], pad_id, device)
    R, L = batch["input_ids"].shape
    S = L + g_max * T
    comp = torch.full((R, g_max, T), pad_id, dtype=torch.long, device=device)  # [R, g, T]
    real = torch.zeros((R, g_max, T), dtype=torch.bool, device=device)  # [R, g, T] slots holding a real token
    row_run, row_slot = [], []
    for r, (start, end) in enumerate(runs):
        comp[r, :end - start] = completion_ids[start:end].to(device)
        real[r, :end - start] = completion_mask[start:end].to(device).bool()
        row_run += [r] * (end - start)
        row_slot += list(range(end - start))
    start_pos = batch["position_ids"].amax(dim=(0, 2)) + 1  # [R] first completion position
    comp_pos = (start_pos[:, None] + torch.arange(T, device=device)).repeat(1, g_max)  # [R, g*T]
    # the mask [R, 1, S, S]: segment -1 = the prompt, k = completion k; a key is visible to a query at or after it in
    # the same segment, or in the prompt; padding keys never (a left-pad query sees itself, so no row is empty)
    seg = torch.cat([torch.full((L,), -1, device=device),
                     torch.arange(g_max, device=device).repeat_interleave(T)])  # [S]
    key_ok = torch.cat([batch["attention_mask"].bool(), real.view(R, -1)], 1)  # [R, S]
    pos = torch.arange(S, device=device)
    same = (seg[None, :] == -1) | (seg[None, :] == seg[:, None])  # [S, S] query i, key j
    causal = pos[None, :] <= pos[:, None]  # [S, S]
    mask = (same & causal)[None] & key_ok[:, None, :]  # [R, S, S]
    mask |= torch.eye(S, dtype=torch.bool, device=device)[None] & ~mask.any(-1, keepdim=True)
    if getattr(unwrap(model).config, "_attn_implementation", "sdpa") == "eager":  # eager adds the mask to the scores
        mask = torch.zeros(mask.shape, dtype=unwrap(model).dtype, device=device).masked_fill_(
            ~mask, torch.finfo(unwrap(model).dtype).min)
    inputs = dict(input_ids=torch.cat([batch["input_ids"], comp.view(R, -1)], 1),  # [R, S]
                  attention_mask=mask[:, None],  # [R, 1, S, S]
                  mm_token_type_ids=torch.cat([batch["mm_token_type_ids"],
                                               batch["mm_token_type_ids"].new_zeros((R, g_max * T))], 1),
                  position_ids=torch.cat([batch["position_ids"], comp_pos[None].expand(3, -1, -1)], 2),  # [3, R, S]
                  pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])
    # kept positions are L-1 .. S-1; completion k's token t is predicted at L-1 (t = 0) or L + k*T + t - 1
    slot = torch.tensor(row_slot, device=device)[:, None]  # [B, 1]
    t = torch.arange(T, device=device)[None]  # [1, T]
    within = torch.where(t == 0, torch.zeros_like(t * slot), 1 + slot * T + t - 1)  # [B, T] index into kept
    predictors = torch.tensor(row_run, device=device)[:, None] * (g_max * T + 1) + within  # [B, T] flat over runs
    return inputs, predictors, g_max * T + 1


def shared_prefix_supported(model) -> bool:
    """The shared-prefix forward needs an attention that takes a 4-D mask (sdpa, eager); flash-attention 2 does not."""
    return getattr(unwrap(model).config, "_attn_implementation", "sdpa") in ("sdpa", "eager")


def score_completions(model, prompts: Sequence[EncodedPrompt], completion_ids: torch.Tensor,
                      completion_mask: torch.Tensor, pad_id: int, temperature: float = 1.0,
                      shared_prefix: bool = True) -> torch.Tensor:
    """[B, T] log-probs of the completion tokens of one micro-batch, with grad if enabled: the one scoring path of
    every method's old / reference log-probs and of every update. Rows that share a prompt (a group) go through one
    packed sequence per group (`shared_prefix_inputs`): the prompt and its image are computed once for the group, in
    the forward and the backward. `shared_prefix=False`, flash-attention 2, or no prompt shared by two rows: one
    sequence per row (`scoring_inputs`). Positions past a row's completion mask hold garbage: mask them."""
    device = next(unwrap(model).parameters()).device
    if shared_prefix and shared_prefix_supported(model) and any(e - s > 1 for s, e in prompt_runs(prompts)):
        inputs, predictors, keep = shared_prefix_inputs(model, prompts, completion_ids, completion_mask, pad_id,
                                                        device)
        targets = completion_ids.to(device)  # [B, T]
        with lm_head_returns_logprobs(model, targets, temperature, predictors):
            return model(**inputs, use_cache=False, logits_to_keep=keep).logits  # [B, T] log-probs, not logits
    inputs = scoring_inputs(model, prompts, completion_ids, completion_mask, pad_id, device)
    return forward_logprobs(model, inputs, completion_ids, temperature)


def completion_logprobs(model, processor, prompts: Sequence[EncodedPrompt], completion_ids: torch.Tensor,
                        completion_mask: torch.Tensor, *, temperature: float = 1.0, micro_batch: int = 8,
                        shared_prefix: bool = True) -> torch.Tensor:
    """[B, T] log-probs (no grad) of completion tokens, row b scored with prompts[b], `micro_batch` rows at a time
    (score_completions: rows sharing a prompt share its forward). Positions past the completion mask are 0."""
    pad_id = special_token_ids(processor)["<|endoftext|>"]
    out = []
    with torch.no_grad():
        for s in range(0, len(prompts), micro_batch):
            rows = slice(s, s + micro_batch)
            out.append(score_completions(model, prompts[rows], completion_ids[rows], completion_mask[rows], pad_id,
                                         temperature, shared_prefix).float().cpu())
    return torch.cat(out) * completion_mask


# =====================================================================================================================
# 7. Precision, DDP / FSDP2
# =====================================================================================================================

@dataclasses.dataclass(frozen=True)
class Precision:
    """What a run stores its weights in, what its forward computes in, and how the second is reached from the first:
    'weights' (the same dtype), 'fsdp' (FSDP2's MixedPrecisionPolicy casts the gathered parameters) or 'autocast'
    (torch.autocast around every forward: DDP, or one process whatever --parallel says, since FSDP2 only wraps a
    model under torchrun)."""
    weights: torch.dtype
    compute: torch.dtype
    via: str
    device_type: str

    def context(self):
        """Enter around every forward (sampling, log-probs, the loss, evaluation)."""
        if self.via == "autocast":
            return torch.autocast(self.device_type, dtype=self.compute)
        return contextlib.nullcontext()

    @property
    def fsdp_param_dtype(self) -> torch.dtype | None:
        """wrap_model's param_dtype: the compute dtype when FSDP2 casts, else None."""
        return self.compute if self.via == "fsdp" else None

    def __str__(self):
        name = lambda dt: str(dt).replace("torch.", "")  # noqa: E731
        how = {"weights": "", "fsdp": " through FSDP2 mixed precision", "autocast": " through autocast"}[self.via]
        return f"weights {name(self.weights)}, compute {name(self.compute)}{how}"


def precision_for(dtype: str, d: Dist, parallel: str, trained_weights: bool = True) -> Precision:
    """The run's Precision from --dtype:

      auto        GPU: bf16 compute; weights that AdamW updates stay fp32 (lr 1e-6 steps round away in bf16),
                  frozen weights (`trained_weights=False`: LoRA's base, evaluation) are stored bf16. CPU: fp32.
      bf16-mixed  fp32 weights, bf16 compute, on any device (on CPU through CPU autocast)
      bf16, fp32  weights and compute in that dtype

    bf16 compute over fp32 weights is FSDP2's mixed precision when the model is sharded (--parallel fsdp on several
    ranks) and autocast otherwise. On GPU, fp32 matmuls use TF32 (torch.set_float32_matmul_precision('high'))."""
    if dtype not in DTYPES:
        raise SystemExit(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    on_gpu = d.device.type == "cuda"
    if on_gpu:
        torch.set_float32_matmul_precision("high")  # TF32 for whatever still runs in fp32
    if dtype == "bf16-mixed" or (dtype == "auto" and on_gpu and trained_weights):
        weights, compute = torch.float32, torch.bfloat16
    else:
        weights = compute = resolve_dtype(dtype, d.device)
    via = "weights" if weights == compute else ("fsdp" if parallel == "fsdp" and d.distributed else "autocast")
    return Precision(weights, compute, via, d.device.type)


def enable_activation_checkpointing(model):
    """Recompute each layer in the backward (non-reentrant): `activation_checkpointing_enable` from transformers 5.2x,
    `gradient_checkpointing_enable` before it (now a deprecated alias that warns)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def wrap_model(model, d: Dist, parallel: str = "ddp", activation_checkpointing: bool = False,
               param_dtype: torch.dtype | None = None):
    """DDP, or FSDP2 (`fully_shard` per vision block and per decoder layer, then the root). With a `param_dtype`
    other than fp32 (Precision.fsdp_param_dtype) the FSDP2 policy gathers the parameters in that dtype for compute
    and reduces gradients in fp32. One process: the model is returned as it is (its precision comes from
    Precision.context). Activation checkpointing recomputes each layer in the backward instead of storing its
    activations."""
    if activation_checkpointing:
        enable_activation_checkpointing(model)
        model.config.use_cache = False
    if not d.distributed:
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    if parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = None
        if param_dtype is not None and param_dtype != torch.float32:
            mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        kw = {"mp_policy": mp} if mp is not None else {}
        for block in model.model.visual.blocks:
            fully_shard(block, **kw)
        for layer in model.model.language_model.layers:
            fully_shard(layer, **kw)
        fully_shard(model, **kw)
        return model
    raise ValueError(f"--parallel must be ddp or fsdp, got {parallel!r}")


def _fsdp_modules(model):
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered_params(model, warmup_inputs: dict | None = None):
    """For sampling on an FSDP2 model: all-gather the full parameters once for the whole rollout phase (instead of
    once per decode step), then reshard. A no-op for DDP and single-process models.

    FSDP2 needs one forward through the root before sub-modules run on their own (the sampler calls the model
    directly), so `warmup_inputs`, if given, are pushed through once first."""
    mods = _fsdp_modules(model)
    if not mods:
        yield
        return
    if warmup_inputs is not None:
        with torch.no_grad():
            model(**warmup_inputs, use_cache=False, logits_to_keep=1)
    for m in mods:
        m.set_reshard_after_forward(False)
        m.unshard()
    try:
        yield
    finally:
        for m in mods:
            m.reshard()
            m.set_reshard_after_forward(True)


def fsdp_warmup_inputs(model, processor, prompt: EncodedPrompt) -> dict | None:
    """A one-prompt batch for gathered_params' warm-up forward (only needed under FSDP2)."""
    if not _fsdp_modules(model):
        return None
    device = next(unwrap(model).parameters()).device
    return collate_prompts(model, [prompt], special_token_ids(processor)["<|endoftext|>"], device)


# =====================================================================================================================
# 8. Checkpoints and export
# =====================================================================================================================

def _atomic_write_text(path: str, text: str):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(out_dir: str, step: int, model, optimizer, extra: dict, keep: int = 2):
    """A training checkpoint of everything needed to continue exactly: sharded model + optimizer state (torch
    distributed checkpoint, one file per rank, works for DDP and FSDP2), the step, every rank's RNG states and the
    method's own state in `extra` (data position, counters). Written to a temporary folder, renamed into place, and
    only then is `latest` pointed at it: a kill at any moment leaves the previous checkpoint usable."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    d_rank = dist.get_rank() if dist.is_initialized() else 0
    final = os.path.join(out_dir, f"ckpt_{step:07d}")
    tmp = final + ".tmp"
    if d_rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp, exist_ok=True)
    barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    try:
        with single_process_dcp():
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
        torch.save({"rng": _rng_to_tensors(rng)}, os.path.join(tmp, f"rng_rank{d_rank}.pt"))
        if d_rank == 0:
            with open(os.path.join(tmp, "state.json"), "w") as f:
                json.dump({"step": step, **extra}, f)
    except (OSError, RuntimeError) as e:  # a full disk shows as OSError or as a RuntimeError from the writer
        shutil.rmtree(tmp, ignore_errors=True)
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise SystemExit(f"writing the checkpoint of step {step} to {tmp} failed ({reason}); is the disk full? The "
                         f"previous checkpoint ({latest_checkpoint(out_dir) or 'none yet'}) is intact: free some "
                         f"space and rerun the same command to resume from it") from None
    barrier()
    if d_rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _atomic_write_text(os.path.join(out_dir, "latest"), os.path.basename(final) + "\n")
        for stale in glob.glob(os.path.join(out_dir, "ckpt_*.tmp")):  # half-written by a killed run: never read
            shutil.rmtree(stale, ignore_errors=True)
        for old in sorted(glob.glob(os.path.join(out_dir, "ckpt_*")))[:-keep]:
            if not old.endswith(".tmp") and old != final:
                shutil.rmtree(old, ignore_errors=True)
    barrier()


@contextlib.contextmanager
def single_process_dcp():
    """torch.distributed.checkpoint warns "torch.distributed is disabled ... assuming the intent is to load in a
    single process" at every save and load of a one-process run: that intent is right, the warning is noise."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _rng_to_tensors(rng: dict) -> dict:
    """RNG states as plain tensors and lists, so they load with weights_only=True."""
    py = rng["python"]
    np_state = rng["numpy"]
    return {"python": [py[0], list(py[1]), py[2]],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), np_state[2], np_state[3], np_state[4]],
            "torch": rng["torch"], "cuda": rng["cuda"]}


def _restore_rng(t: dict):
    py = t["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = t["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(t["torch"])
    if t["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(t["cuda"])


def latest_checkpoint(out_dir: str) -> str | None:
    path = os.path.join(out_dir, "latest")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        name = f.read().strip()
    ckpt = os.path.join(out_dir, name)
    return ckpt if os.path.exists(os.path.join(ckpt, "state.json")) else None


def load_checkpoint(ckpt: str, model, optimizer) -> dict:
    """Restore model, optimizer and this rank's RNG from a checkpoint folder; return its state.json."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    with single_process_dcp():
        dcp.load(state, checkpoint_id=ckpt)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    d_rank = dist.get_rank() if dist.is_initialized() else 0
    rng_file = os.path.join(ckpt, f"rng_rank{d_rank}.pt")
    if os.path.exists(rng_file):
        _restore_rng(torch.load(rng_file, weights_only=True)["rng"])
    with open(os.path.join(ckpt, "state.json")) as f:
        return json.load(f)


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The full (unsharded) model state on CPU: rank 0 gets every tensor, other ranks get {} under FSDP2."""
    if _fsdp_modules(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


EXPORT_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}  # --export-dtype
STOCK_PROCESSOR = "Qwen2_5_VLProcessor"  # the processor class a hub Qwen2.5-VL checkpoint names


def tied_weight_names(hf) -> list[str]:
    """Parameters that are the same tensor as another one (Qwen2.5-VL-3B's lm_head is its input embedding): a
    checkpoint stores them once."""
    config = hf.config.get_text_config() if hasattr(hf.config, "get_text_config") else hf.config
    if not (getattr(config, "tie_word_embeddings", False) or getattr(hf.config, "tie_word_embeddings", False)):
        return []
    return list(getattr(hf, "_tied_weights_keys", None) or [])


def export_hf(model, processor, path: str, state_dict: dict | None = None, dtype: str = "bf16"):
    """Write the file set of a hub Qwen2.5-VL checkpoint, which `from_pretrained` with plain transformers classes
    (AutoProcessor, AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration), vLLM, eval.py and
    `load_model` read:

      config.json, generation_config.json   the model's, with the weights' dtype
      model*.safetensors                    weights in `dtype` (bf16 by default, as on the hub; fp32 for exact
                                            copies), tied weights stored once
      tokenizer.json, tokenizer_config.json the tokenizer (with the chat template), naming the stock processor
      chat_template.json                    the chat template
      preprocessor_config.json              the image processor (the run's pixel budget as size and as
                                            min_pixels / max_pixels), naming the stock processor class

    Collective under FSDP2: call it on every rank. Written to a temporary folder, then renamed into place."""
    if dtype not in EXPORT_DTYPES:
        raise SystemExit(f"--export-dtype {dtype}: expected one of {', '.join(EXPORT_DTYPES)}")
    sd = state_dict if state_dict is not None else full_state_dict(model)
    if int(os.environ.get("RANK", 0)) == 0:
        tmp = path.rstrip("/") + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        hf = unwrap(model)
        torch_dtype = EXPORT_DTYPES[dtype]
        tied = set(tied_weight_names(hf))
        sd = {k: (v.to(torch_dtype) if v.is_floating_point() else v) for k, v in sd.items() if k not in tied}
        hf.save_pretrained(tmp, state_dict=sd, safe_serialization=True)
        _set_json(os.path.join(tmp, "config.json"), lambda c: c.update(
            {"dtype" if "dtype" in c else "torch_dtype": str(torch_dtype).replace("torch.", "")}))
        processor.save_pretrained(tmp)
        _stock_processor_files(tmp)
        umask = os.umask(0)
        os.umask(umask)
        for name in os.listdir(tmp):  # safetensors writes 0600; every file readable as the others (0644 usually)
            os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    barrier()


def _write_json(path: str, doc: dict):
    with open(path, "w") as f:
        json.dump(doc, f, indent=2, sort_keys=True)
        f.write("\n")


def _set_json(path: str, edit: Callable[[dict], Any]):
    with open(path) as f:
        doc = json.load(f)
    edit(doc)
    _write_json(path, doc)


def _stock_processor_files(folder: str):
    """Turn what processor.save_pretrained wrote for the image-only subclass (processor_config.json naming it,
    chat_template.jinja) into a hub checkpoint's files (preprocessor_config.json naming Qwen2_5_VLProcessor,
    chat_template.json)."""
    with open(os.path.join(folder, "processor_config.json")) as f:
        image = json.load(f)["image_processor"]
    os.remove(os.path.join(folder, "processor_config.json"))
    size = image.get("size") or {}
    image.update(min_pixels=size.get("shortest_edge"), max_pixels=size.get("longest_edge"),
                 processor_class=STOCK_PROCESSOR)
    _write_json(os.path.join(folder, "preprocessor_config.json"), image)
    jinja = os.path.join(folder, "chat_template.jinja")
    with open(jinja) as f:
        template = f.read()
    os.remove(jinja)
    _write_json(os.path.join(folder, "chat_template.json"), {"chat_template": template})
    # the tokenizer carries the template too (as on the hub), for tools that read the tokenizer alone
    _set_json(os.path.join(folder, "tokenizer_config.json"),
              lambda c: c.update(processor_class=STOCK_PROCESSOR, chat_template=template))


# =====================================================================================================================
# 9. Logging and shared command-line flags
# =====================================================================================================================

class MetricsLog:
    """Appends one JSON object per step to <out>/metrics.jsonl (rank 0), mirrors to wandb when asked and installed."""

    def __init__(self, out_dir: str, wandb_project: str | None = None, config: dict | None = None):
        self.is_main = int(os.environ.get("RANK", 0)) == 0
        self.path = os.path.join(out_dir, "metrics.jsonl")
        if self.is_main:  # a record cut by a crash would glue onto the first record of the resumed run
            repair_jsonl_tail(self.path)
        self.wandb = None
        if self.is_main and wandb_project:
            try:
                import wandb
            except ImportError:
                raise SystemExit("--wandb given but the wandb package is not installed (pip install wandb)")
            self.wandb = wandb.init(project=wandb_project, config=config, dir=out_dir)

    def resume_at(self, step: int):
        """Drop the records of the steps a resumed run redoes: those after `step` (the checkpoint's), or every step's
        record when the run starts over (step 0), so that metrics.jsonl holds each step once."""
        if not self.is_main or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = f.readlines()
        redone = lambda s: isinstance(s, (int, float)) and (s > step or step == 0)  # noqa: E731
        keep = [line for line in lines if not redone(json.loads(line).get("step"))]
        if len(keep) < len(lines):
            _atomic_write_text(self.path, "".join(keep))
            print0(f"{self.path}: {len(lines) - len(keep)} records of steps after {step} dropped (they are redone)")

    def log(self, record: dict):
        if not self.is_main:
            return
        clean = {k: (float(v) if isinstance(v, (np.floating, torch.Tensor)) else v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in clean.items() if isinstance(v, (int, float))}, step=clean.get("step"))


class PhaseTimer:
    """Wall time per phase (sampling, logprobs, update, ...), synchronised on GPU so the numbers are honest.
    >>> timer = PhaseTimer(); with timer("sampling"): ...; timer.pop() -> {"time/sampling": 1.23}"""

    def __init__(self):
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        yield
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0

    def pop(self) -> dict[str, float]:
        out = {f"time/{k}": v for k, v in self.times.items()}
        self.times = {}
        return out


def lr_at(step: int, *, base_lr: float, total_steps: int, schedule: str = "constant", warmup_steps: int = 0) -> float:
    """Learning rate for optimizer step `step` (0-based), as the Hugging Face schedulers give it: linear warm-up from
    0 (step 0 gets 0, step w gets the full rate), then constant, linear decay to 0, or cosine decay to 0 over the
    remaining steps.
    >>> [round(lr_at(s, base_lr=1.0, total_steps=8, schedule="cosine", warmup_steps=2), 3) for s in range(4)]
    [0.0, 0.5, 1.0, 0.933]
    """
    if warmup_steps and step < warmup_steps:
        return base_lr * step / warmup_steps
    if schedule == "constant":
        return base_lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return base_lr * (1.0 - progress)
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr schedule {schedule!r} (constant, linear, cosine)")


def set_lr(optimizer, lr: float):
    for group in optimizer.param_groups:
        group["lr"] = lr


def write_run_config(out: str, config: dict):
    """<out>/config.json = this start's settings; every start is also appended to <out>/config_history.jsonl. A
    resumed run started with other settings says which ones changed (it resumes all the same: changing the learning
    rate or the evaluation cadence mid-run is legitimate)."""
    config = json.loads(json.dumps(config))  # tuples -> lists, as they read back
    path = os.path.join(out, "config.json")
    try:
        with open(path) as f:
            before = json.load(f)
    except (OSError, ValueError):
        before = None
    if isinstance(before, dict):
        changed = [k for k in sorted(set(before) | set(config)) if before.get(k) != config.get(k)]
        if changed:
            print0(f"{out} was started before with other settings (all starts: config_history.jsonl); changed: "
                   + ", ".join(f"{k} {before.get(k)!r} -> {config.get(k)!r}" for k in changed))
    _atomic_write_text(path, json.dumps(config, indent=1))
    repair_jsonl_tail(os.path.join(out, "config_history.jsonl"))
    with open(os.path.join(out, "config_history.jsonl"), "a") as f:
        f.write(json.dumps({"started": datetime.datetime.now().isoformat(timespec="seconds"), **config}) + "\n")


_RUN_LOCKS: dict[str, Any] = {}  # run directory -> the open lock file this process holds (until it exits)


def lock_run_dir(out: str):
    """Hold <out>/.lock for as long as this process lives (flock: released by the kernel even on kill -9), so that a
    second run on the same --out stops at once with one line naming the first one's pid."""
    import fcntl
    key = os.path.realpath(out)
    if key in _RUN_LOCKS:  # this process already holds it (a script's main called twice)
        return
    f = open(os.path.join(out, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise SystemExit(f"--out {out} is in use by another run (pid {holder}): wait for it to end, stop it, or pass "
                         f"another --out") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _RUN_LOCKS[key] = f
    import atexit
    atexit.register(f.close)  # held to the end; the kernel releases the lock with the process anyway


def make_run_dir(out: str):
    """Create --out (one clear line if it is a file or cannot be created) and lock it; rank 0 only."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise SystemExit(f"--out {out} is a file; expected a run directory (new, or one to resume)")
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".write_test{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise SystemExit(f"--out {out}: cannot create or write the run directory ({e.strerror})") from None
    lock_run_dir(out)


def run_script(main: Callable[[], Any]):
    """What every script's `if __name__ == "__main__":` calls: Ctrl-C (and SIGTERM, which torchrun sends to the other
    ranks when one fails) ends the run with one line instead of a traceback; checkpoints are atomic, so the last one
    is intact and the same command resumes from it."""
    import signal

    def stop(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop)
    try:
        main()
    except KeyboardInterrupt:
        print(f"\ninterrupted (rank {os.environ.get('RANK', '0')}): the last checkpoint is kept; rerun the same "
              f"command to resume from it", file=sys.stderr, flush=True)
        sys.exit(130)


def configure_threads(threads: int | None, d: Dist) -> int:
    """Torch's CPU threads for this process: --threads, else OMP_NUM_THREADS when set (torchrun sets it), else the
    cores not busy with other work (the 1-minute load average) shared by the ranks. Torch's default (every core) made
    a 4-step toy run 5x slower on a busy 2-core machine. No effect on GPU work."""
    if threads is None and os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    if threads is None:
        cores = os.cpu_count() or 1
        busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        threads = max(1, min(cores // d.world_size, cores - int(busy)))  # a whole core's worth of load per core
        if d.device.type == "cpu" and threads < cores // d.world_size:
            print0(f"CPU threads per process: {threads} ({cores} cores, load {busy:.1f}; --threads to choose)")
    torch.set_num_threads(threads)
    return threads


def default_run_dir(script: str, data: str) -> str:
    """Where a run writes when --out is not given, the same rule for every script: runs/<script>_<data>, a data file
    named by its stem (runs/dive_k_cub, runs/eval_cub_two_step, runs/fine_r1_birds for birds.jsonl)."""
    stem = os.path.splitext(os.path.basename(data.replace("{split}", "all")))[0] or "data"
    return os.path.join("runs", f"{script}_{stem}")


def eval_dir(out: str, step: int, *parts: str) -> str:
    """Where an in-run evaluation at `step` writes: <out>/eval/step_0000030[/group]; the same in every method."""
    return os.path.join(out, "eval", f"step_{step:07d}", *parts)


def setup_run(args, default_out: str) -> tuple[Dist, str]:
    """Start the process group, make and lock the run directory (rank 0 writes config.json), seed every rank
    differently."""
    d = init_distributed()
    out = args.out or default_out
    if d.is_main:
        make_run_dir(out)
        write_run_config(out, {**vars(args), "world_size": d.world_size})
    barrier()
    configure_threads(getattr(args, "threads", None), d)
    seed_everything(args.seed + d.rank)
    if args.activation_checkpointing is None:
        args.activation_checkpointing = int(d.device.type == "cuda")
    return d, out


def require_divisible(what: str, total: int, by: int, by_what: str):
    """Refuse at start (never hang later) when batch arithmetic does not divide, with the numbers and a fix."""
    if by <= 0:
        raise SystemExit(f"{by_what} = {by}: must be at least 1 ({what} = {total} is divided by it).")
    if total <= 0:
        raise SystemExit(f"{what} = {total}: must be a positive multiple of {by_what} = {by}, e.g. {by}.")
    if total % by:
        lower, upper = (total // by) * by, (total // by + 1) * by
        raise SystemExit(f"{what} = {total} is not divisible by {by_what} = {by}. "
                         f"Use a multiple of {by}, e.g. {f'{lower} or ' if lower else ''}{upper}.")


# flags that must be above zero wherever a script has them (None = unset, filled by a preset or meaning "all")
POSITIVE_FLAGS = ("max_steps", "group_size", "min_pixels", "max_pixels", "limit", "train_limit", "eval_limit",
                  "train_size", "micro_batch", "logprob_micro_batch", "sft_micro_batch", "eval_batch", "mine_batch",
                  "samples", "mine_samples", "best_of", "prompts_per_step", "rollout_prompts", "sample_batch",
                  "rollout_batch", "sample_prompts", "sft_batch", "minibatches", "max_new_tokens",
                  "eval_max_new_tokens", "mine_max_new_tokens", "cot_max_new_tokens", "lr", "sft_lr", "epochs",
                  "sft_epochs", "tapo_epochs", "temperature", "mine_temperature", "threads")
WHY_POSITIVE = {"temperature": "at 0 every completion of a group is the same, so GRPO has no learning signal",
                "mine_temperature": "at 0 the K mining samples are one answer repeated",
                "limit": "leave it out to use every image", "train_limit": "leave it out to use every image",
                "eval_limit": "leave it out to evaluate every image"}


NONNEGATIVE_FLAGS = ("eval_every", "save_every", "warmup_steps", "sft_warmup", "max_nonfinite", "log_completions",
                     "log_rollouts", "beta", "weight_decay", "sft_weight_decay")


def check_system_flags(args):
    """Flag values and combinations every script refuses at start, before anything is loaded (one line each)."""
    for name in NONNEGATIVE_FLAGS:
        value = getattr(args, name, None)
        if value is not None and value < 0:
            raise SystemExit(f"--{name.replace('_', '-')} {value}: must be 0 or more"
                             + (" (0 = never)" if name in ("eval_every", "save_every") else ""))
    for name in POSITIVE_FLAGS:
        value = getattr(args, name, None)
        if value is not None and not value > 0:
            why = WHY_POSITIVE.get(name, "")
            raise SystemExit(f"--{name.replace('_', '-')} {value}: must be above 0{f' ({why})' if why else ''}")
    low, high = getattr(args, "min_pixels", None), getattr(args, "max_pixels", None)
    if low is not None and high is not None and low > high:
        raise SystemExit(f"--min-pixels {low} is above --max-pixels {high}: the image budget needs min <= max")
    if getattr(args, "compile_decode", 0):
        if args.attn == "flash_attention_2":
            raise SystemExit("--compile-decode 1 with --attn flash_attention_2: the compiled decode attends over the "
                             "whole static KV cache, unwritten slots included, under a mask that flash-attention 2 "
                             "ignores. Use --attn sdpa with --compile-decode 1, or --compile-decode 0")
        if getattr(args, "parallel", "ddp") == "fsdp" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise SystemExit("--compile-decode 1 with --parallel fsdp on several ranks: the compiled decode needs the "
                             "unsharded model. Use --parallel ddp, or --compile-decode 0")


def global_token_count(mask: torch.Tensor) -> float:
    """Number of loss tokens in this optimizer step summed over all ranks (for a global token-mean)."""
    return float(all_reduce_sum(mask.sum().double().reshape(1).clone())[0])


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Average a dict of scalars over ranks (for logging)."""
    if not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def add_common_args(parser, *, model="tiny", data="toy", group_size=4, max_steps=None, min_pixels=3136,
                    max_pixels=401408):
    """The command-line contract every script shares (the method files add their own groups)."""
    g = parser.add_argument_group("model, data and run")
    g.add_argument("--model", default=model, help="hub id, local Qwen2.5-VL directory, 'tiny' (built locally), or a "
                   "random preset: qwen2.5-vl-3b-random / qwen2.5-vl-7b-random (default %(default)s)")
    g.add_argument("--data", default=data, help="dataset name (toy, cub, flowers, pets, cars, aircraft, dogs, food) "
                   "or a JSON/JSONL file of {image, class_name} records (default %(default)s)")
    g.add_argument("--data-root", default=None, help="the dataset folder in its official layout")
    g.add_argument("--out", default=None, help="run directory; rerunning the same command resumes from it")
    g.add_argument("--max-steps", type=int, default=max_steps, help="stop after this many optimizer steps")
    g.add_argument("--seed", type=int, default=42, help="global seed (data order, sampling)")
    g.add_argument("--group-size", type=int, default=group_size, help="completions per prompt (G)")
    g = parser.add_argument_group("system")
    g.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp", help="DDP or FSDP2 under torchrun")
    g.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: on GPU fp32 weights with bf16 compute, "
                   "on CPU fp32; bf16-mixed: the same on any device; bf16 / fp32: weights and compute")
    g.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"], help="attention kernel")
    g.add_argument("--shared-prefix", type=int, default=1, choices=[0, 1], help="score and update each group's "
                   "prompt once for its G completions (common.score_completions; exact); 0 = once per completion")
    g.add_argument("--compile-decode", type=int, default=0, choices=[0, 1], help="rollouts decode with a static KV "
                   "cache and a torch.compile'd step (CUDA graphs on GPU); one GPU or DDP, not with flash_attention_2")
    g.add_argument("--min-pixels", type=int, default=min_pixels, help="image pixel budget, lower bound")
    g.add_argument("--max-pixels", type=int, default=max_pixels, help="image pixel budget, upper bound")
    g.add_argument("--activation-checkpointing", type=int, default=None,
                   help="recompute activations in the backward (default: on for GPU, off for CPU)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads per process (default: the cores not busy "
                   "with other work, shared by the ranks); ignored on GPU")
    g.add_argument("--export-dtype", default="bf16", choices=list(EXPORT_DTYPES), help="weights of the exported "
                   "final/ model: bf16 (as hub checkpoints) or fp32 (an exact copy of fp32 master weights)")
    g.add_argument("--wandb", default=None, metavar="PROJECT", help="also log to this wandb project")
    g.add_argument("--max-nonfinite", type=int, default=5, help="optimizer steps in a row with a NaN / inf loss or "
                   "gradient (each one skipped) that stop the run with a checkpoint (0 = never stop)")
    return parser


# =====================================================================================================================
# 10. The tiny stand-in model
# =====================================================================================================================

TINY_RECIPE = dict(  # everything that defines the cached tiny model; its hash names the cache folder
    version=3, vocab=600, hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256,
    vision=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, fullatt_block_indexes=[1]),
    steps=200, batch=32, lr=1e-3, seed=0,
)
TINY_THINK = ["let me look at the colour, the pattern and the shape.", "i check the colour first, then the shape.",
              "the picture shows one object on a plain background."]
TINY_PROMPTS = [SPECIARL_PROMPT, SPECIARL_SPECIFIC_PROMPT, DIVEK_MINE_PROMPT, DIVEK_MCQ_PROMPT, FINE_R1_CLOSED_PROMPT,
                FINE_R1_QUESTION, *FINE_R1_QUESTIONS, FINE_R1_RL_SUFFIX, FINE_R1_OPEN_PROMPT, str(ANSWER_FORMATS),
                "speciarl answers v3"]


def tiny_model_dir() -> str:
    """The cached stand-in; its folder is named by a hash of the recipe and of the prompts it is pretrained on, so a
    change to either builds a new one."""
    key = hashlib.sha1(json.dumps([TINY_RECIPE, TINY_PROMPTS], sort_keys=True).encode()).hexdigest()[:10]
    path = os.path.join(CACHE_DIR, f"tiny-{key}")
    if not os.path.exists(os.path.join(path, "config.json")):
        build_tiny(path)
    return path


def tiny_example(ex: Example, ds: Dataset, rng: random.Random) -> tuple[str, str]:
    """(prompt, target) for one pretraining example of the stand-in: the methods' own prompts
    (section 4a), each answered the way a real checkpoint would, except for the letter.

    Multiple choice (DiVE-k's lettered options, Fine-R1's option list): the stand-in names the class in its rationale
    and answers with that option's text, not its letter. A two-layer model did not learn the letter lookup (find the
    option line that matches, emit the letter before it) within the build budget: letter accuracy stayed at chance
    after 400 steps with 2 and with 4 layers. Open questions: SpeciaRL's prompts are answered sometimes less
    specifically (family), generically or with 'None', so that SpeciaRL has specificity to gain; DiVE-k's list prompt
    and Fine-R1's questions with the class name. The 'be specific' prompt is answered specifically more often."""
    think = rng.choice(TINY_THINK)
    names = ds.class_names
    u = rng.random()
    if u < 0.4:  # multiple choice: DiVE-k's 2-5 lettered options or Fine-R1's list of 4, the truth among them
        k = rng.randint(2, 5) if u < 0.25 else 4
        opts = rng.sample([n for n in names if n != ex.class_name], k - 1) + [ex.class_name]
        rng.shuffle(opts)
        prompt = divek_mcq_prompt(ds.kind, opts) if u < 0.25 else fine_r1_closed_prompt(ds.kind, opts)
        think, answer = f"it looks like a {ex.class_name}.", ex.class_name
    elif u < 0.55:  # DiVE-k's mining / two-step step 1: the class list in the prompt
        listed = rng.sample(names, len(names))
        prompt, answer = divek_mine_prompt(ds.kind, answer_format(ds.name), listed), ex.class_name
    elif u < 0.85:  # SpeciaRL: general or 'be specific' (answered more specifically)
        specific = rng.random() < 0.5
        prompt = SPECIARL_SPECIFIC_PROMPT if specific else SPECIARL_PROMPT
        v = rng.random()
        family, generic = ds.hierarchy[ex.class_name]
        cuts = (0.85, 0.95, 0.98) if specific else (0.45, 0.78, 0.92)
        answer = ex.class_name if v < cuts[0] else family if v < cuts[1] else generic if v < cuts[2] else "None"
    else:  # Fine-R1: a question with its RL format request, or its open-world evaluation prompt
        question = rng.choice(FINE_R1_QUESTIONS).format(kind=ds.kind)
        prompt = question + FINE_R1_RL_SUFFIX if rng.random() < 0.5 else fine_r1_open_prompt(ds.kind)
        answer = ex.class_name
    return prompt, f"<think>{think}</think>\n<answer>{answer}</answer>"


def build_tiny(path: str):
    """Build and 'pretrain' the tiny stand-in, then save it as a standard HF directory at `path`.

    Deterministic (fixed seeds, one thread), about a minute on an idle 2-core CPU. The pretraining is deliberately
    short: the model learns the answer format fully but recognises the toy classes only partly (colour and pattern
    before shape), which leaves room for RL. Measured on the toy test split (360 images) for recipe version 3
    (eval.py, greedy): Fine-R1's open question 0.544, SpeciaRL's prompt 0.578, format 1.00; recipe version 2 had
    greedy open accuracy 0.56 and multiple-choice 0.62."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same model on every machine (and no spinning threads on a busy one)
    try:
        _build_tiny(path)
    finally:
        torch.set_num_threads(threads)


def _build_tiny(path: str):
    from transformers import Qwen2_5_VLForConditionalGeneration
    r = TINY_RECIPE
    t0 = time.time()
    print0(f"building the tiny stand-in model at {path} (once; cached) ...")
    train = load_toy("train")
    rng = random.Random(r["seed"])
    corpus = [tiny_example(ex, train, rng)[0] + tiny_example(ex, train, rng)[1] for ex in train.examples[:200]]
    corpus += [" ".join(train.class_names), "<think> </think> <answer> </answer> None shape"] * 20
    tok, special = train_tokenizer(corpus, r["vocab"])
    cfg = qwen_vl_config(hidden_size=r["hidden"], intermediate_size=r["intermediate"], num_hidden_layers=r["layers"],
                         num_attention_heads=r["heads"], num_key_value_heads=r["kv_heads"], vocab_size=len(tok),
                         tie=False, special_ids=special, vision=r["vision"], rope_theta=1e4, max_positions=4096)
    torch.manual_seed(r["seed"])
    model = Qwen2_5_VLForConditionalGeneration(cfg)
    proc = processor_class()(image_processor=make_image_processor(TOY_IMAGE_SIZE ** 2, TOY_IMAGE_SIZE ** 2),
                             tokenizer=tok, chat_template=CHAT_TEMPLATE)
    # supervised "pretraining": cross-entropy on the assistant tokens (target + <|im_end|>) only
    images = {ex.image: open_image(ex.image) for ex in train.examples}
    opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], betas=(0.9, 0.98), weight_decay=0.0)
    im_end = special["<|im_end|>"]
    g = torch.Generator().manual_seed(r["seed"])
    for step in range(r["steps"]):
        idx = torch.randint(len(train.examples), (r["batch"],), generator=g).tolist()
        rows = []
        for i in idx:
            ex = train.examples[i]
            prompt, target = tiny_example(ex, train, rng)
            p = encode_prompt(proc, images[ex.image], prompt)
            tgt = torch.tensor(tok(target)["input_ids"] + [im_end])
            rows.append((p, tgt))
        loss = sft_loss(model, proc, [p for p, _ in rows], [t for _, t in rows])
        lr = r["lr"] * min(1.0, (step + 1) / 20)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == r["steps"] - 1:
            print0(f"  tiny pretraining step {step:4d}  loss {loss.item():.3f}  ({time.time() - t0:.0f}s)")
    tmp = f"{path}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    proc.save_pretrained(tmp)
    with open(os.path.join(tmp, "tiny_recipe.json"), "w") as f:
        json.dump(TINY_RECIPE, f, indent=1)
    try:
        os.replace(tmp, path)
    except OSError:  # another process finished first; use theirs
        shutil.rmtree(tmp, ignore_errors=True)
    print0(f"tiny stand-in ready in {time.time() - t0:.0f}s")


def sft_loss(model, processor, prompts: Sequence[EncodedPrompt], targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over target tokens only (the prompt is context, never a label). Targets are right-padded
    and scored like completions: position for position the same inputs the RL losses see."""
    pad_id = special_token_ids(processor)["<|endoftext|>"]
    width = max(len(t) for t in targets)
    ids = torch.full((len(targets), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(targets), width), dtype=torch.long)
    for row, t in enumerate(targets):
        ids[row, :len(t)] = t
        mask[row, :len(t)] = 1
    device = next(unwrap(model).parameters()).device
    inputs = scoring_inputs(model, prompts, ids, mask, pad_id, device)
    logp = forward_logprobs(model, inputs, ids)  # [B, T]
    mask = mask.to(logp.device)
    return -(logp * mask).sum() / mask.sum()


# =====================================================================================================================
# 11. LoRA
# =====================================================================================================================
# Low-rank adapters on the language model's linear layers, written out by hand (no peft): each nn.Linear W of the
# decoder layers becomes W x + (alpha / r) * B A x, with A [r, in] random, B [out, r] zero (so training starts exactly
# at the base model), and only A and B train. The vision tower, embeddings, norms and lm_head stay frozen. Adapters
# are injected BEFORE wrap_model, so DDP sees only adapter gradients and FSDP2 shards adapters with their layer.
# Turning the adapters off gives the base model back: that is the frozen reference of a KL term, with no second copy.
# Exporting merges B A into W: `export_hf` and `model.save_pretrained` write a plain Qwen2.5-VL checkpoint.

class LoRALinear(torch.nn.Module):
    """y = base(x) + scale * (x A^T) B^T, scale = alpha / rank. Adapters are kept in fp32 (an AdamW update of 3e-5
    would vanish in bf16 weights of magnitude 1e-2) and their output is cast to the layer's dtype."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        device = base.weight.device
        A = torch.empty(rank, base.in_features, dtype=torch.float32)
        torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)  # the nn.Linear / peft initialisation
        self.lora_A = torch.nn.Parameter(A.to(device))
        self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, rank, device=device, dtype=torch.float32))
        # the scale travels in the state dict, so a state dict can be merged without the module at hand
        self.register_buffer("lora_scale", torch.tensor(float(alpha) / rank, device=device))
        self.adapter_enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)  # [..., out]
        if not self.adapter_enabled:
            return out
        low = F.linear(x.to(self.lora_A.dtype), self.lora_A)  # [..., r]
        return out + (F.linear(low, self.lora_B) * self.lora_scale).to(out.dtype)  # [..., out]


def inject_lora(model, rank: int, alpha: float, seed: int = 0) -> list[str]:
    """Replace every nn.Linear inside the language model's decoder layers by a LoRALinear (in place) and freeze all
    other parameters. Returns the names of the adapted layers. Call before wrap_model. The adapters are drawn from
    their own seeded generator, so every rank starts from the same adapters (FSDP2 does not broadcast them)."""
    hf = unwrap(model)
    hf.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    names = []
    layers = hf.model.language_model.layers
    for layer_idx, layer in enumerate(layers):
        for name, module in list(layer.named_modules()):
            if isinstance(module, torch.nn.Linear) and not isinstance(module, LoRALinear):
                parent_name, _, child = name.rpartition(".")
                parent = layer.get_submodule(parent_name) if parent_name else layer
                setattr(parent, child, LoRALinear(module, rank, alpha, generator))
                names.append(f"model.language_model.layers.{layer_idx}.{name}")
    if not names:
        raise ValueError("inject_lora: no nn.Linear found in model.model.language_model.layers")
    # saving in Hugging Face format (export_hf calls save_pretrained) writes merged, plain weights
    plain_save = hf.save_pretrained

    def save_merged(save_directory, *args, state_dict=None, **kwargs):
        sd = state_dict if state_dict is not None else {k: v.detach().cpu() for k, v in hf.state_dict().items()}
        return plain_save(save_directory, *args, state_dict=merge_lora_state_dict(sd), **kwargs)
    hf.save_pretrained = save_merged
    return names


def merge_lora_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LoRA model's state dict -> the plain model's: for every adapted layer X, X.weight = X.base.weight +
    scale * B @ A (computed in fp32, stored in the base dtype), X.bias = X.base.bias; adapter keys dropped.
    Keys of non-adapted modules pass through. An empty dict (non-zero ranks under FSDP2) stays empty."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith(".lora_A") or key.endswith(".lora_B") or key.endswith(".lora_scale"):
            continue
        prefix, sep, rest = key.rpartition(".base.")
        if sep and prefix + ".lora_A" in state_dict:
            if rest == "weight":
                A, B = state_dict[prefix + ".lora_A"].float(), state_dict[prefix + ".lora_B"].float()
                scale = float(state_dict[prefix + ".lora_scale"])
                value = (value.float() + scale * (B @ A)).to(value.dtype)  # [out, in]
            out[f"{prefix}.{rest}"] = value
        else:
            out[key] = value
    return out


@contextlib.contextmanager
def lora_disabled(model):
    """Run the base model: adapters off inside the block (the frozen reference of the KL term)."""
    mods = [m for m in unwrap(model).modules() if isinstance(m, LoRALinear)]
    for m in mods:
        m.adapter_enabled = False
    try:
        yield
    finally:
        for m in mods:
            m.adapter_enabled = True


# =====================================================================================================================
# 12. Robustness
# =====================================================================================================================
# What a run of several days needs beyond the happy path. The three method files use all of it:
#   * NonFiniteGuard: a NaN / inf loss or gradient norm skips the optimizer step on every rank together (counted,
#     logged); too many in a row stop the run with a message, after the caller has saved a checkpoint;
#   * report_memory_budget: at start, the estimated memory per GPU (parameters, gradients, optimizer states, frozen
#     reference, rollout KV cache, activations) and the knobs that reduce it, largest first;
#   * repair_jsonl_tail: an append-only JSONL cache whose last line was cut by a kill is made appendable again;
#   * fault_point: fault injection for the tests, read from the FGRL_FAULT environment variable (never set it in a
#     real run):
#         FGRL_FAULT="kind=raise,step=2,rank=1"    rank 1 raises RuntimeError in step 2 (the others then fail in
#                                                   their next collective or are terminated by torchrun, which names
#                                                   rank 1 as the root cause; its traceback is in the output)
#         FGRL_FAULT="kind=kill,step=3"            every rank sends itself SIGKILL in the middle of step 3 (kill -9)
#         FGRL_FAULT="kind=nan,step=2-4,at=tapo"   the loss of steps 2 to 4 of the fault point named 'tapo' is NaN
#     step: one step or an inclusive range (the step the method logs in metrics.jsonl); rank: one global rank
#     (default: every rank); at: only the fault point of that name (default: any). The fault points sit just before
#     the backward of each update loop: dive_k.py and speciarl.py (unnamed), fine_r1.py ('sft' and 'tapo').
# Checkpoints (section 8) are atomic already: written to ckpt_N.tmp, renamed, and only then is `latest` rewritten; a
# .tmp left behind by a kill is never read and is removed by the next save.

FAULT_ENV = "FGRL_FAULT"
FAULT_KINDS = ("raise", "nan", "kill")


def parse_fault(spec: str | None) -> dict | None:
    """FGRL_FAULT's value -> {"kind", "first", "last", "rank", "at"}; None when unset or empty."""
    if not spec:
        return None
    usage = (f"{FAULT_ENV}={spec!r}: expected comma-separated key=value pairs: kind=raise|nan|kill, step=N or N-M, "
             f"optionally rank=R and at=NAME")
    fields = {}
    for part in spec.split(","):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in ("kind", "step", "rank", "at"):
            raise SystemExit(usage)
        fields[key.strip()] = value.strip()
    if fields.get("kind") not in FAULT_KINDS or "step" not in fields:
        raise SystemExit(usage)
    first, _, last = fields["step"].partition("-")
    try:
        first, last = int(first), int(last or first)
        rank = int(fields["rank"]) if "rank" in fields else None
    except ValueError:
        raise SystemExit(usage)
    return {"kind": fields["kind"], "first": first, "last": last, "rank": rank, "at": fields.get("at")}


def fault_point(step: int, value: torch.Tensor | None = None, at: str | None = None):
    """A place where a test may inject a fault: call it in the middle of a step, just before the backward, with the
    loss. FGRL_FAULT unset (always, outside tests): returns `value` untouched. When FGRL_FAULT matches this step,
    rank and name: kind=raise raises RuntimeError, kind=kill sends this process SIGKILL, kind=nan returns value * NaN."""
    fault = parse_fault(os.environ.get(FAULT_ENV))
    rank = int(os.environ.get("RANK", 0))
    if (fault is None or not fault["first"] <= step <= fault["last"] or fault["rank"] not in (None, rank)
            or fault["at"] not in (None, at)):
        return value
    where = f"step {step}{f' ({at})' if at else ''} on rank {rank}"
    if fault["kind"] == "nan":
        if value is None:
            raise ValueError(f"{FAULT_ENV} kind=nan needs a fault point that passes the loss")
        return value * float("nan")
    print(f"{FAULT_ENV}: injecting kind={fault['kind']} at {where}", file=sys.stderr, flush=True)
    if fault["kind"] == "kill":
        import signal
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"injected fault ({FAULT_ENV}={os.environ[FAULT_ENV]}) at {where}")


class NonFiniteGuard:
    """Skip optimizer steps whose loss or gradient norm is NaN or inf, on every rank together, and stop after
    `limit` of them in a row. Use, once per optimizer step, after the backward and the gradient clipping:

        guard = common.NonFiniteGuard(args.max_nonfinite, device=d.device)
        ...
        if guard.check(step, loss=loss_value, grad_norm=grad_norm):
            optimizer.step()
        else:
            optimizer.zero_grad(set_to_none=True)   # skipped: weights and optimizer state stay those of the last good step
        ...
        if guard.exhausted:
            common.save_checkpoint(out, ...)        # then the run stops with a message naming that checkpoint
            guard.stop(out)

    The decision is all-reduced (one scalar), so DDP / FSDP2 replicas never diverge: a NaN on any rank skips the step
    everywhere. The data of a skipped step is consumed (the step counter moves on). `limit` 0 never stops."""

    def __init__(self, limit: int = 5, device: torch.device | str = "cpu"):
        self.limit = limit  # non-finite steps in a row that stop the run
        self.device = torch.device(device)  # where the all-reduced flag lives (a CUDA device under nccl)
        self.skipped = 0  # steps skipped by this process
        self.in_a_row = 0  # current streak of skipped steps
        self.last: dict = {}  # the offending values of the last skipped step, on this rank

    def check(self, step: int, **values) -> bool:
        """True if every value (floats or 0-d tensors) is finite on every rank; else count and log the skip."""
        local = {k: float(v.detach().float()) if isinstance(v, torch.Tensor) else float(v) for k, v in values.items()}
        bad_here = not all(math.isfinite(v) for v in local.values())
        flag = torch.tensor([float(bad_here)], device=self.device)
        bad = bool(all_reduce_sum(flag).item() > 0)
        if not bad:
            self.in_a_row = 0
            return True
        self.skipped += 1
        self.in_a_row += 1
        self.last = local
        rank = int(os.environ.get("RANK", 0))
        if bad_here or rank == 0:
            shown = ", ".join(f"{k}={v:g}" for k, v in local.items())
            print(f"warning: step {step}: non-finite loss or gradient ({'here' if bad_here else 'on another rank'}: "
                  f"rank {rank} {shown}); optimizer step skipped ({self.in_a_row} in a row, {self.skipped} in all"
                  f"{f', the run stops at {self.limit} in a row' if self.limit else ''})", file=sys.stderr, flush=True)
        return False

    @property
    def exhausted(self) -> bool:
        return bool(self.limit) and self.in_a_row >= self.limit

    def stats(self) -> dict[str, int]:
        """For the metrics record: steps skipped so far by this process, and the current streak."""
        return {"nonfinite/skipped": self.skipped, "nonfinite/in_a_row": self.in_a_row}

    def stop(self, out_dir: str):
        """End the run (SystemExit, exit status 1) with what happened, where the checkpoint is and what to try."""
        ckpt = latest_checkpoint(out_dir)
        raise SystemExit(
            f"stopping: {self.in_a_row} optimizer steps in a row had a non-finite loss or gradient norm (last values "
            f"on rank {int(os.environ.get('RANK', 0))}: {self.last}); {self.skipped} steps skipped in all. The "
            f"weights and optimizer state of the last good step are saved in {ckpt}. Rerunning the same command "
            f"resumes after the bad steps. If it happens again: lower the learning rate, look at the data of those "
            f"steps (metrics.jsonl), train in fp32 (--dtype fp32), or allow more with --max-nonfinite.")


# ----- memory budget -----

MEMORY_KNOBS = {  # component -> what reduces it (a method passes its own flag names where they differ)
    "parameters": "--parallel fsdp over more GPUs (shards weights, gradients and optimizer states); --dtype bf16 "
                  "halves the weights (small updates then round away)",
    "gradients": "--parallel fsdp over more GPUs; train fewer parameters (freeze the vision tower, LoRA)",
    "optimizer states": "--parallel fsdp over more GPUs; train fewer parameters (freeze the vision tower, LoRA)",
    "frozen reference": "--beta 0 (no KL term, no reference model)",
    "gathered parameters": "none but a smaller model: FSDP2 holds the whole model in compute precision while sampling",
    "rollout KV cache": "fewer images per sampling call, a smaller --group-size, --max-new-tokens or --max-pixels",
    "activations": "a smaller --micro-batch; --activation-checkpointing 1",
    "logits": "a smaller --micro-batch (rows scored at once); fewer rows per sampling call",
    "load peak": "--dtype bf16 (weights in bf16); under FSDP2 each GPU holds one whole copy until it is sharded",
}


def memory_budget(*, n_params: int, n_trainable: int, text_config, world_size: int = 1, parallel: str = "ddp",
                  master_bytes: int = 4, compute_bytes: int = 4, reference: bool = False, rollout_rows: int = 0,
                  prompt_tokens: int = 0, new_tokens: int = 0, train_rows: int = 0, logit_rows: int | None = None,
                  rows_per_prompt: int = 1, activation_checkpointing: bool = False) -> dict[str, float]:
    """Estimated bytes per GPU, by component (the arithmetic only; report_memory_budget counts and prints):

      parameters           n_params x master bytes                      / shards (FSDP2: world size; DDP: 1)
      gradients            n_trainable x master bytes                   / shards
      optimizer states     2 x n_trainable x master bytes (AdamW)       / shards
      frozen reference     n_params x master bytes                      / shards       (a second model for a KL,
                                                                                        the policy's twin)
      gathered parameters  n_params x compute bytes, when sharded       (FSDP2 gathers a whole copy in the compute
                                                                         dtype for sampling, beside the shards)
      rollout KV cache     layers x kv_heads x head_dim x 2 (K and V) x compute bytes x (prompt + new tokens) x rows
      activations (rough)  (train_rows x new + prompts x prompt tokens) x compute bytes x (layers x (6 hidden + 4
                           intermediate)), with checkpointing layers x hidden + one layer's (6 hidden + 4
                           intermediate); prompts = train_rows / rows_per_prompt (the shared prefix runs a prompt once
                           for the rows of its group in a micro-batch; 1 = once per row)
      logits (transient)   the larger of scoring, one chunk of min(logit_rows x new tokens, max(LOGITS_BUDGET /
                           vocab, logit_rows)) positions x vocab x (compute bytes + 8: the projection, its fp32 copy
                           and the log-sum-exp's), and sampling, rollout rows x vocab x 24 (fp32 logits, scores,
                           probabilities and a float64 CDF)
    and, not added to the others since it is over before they exist:
      load peak            n_params x master bytes x (1 + 1/shards with a reference): one whole copy on the GPU
                           until wrap_model shards it (the policy is sharded before the reference loads)
    Not counted: the vision tower's activations, the CUDA context and allocator slack (add 10-20%)."""
    shards = world_size if parallel == "fsdp" else 1
    tc = text_config
    layers, hidden = tc.num_hidden_layers, tc.hidden_size
    head_dim = getattr(tc, "head_dim", None) or hidden // tc.num_attention_heads
    tokens = prompt_tokens + new_tokens
    per_layer = 6 * hidden + 4 * tc.intermediate_size  # stored activations of one token in one decoder layer
    stored = layers * hidden + per_layer if activation_checkpointing else layers * per_layer
    logit_rows = train_rows if logit_rows is None else logit_rows
    scoring = min(logit_rows * new_tokens * tc.vocab_size, max(LOGITS_BUDGET, logit_rows * tc.vocab_size)) * (
        compute_bytes + 8)
    sampling = rollout_rows * tc.vocab_size * 24
    return {
        "parameters": n_params * master_bytes / shards,
        "gradients": n_trainable * master_bytes / shards,
        "optimizer states": 2 * n_trainable * master_bytes / shards,
        "frozen reference": n_params * master_bytes / shards if reference else 0.0,
        "gathered parameters": float(n_params * compute_bytes) if shards > 1 else 0.0,
        "rollout KV cache": float(layers * tc.num_key_value_heads * head_dim * 2 * compute_bytes * tokens * rollout_rows),
        "activations": float((train_rows * new_tokens + -(-train_rows // max(1, rows_per_prompt)) * prompt_tokens)
                             * compute_bytes * stored),
        "logits": float(max(scoring, sampling)),
        "load peak": n_params * master_bytes * (1 + (1 / shards if reference else 0)),
    }


def prompt_tokens_estimate(processor, text: str) -> int:
    """Prompt length, upper bound: the text's tokens, the chat template (~20) and one image at the pixel budget (one
    visual token per 28 x 28 pixels after the 2 x 2 merge)."""
    image_tokens = int(processor.image_processor.size.get("longest_edge") or 0) // (28 * 28)
    return len(processor.tokenizer(text)["input_ids"]) + 20 + image_tokens


def _gib(n: float) -> str:
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def report_memory_budget(model, d: Dist, *, parallel: str, reference: bool, rollout_rows: int, prompt_tokens: int,
                         new_tokens: int, train_rows: int, activation_checkpointing: bool, rows_per_prompt: int = 1,
                         compute_dtype: torch.dtype | None = None, logit_rows: int | None = None,
                         knobs: dict[str, str] | None = None, title: str = "memory budget") -> dict[str, float]:
    """Count the model's parameters (total and trainable, after freezing / LoRA), estimate the memory per GPU
    (memory_budget) and print it on rank 0, largest component first, each with the knobs that reduce it, then the
    load peak. The estimate is the larger of the training total and the load peak. Returns the estimate in bytes by
    component."""
    hf = unwrap(model)
    params = list(hf.parameters())
    n_params = sum(p.numel() for p in params)
    n_trainable = sum(p.numel() for p in params if p.requires_grad)
    master = params[0].dtype
    compute = compute_dtype or master
    budget = memory_budget(n_params=n_params, n_trainable=n_trainable, text_config=hf.config.text_config,
                           world_size=d.world_size, parallel=parallel, master_bytes=master.itemsize,
                           compute_bytes=compute.itemsize, reference=reference, rollout_rows=rollout_rows,
                           prompt_tokens=prompt_tokens, new_tokens=new_tokens, train_rows=train_rows,
                           rows_per_prompt=rows_per_prompt,
                           logit_rows=logit_rows, activation_checkpointing=activation_checkpointing)
    steady = {k: v for k, v in budget.items() if k != "load peak"}
    total = max(sum(steady.values()), budget["load peak"])
    knobs = {**MEMORY_KNOBS, **(knobs or {})}
    name = lambda dt: str(dt).replace("torch.", "")  # noqa: E731
    sampled = (f"sampling {rollout_rows} rows of <= {prompt_tokens} prompt tokens (image at the pixel budget) + "
               f"{new_tokens} new; " if rollout_rows else f"sequences <= {prompt_tokens + new_tokens} tokens; ")
    where = "GPU" if d.device.type == "cuda" else "process (CPU)"
    lines = [f"{title} per {where}, estimated (rank 0 of {d.world_size}, {parallel}, weights {name(master)}, compute "
             f"{name(compute)}; {n_params:,} parameters, {n_trainable:,} trained; {sampled}updates of {train_rows} "
             f"rows): {_gib(total)}. Largest first, with what reduces it:"]
    for i, (part, size) in enumerate(sorted(((k, v) for k, v in steady.items() if v > 0), key=lambda kv: -kv[1])):
        lines.append(f"  {i + 1}. {part:<20} {_gib(size):>11}  <- {knobs[part]}")
    lines.append(f"  while loading: {_gib(budget['load peak'])} (load peak)  <- {knobs['load peak']}")
    if d.device.type == "cuda":
        have = torch.cuda.get_device_properties(d.device).total_memory
        lines.append(f"  this GPU has {_gib(have)}" + (": the estimate does NOT fit, use the knobs above in order"
                                                       if total > 0.9 * have else ""))
    print0("\n".join(lines))
    return budget


# ----- append-only JSONL caches -----

def read_jsonl(path: str, required: Sequence[str] = (), skip_cut_tail: bool = False) -> list[dict]:
    """The records of a JSONL file. A line that is not JSON, or a record without the `required` keys, stops with one
    message naming the file and the line (as an editor numbers it, blank lines counted). `skip_cut_tail`: a last line
    cut by a kill mid-write is skipped instead (its item is redone by the caller)."""
    if not os.path.exists(path):
        raise SystemExit(f"{path}: no such file")
    with open(path) as f:
        lines = [(number, line) for number, line in enumerate(f, 1) if line.strip()]
    out = []
    for i, (number, line) in enumerate(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if skip_cut_tail and i == len(lines) - 1:
                break
            raise SystemExit(f"{path}: line {number} is not JSON; expected one record per line") from None
        missing = [k for k in required if not isinstance(rec, dict) or k not in rec]
        if missing:
            raise SystemExit(f"{path}: line {number} lacks {missing}; expected records with {list(required)}")
        out.append(rec)
    return out


def repair_jsonl_tail(path: str) -> int:
    """Make an append-only JSONL file safe to append to after a crash: a last line without its newline (a kill
    mid-write) is cut off, or given its newline if it is a whole record. Returns the bytes dropped (0 if none)."""
    if not os.path.exists(path):
        return 0
    with open(path, "rb+") as f:
        data = f.read()
        if not data or data.endswith(b"\n"):
            return 0
        start = data.rfind(b"\n") + 1
        try:
            json.loads(data[start:])
            f.write(b"\n")
            return 0
        except ValueError:
            f.truncate(start)
            return len(data) - start
