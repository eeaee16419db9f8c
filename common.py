"""
common.py: the model side every method shares, in execution order: 1. distributed setup (nccl on GPU, gloo on CPU);
2. model and processor loading; 3. prompt encoding and the rollout sampler (each prompt prefilled once, its KV cache
shared by the group); 4. per-token log-probs of completions (each group's prompt run once, vocabulary scores only at
completion positions, in bounded chunks) and the SFT loss; 5. precision, DDP / FSDP2 (parameters gathered once per
rollout phase); 6. JSONL inputs and the resumable per-rank map. A run's life (flags, checkpoints, logging, resume,
export, the guard) is lifecycle.py; data.py, judges.py and memory.py have one job each. Nothing here imports a
method, eval, bench or tiny.

Facts about Qwen2.5-VL in transformers 5.x that shape this file (README: Real runs):
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
import functools
import glob
import json
import os
import random
import sys
import time
from collections import Counter, namedtuple
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

# transformers is imported lazily inside functions where it is slow and not always needed; these are cheap.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

QWEN_SPECIAL_IDS = {  # the real Qwen2.5 ids; the random presets use them too
    "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
    "<|vision_end|>": 151653, "<|image_pad|>": 151655, "<|video_pad|>": 151656,
}
CACHE_DIR = os.environ.get("FGRL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "fgrl"))

# ----- 1. Distributed setup -----
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

def init_distributed() -> Dist:
    """The process group from torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE); `python script.py`: one process."""
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    use_cuda = torch.cuda.is_available()
    dev = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    elif world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    if world > 1 and not dist.is_initialized():
        # on GPU nccl for CUDA tensors and gloo for the small CPU ones (token counts, metrics); a generous timeout,
        # as mining or evaluation on one rank can take long while the others wait at a barrier
        dist.init_process_group("cpu:gloo,cuda:nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=60))
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

def stream_position(position: int, n: int, seed: int) -> int:
    """Index at `position` of an endless stream of epochs over n items, each epoch a seeded permutation, so a resumed
    run continues exactly where it stopped: positions 0..5 of 3 items with seed 0 give [0, 2, 1, 1, 2, 0]."""
    epoch, offset = divmod(position, n)
    order = list(range(n))
    random.Random(seed * 7919 + epoch).shuffle(order)
    return order[offset]

# ----- 2. Model and processor loading -----
# The Qwen2.5-VL chat format (an image item is `<|vision_start|><|image_pad|><|vision_end|>`), for the locally built
# tokenizers; real checkpoints bring their own template.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

@functools.cache
def processor_class():
    from transformers import Qwen2_5_VLProcessor

    class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
        """Qwen2.5-VL processor without the video half. The stock class builds a video processor, which imports
        torchvision; ProcessorMixin derives the list of sub-processors from this __init__ signature, so leaving
        `video_processor` out of it gives an image-only processor that saves and loads like the stock one."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                             chat_template=chat_template, **kwargs)
    return ImageOnlyQwen2_5_VLProcessor

def make_image_processor(min_pixels: int, max_pixels: int):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)

def set_pixel_budget(processor, min_pixels: int | None, max_pixels: int | None):
    """Set the pixel budget in the image processor's `size` dict (transformers 5.x deprecates the call arguments)."""
    for edge, pixels in (("shortest_edge", min_pixels), ("longest_edge", max_pixels)):
        if pixels is not None:
            processor.image_processor.size[edge] = pixels

DTYPES = ("auto", "bf16-mixed", "bf16", "fp32")  # the --dtype choices (see precision_for)

def resolve_dtype(name: str | torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype weights are loaded in ('bf16-mixed' loads fp32 weights: bf16 is the compute, see precision_for)."""
    if isinstance(name, torch.dtype):
        return name
    auto = torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"auto": auto, "bf16-mixed": torch.float32, "bf16": torch.bfloat16, "fp32": torch.float32}[name]

SMALL_VISION = dict(depth=4, hidden_size=256, intermediate_size=1024, num_heads=4, fullatt_block_indexes=[3])
RANDOM_PRESETS = {  # random weights in the published shapes of Qwen2.5-VL-3B / 7B (README) and, for bench.py on
    # CPU, 30m (small vocabulary: time goes to the layers, as a big model's) and 35m (real vocabulary: scoring memory)
    "qwen2.5-vl-30m-random": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                                  num_key_value_heads=2, vocab_size=None, tie=False, vision=SMALL_VISION),
    "qwen2.5-vl-35m-random": dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=151936, tie=True, vision=SMALL_VISION),
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
    eighth = head_dim // 2 // 8  # M-RoPE splits head_dim/2 rotary frequencies as (temporal, height, width) 2:3:3
    mrope_section = [2 * eighth, 3 * eighth, 3 * eighth]  # [16, 24, 24] for head_dim 128
    assert sum(mrope_section) == head_dim // 2, "head_dim must be a multiple of 16 for the M-RoPE split"
    vision = vision or dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                            fullatt_block_indexes=[7, 15, 23, 31])
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                         num_key_value_heads=num_key_value_heads, max_position_embeddings=max_positions,
                         rms_norm_eps=1e-6, tie_word_embeddings=tie, pad_token_id=special_ids["<|endoftext|>"],
                         rope_parameters={"rope_type": "default", "rope_theta": rope_theta,
                                          "mrope_section": mrope_section},
                         bos_token_id=special_ids["<|endoftext|>"], eos_token_id=special_ids["<|im_end|>"]),
        vision_config=dict(in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           out_hidden_size=hidden_size, tokens_per_second=2, **vision),
        image_token_id=special_ids["<|image_pad|>"], video_token_id=special_ids["<|video_pad|>"],
        vision_start_token_id=special_ids["<|vision_start|>"], vision_end_token_id=special_ids["<|vision_end|>"],
        tie_word_embeddings=tie)

def train_tokenizer(corpus: Iterable[str], vocab_size: int, special_ids: dict[str, int] | None = None):
    """A byte-level BPE with Qwen's pre-tokenizer regex trained in-process (a fraction of a second), a Qwen2Tokenizer
    with the chat template and the special tokens at `special_ids` (the real ids) or, by default, after the BPE ones."""
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

def tiny_pointer() -> str:
    """The file naming this checkout's stand-in, written by tiny.py: one per checkout, so checkouts never swap them."""
    import hashlib
    checkout = hashlib.sha1(os.path.dirname(os.path.abspath(__file__)).encode()).hexdigest()[:10]
    return os.path.join(CACHE_DIR, f"tiny-{checkout}.txt")

def tiny_dir() -> str:
    """The `tiny` stand-in's folder, named in tiny_pointer(). Shared code never imports tiny.py (it sits on top of the
    methods, whose prompts it learns): when nothing is built yet, `python tiny.py` runs once."""
    def built() -> str | None:
        try:
            with open(tiny_pointer()) as f:
                path = os.path.join(CACHE_DIR, f.read().strip())
        except OSError:
            return None
        return path if os.path.exists(os.path.join(path, "config.json")) else None
    if built() is None:
        import subprocess
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.py")
        print0(f"--model tiny: no stand-in built for this checkout yet; running `python {script}` once")
        subprocess.run([sys.executable, script])
    if built() is None:
        raise SystemExit(f"--model tiny: `python tiny.py` left no built stand-in named in {tiny_pointer()}; run it "
                         f"by hand to see why")
    return built()

def load_model(name: str, *, device: torch.device, dtype: str | torch.dtype = "auto", attn: str = "sdpa",
               min_pixels: int | None = None, max_pixels: int | None = None, flag: str = "--model"):
    """(model, processor) for a hub id or local directory of any Qwen2.5-VL checkpoint, `tiny` or a random preset,
    read or built straight onto `device` in `dtype` (no host copy, no copy in another dtype; under FSDP2 one whole copy
    per GPU until wrap_model shards it). On the meta device: the shapes only, for the memory estimate at start."""
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration
    torch_dtype = resolve_dtype(dtype, device)
    if attn == "flash_attention_2":
        try:
            import flash_attn  # noqa: F401  (imported, not only found: a broken build stops here)
        except ImportError:
            raise SystemExit("--attn flash_attention_2 asked for, but the flash-attn package is not installed "
                             "or does not import (pip install flash-attn); use --attn sdpa") from None
    if name in RANDOM_PRESETS:  # for speed and memory measurements only: random weights (outputs are noise) and a small
        # tokenizer, its special tokens at the real ids where the preset has the real vocabulary size
        spec = RANDOM_PRESETS[name]
        tok, special = train_tokenizer(["a photo of a bird <think> </think> <answer> </answer>"] * 4, 300,
                                       QWEN_SPECIAL_IDS if spec["vocab_size"] else None)
        vocab_size = spec["vocab_size"] or len(tok)  # the 30m preset: the small tokenizer's
        cfg = qwen_vl_config(**{**spec, "vocab_size": vocab_size}, special_ids=special)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
            torch.manual_seed(0)  # the same weights at every load: a KL reference loaded alike is the policy's twin
            model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, dtype=torch_dtype, attn_implementation=attn)
        image_processor = make_image_processor(min_pixels or 3136, max_pixels or 401408)
        return model, processor_class()(image_processor=image_processor, tokenizer=tok, chat_template=CHAT_TEMPLATE)
    path = tiny_dir() if name == "tiny" else name
    expected = "a local Qwen2.5-VL checkpoint directory (config.json, model*.safetensors, tokenizer, processor files)"
    if not os.path.exists(path) and (path.startswith((".", "/")) or path.strip("/").count("/") > 1):  # not a hub id
        raise SystemExit(f"{flag} {name}: no such directory. Expected {expected}, a hub id, 'tiny', or one of "
                         f"{sorted(RANDOM_PRESETS)}")
    if os.path.isdir(path):
        cfg_path = os.path.join(path, "config.json")
        if not os.path.exists(cfg_path):
            raise SystemExit(f"{flag} {path}: config.json is missing; expected {expected}")
        with open(cfg_path) as f:
            model_type = json.load(f).get("model_type")
        if model_type != "qwen2_5_vl":
            final = os.path.join(path, "final")  # a run directory: its exported model is in final/
            hint = f"; {path} looks like a run directory: use {final}" if os.path.exists(f"{final}/config.json") else ""
            raise SystemExit(f"{flag} {path}: config.json says model_type={model_type!r}; this project trains "
                             f"Qwen2.5-VL checkpoints (model_type 'qwen2_5_vl'){hint}")
    try:
        if device.type == "meta":
            with device:
                model = Qwen2_5_VLForConditionalGeneration._from_config(AutoConfig.from_pretrained(path),
                                                                        dtype=torch_dtype)
        else:  # the weights read tensor by tensor from the (memory-mapped) safetensors onto the device (accelerate)
            model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
                path, dtype=torch_dtype, attn_implementation=attn, device_map={"": device})
        proc = processor_class().from_pretrained(path)  # (AutoProcessor would give a bare tokenizer for this class)
        set_pixel_budget(proc, min_pixels, max_pixels)
    except OSError as e:  # no weights in the folder, an unknown hub id, no network for a hub id, ...
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise SystemExit(f"{flag} {name}: cannot load a Qwen2.5-VL checkpoint from it ({first}). Expected {expected}, "
                         f"or a hub id that is downloaded already or reachable") from None
    return model.to(device), proc

def special_token_ids(processor) -> dict[str, int]:
    return {name: processor.tokenizer.convert_tokens_to_ids(name) for name in QWEN_SPECIAL_IDS}

# ----- robust image access: a missing, empty, truncated or non-image file never crashes a run -----
IMAGE_PROBLEMS: Counter = Counter()  # reason -> count, for this process (load-time checks and failed opens)

class UnreadableImage(OSError):
    """An image file that cannot be decoded (raised by open_image; try_open_image returns None instead)."""

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

# ----- 3. Prompt encoding and the rollout sampler -----
@dataclasses.dataclass
class EncodedPrompt:
    """One chat prompt with one image, tokenised and processed, without padding."""
    input_ids: torch.Tensor  # [L] prompt token ids (image pads already expanded to the image's token count)
    mm_token_type_ids: torch.Tensor  # [L] 0 text, 1 image
    pixel_values: torch.Tensor  # [n_patches, 3*2*14*14] this image's patch rows
    image_grid_thw: torch.Tensor  # [1, 3]
    position_ids: torch.Tensor | None = None  # [3, L] M-RoPE positions, filled in by collate_prompts()

    def __len__(self):
        return self.input_ids.shape[0]

def chat_messages(text: str, system: str | None = None) -> list[dict]:
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}
    return [{"role": "system", "content": system}, user] if system else [user]

def encode_prompt(processor, image: Image.Image | str, text: str, system: str | None = None) -> EncodedPrompt:
    """The chat template for [image, text], processed (image pad expanded, patch rows made) and unpadded."""
    if isinstance(image, str):
        image = open_image(image)
    prompt = processor.apply_chat_template(chat_messages(text, system), tokenize=False, add_generation_prompt=True)
    out = processor(text=[prompt], images=[image], return_tensors="pt")
    return EncodedPrompt(out["input_ids"][0], out["mm_token_type_ids"][0].long(), out["pixel_values"],
                         out["image_grid_thw"])

def unwrap(model):
    """The Hugging Face model inside a DDP wrapper (FSDP2 modules are the model itself)."""
    return model.module if hasattr(model, "module") else model

def collate_prompts(model, prompts: Sequence[EncodedPrompt], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Left-pad a list of prompts into one batch, with 3-row positions and each image's patch rows concatenated
    in row order (a prompt listed twice contributes its block twice: that is how rows share an image)."""
    def left_pad(rows: list[torch.Tensor], value: int = 0) -> torch.Tensor:  # [n, width]
        return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=value, padding_side="left")
    for p in prompts:
        if p.position_ids is None:  # once per prompt, from the config only (so sharded models too)
            pos, _ = unwrap(model).model.get_rope_index(p.input_ids[None], mm_token_type_ids=p.mm_token_type_ids[None],
                                                        image_grid_thw=p.image_grid_thw)
            p.position_ids = pos[:, 0]  # [3, L] temporal / height / width rows; text tokens share one value
    batch = dict(input_ids=left_pad([p.input_ids for p in prompts], pad_id),
                 attention_mask=left_pad([torch.ones(len(p), dtype=torch.long) for p in prompts]),
                 mm_token_type_ids=left_pad([p.mm_token_type_ids for p in prompts]),
                 position_ids=torch.stack([left_pad([p.position_ids[axis] for p in prompts]) for axis in range(3)]),
                 pixel_values=torch.cat([p.pixel_values for p in prompts]),
                 image_grid_thw=torch.cat([p.image_grid_thw for p in prompts]))
    return {name: tensor.to(device) for name, tensor in batch.items()}

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

SORTED_NUCLEUS_VOCAB = 8192  # up to this vocabulary size the nucleus comes from a sort, above it from a bisection

def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Mask the logits outside the smallest set of tokens with cumulative probability >= top_p (the nucleus)."""
    # Trick "nucleus without a sort or a sync": a token is kept when the tokens more likely than it hold less than
    # top_p of the mass, i.e. when its probability passes a per-row threshold, found exactly by bisection over the
    # float32 bit patterns of the probabilities (for non-negative floats their integer order is their numeric order)
    # in 31 halvings of [0, max prob]. The same tokens as a sort, except that tokens tied at the threshold are all kept.
    probs = logits.float().softmax(-1)  # [B, V]
    if probs.shape[-1] <= SORTED_NUCLEUS_VOCAB:  # a small vocabulary: one sort is cheaper than 31 passes
        ranked, order = probs.sort(-1, descending=True)  # [B, V]
        keep = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, ranked.cumsum(-1) - ranked < top_p)
        return logits.masked_fill(~keep, float("-inf"))
    lo = torch.zeros(probs.shape[0], dtype=torch.long, device=probs.device)  # [B] mass above it >= top_p
    hi = probs.amax(-1).view(torch.int32).long()  # [B] mass above it < top_p (none above the largest)
    for _ in range(31):
        mid = (lo + hi) // 2  # [B]
        above = torch.where(probs > mid.int().view(torch.float32)[:, None], probs, 0.0).sum(-1)  # [B]
        lo, hi = torch.where(above < top_p, lo, mid), torch.where(above < top_p, mid, hi)
    return logits.masked_fill(probs <= lo.int().view(torch.float32)[:, None], float("-inf"))

def autocast_dtype(device_type: str) -> torch.dtype | None:
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None

def repeat_rows(buffer: torch.Tensor, prefill: torch.Tensor, repeats: int) -> torch.Tensor:
    """Write prompt p's prefill [P, H, L, D] into rows p*G .. p*G+G-1 of `buffer` [P*G, H, capacity, D]; the buffer."""
    P, H, L, D = prefill.shape
    buffer.view(P, repeats, H, -1, D)[:, :, :, :L] = prefill[:, None]
    return buffer

def expand_cache(cache, repeats: int, capacity: int):
    """Share each prompt's prefill KV with its G samples: row p of the prefill cache becomes rows p*G .. p*G+G-1,
    in preallocated buffers of `capacity` positions (Qwen2.5-VL's layers are all full-attention DynamicLayers)."""
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        """Trick "preallocated KV cache": the stock layer appends with torch.cat, a copy of the whole cache every
        decode step; this one writes each new position in place into buffers with room for the whole rollout and
        hands attention a view of the filled part (the same tensors). Each prompt's prefill rows are held G times."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, repeats: int, capacity: int):
            super().__init__()
            P, H, L, D = keys.shape  # [P, kv_heads, prompt width, head_dim]
            # under autocast RoPE hands over fp32 keys (and the stock layer then keeps fp32 values too), while
            # attention casts both to the autocast dtype anyway: store them in that dtype, half the memory
            dtype = autocast_dtype(keys.device.type)
            self.buffers = [repeat_rows(t.new_empty((P * repeats, H, capacity, D), dtype=dtype or t.dtype), t, repeats)
                            for t in (keys, values)]
            self.dtype, self.device, self.is_initialized = self.buffers[0].dtype, keys.device, True
            self.keys, self.values = (buf[:, :, :L] for buf in self.buffers)

        def update(self, key_states, value_states, *args, **kwargs):
            start = self.keys.shape[-2]  # the filled part so far
            end = start + key_states.shape[-2]
            self.buffers[0][:, :, start:end] = key_states
            self.buffers[1][:, :, start:end] = value_states
            self.keys, self.values = (buf[:, :, :end] for buf in self.buffers)
            return self.keys, self.values
    cache.layers = [PreallocatedLayer(layer.keys, layer.values, repeats, capacity) for layer in cache.layers]
    return cache

def static_cache(model, cache, repeats: int, capacity: int):
    """A StaticCache of `capacity` positions for P*G rows holding each prompt's prefill KV G times (fixed shapes and
    addresses, as a compiled decode needs); under autocast it stores and receives the autocast dtype."""
    from transformers import StaticCache
    static = StaticCache(config=unwrap(model).config, max_cache_len=capacity)
    dtype = autocast_dtype(cache.layers[0].keys.device.type)
    for layer, prefill in zip(static.layers, cache.layers):
        P, H, L, D = prefill.keys.shape
        layer.lazy_initialization(*(t.new_empty((P * repeats, H, 0, D), dtype=dtype or t.dtype)
                                    for t in (prefill.keys, prefill.values)))
        repeat_rows(layer.keys, prefill.keys, repeats)
        repeat_rows(layer.values, prefill.values, repeats)
        layer.cumulative_length.fill_(L)
        if dtype is not None:  # (the stock update bound as a default, before the swap)
            layer.update = lambda k, v, *a, _up=layer.update, _dt=dtype, **kw: _up(k.to(_dt), v.to(_dt), *a, **kw)
    return static

@functools.cache
def cache_keyword() -> str:
    """The forward's name for the KV cache: `cache` from transformers 5.2x (where `past_key_values` warns on every
    call and goes away in 5.40), `past_key_values` before (5.17 on the GPU machine)."""
    import inspect
    from transformers import Qwen2_5_VLForConditionalGeneration
    params = inspect.signature(Qwen2_5_VLForConditionalGeneration.forward).parameters
    return "cache" if "cache" in params else "past_key_values"

def returned_cache(out):
    """The KV cache a forward returned (`out.cache`, or `out.past_key_values` before transformers 5.2x)."""
    return out["cache"] if "cache" in out.keys() else out.past_key_values

def compiled_decode(model):
    """Trick "compiled decode step" (opt-in): the one-token forward under torch.compile ("reduce-overhead" = CUDA graph
    on GPU), once per model; capacity is rounded up to 256 so new shapes (recompilations) are rare."""
    if "_fgrl_compiled_decode" not in model.__dict__:
        kw = cache_keyword()

        def decode_step(input_ids, attention_mask, position_ids, cache):  # [B, 1] ids -> [B, V] logits
            return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, **{kw: cache}).logits[:, -1]
        mode = "reduce-overhead" if next(model.parameters()).device.type == "cuda" else None
        model.__dict__["_fgrl_compiled_decode"] = torch.compile(decode_step, mode=mode, dynamic=False)
    return model.__dict__["_fgrl_compiled_decode"]

FINISHED_CHECK_EVERY = 8  # decode steps between two looks at "has every row ended?" (each look is a host sync)

class NonFiniteLogits(RuntimeError):
    """The policy produced NaN / inf logits while sampling (`rows` [B] bool: where, by decode step `step`)."""

    def __init__(self, rows: torch.Tensor, step: int):
        bad = rows.nonzero().flatten().tolist()
        super().__init__(f"sampling stopped: the model's logits are NaN or inf (rows {bad[:8]}"
                         f"{' ...' if len(bad) > 8 else ''} of {rows.numel()}, by decode step {step}). The weights or "
                         f"the inputs hold NaN / inf: a diverged update (lower the learning rate, resume from the last "
                         f"checkpoint), a corrupt checkpoint, or fp16 overflow (use bf16 or fp32, --dtype)")

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
           temperature: float = 1.0, top_p: float = 1.0, repetition_penalty: float = 1.0,
           generator: torch.Generator | None = None, prompt_batch: int | None = None,
           compile_decode: bool = False, row_seeds: Sequence[int] | None = None) -> Rollout:
    """Draw `group_size` completions per prompt (temperature 0 = greedy) with the unfiltered, temperature-scaled
    log-prob of each draw; each prompt prefilled once for its G rows, `prompt_batch` prompts at a time. `row_seeds` (one
    per row): each row its own random stream, the same draws on 1 or 8 ranks. NaN / inf logits raise NonFiniteLogits."""
    model = unwrap(model)
    if prompt_batch and len(prompts) > prompt_batch:
        parts = [sample(model, processor, prompts[i:i + prompt_batch], group_size=group_size,
                        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                        repetition_penalty=repetition_penalty, generator=generator, compile_decode=compile_decode,
                        row_seeds=row_seeds[i * group_size:(i + prompt_batch) * group_size] if row_seeds else None)
                 for i in range(0, len(prompts), prompt_batch)]
        return concat_rollouts(parts, pad_id=special_token_ids(processor)["<|endoftext|>"])
    ids = special_token_ids(processor)
    pad_id, eos_ids = ids["<|endoftext|>"], [ids["<|im_end|>"], ids["<|endoftext|>"]]
    device = next(model.parameters()).device
    suppress = torch.tensor([ids["<|image_pad|>"], ids["<|video_pad|>"]], device=device)  # never sampled
    if generator is not None and generator.device.type != device.type:  # multinomial wants one on the device
        generator = torch.Generator(device=device).manual_seed(int(torch.randint(2 ** 62, (1,), generator=generator)))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    batch = collate_prompts(model, prompts, pad_id, device)
    G = group_size
    Lp = batch["input_ids"].shape[1]
    if compile_decode and (problem := compile_decode_problem(model)):
        raise ValueError(f"sample(compile_decode=True): {problem}")
    out = model(**batch, use_cache=True, logits_to_keep=1)  # prefill: one row per prompt, the last position's logits
    if compile_decode:
        capacity = -(-(Lp + max_new_tokens) // 256) * 256  # rounded up: fewer distinct shapes, fewer compilations
        cache = static_cache(model, returned_cache(out), G, capacity)
    else:
        capacity = Lp + max_new_tokens
        cache = expand_cache(returned_cache(out), G, capacity)  # [P, ...] -> [P*G, ...] KV shared, not recomputed
    logits = out.logits[:, -1].float().repeat_interleave(G, 0)  # [B, V], B = P*G
    del out  # the prefill's outputs (its cache now lives on in `cache`)
    B, V = logits.shape
    attention_mask = torch.ones((B, capacity), dtype=torch.long, device=device)  # [B, capacity] preallocated
    attention_mask[:, :Lp] = batch["attention_mask"].repeat_interleave(G, 0)
    # the uncompiled step's mask for sdpa / eager, already 4-D (a one-token query sees every key but the prompt's
    # padding): used as it is, where a 2-D one costs a look from the host per step (transformers checks it for pads)
    step_mask, impl = attention_mask, model.config.text_config._attn_implementation or "sdpa"
    if impl.endswith(("sdpa", "eager")):  # (flash-attention 2 takes the 2-D mask)
        step_mask = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, capacity]
        if impl.endswith("eager"):  # eager adds the mask to its scores
            step_mask = torch.where(step_mask, 0.0, torch.finfo(model.dtype).min).to(model.dtype)
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
        scores.index_fill_(1, suppress, float("-inf"))
        if seen is not None:
            scores = torch.where(seen, torch.where(scores > 0, scores / repetition_penalty,
                                                   scores * repetition_penalty), scores)
        if temperature > 0 and top_p < 1.0:
            scores = top_p_filter(scores, top_p)
        if temperature <= 0:
            nxt = scores.argmax(-1)  # [B]
        elif uniforms is None:
            nxt = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)  # [B]
        else:  # inverse CDF: the first token whose cumulative probability exceeds the row's uniform
            cdf = scores.double().softmax(-1).cumsum(-1)  # [B, V]
            target = (uniforms[:, step:step + 1] * cdf[:, -1:]).contiguous()  # [B, 1]
            nxt = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=V - 1)  # [B]
        nxt = torch.where(finished, torch.full_like(nxt, pad_id), nxt)
        tokens[:, step] = nxt
        token_logps[:, step] = logits.gather(1, nxt[:, None]).squeeze(1) * inv_t - lse  # log softmax(logits/T)[nxt]
        if seen is not None:
            seen[torch.arange(B, device=device), nxt] = True
        finished |= torch.isin(nxt, eos)
        steps, last = step + 1, step == max_new_tokens - 1
        if last or step % FINISHED_CHECK_EVERY == FINISHED_CHECK_EVERY - 1:  # one host sync every few steps
            if bool(nonfinite.any()):
                raise NonFiniteLogits(nonfinite, step)
            if last or bool(finished.all()):
                break
        pos = (next_pos + step).view(1, B, 1).expand(3, B, 1)  # [3, B, 1]
        if compile_decode:  # fixed shapes: the whole mask every step, causality hides the unwritten positions
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs are no longer used
            logits = compiled_decode(model)(nxt[:, None], attention_mask, pos.contiguous(), cache).float().clone()
        else:  # the mask is a view of the preallocated one (tokens after an EOS are masked later, when scored)
            logits = model(input_ids=nxt[:, None], attention_mask=step_mask[..., :Lp + step + 1], position_ids=pos,
                           use_cache=True, **{cache_keyword(): cache}).logits[:, -1].float()
    sync()
    stats = {"prefill_s": t1 - t0, "decode_s": time.perf_counter() - t1, "decode_steps": steps}
    mask = completion_mask_from(tokens[:, :steps], eos_ids)
    width = int(mask.sum(1).max()) if steps else 0  # the longest completion: steps past the last EOS wrote padding
    tokens, mask = tokens[:, :width], mask[:, :width]  # past a row's first EOS its tokens are padding already
    token_logps = token_logps[:, :width] * mask
    texts = processor.tokenizer.batch_decode(tokens.tolist(), skip_special_tokens=True)
    return Rollout(list(prompts), G, tokens.cpu(), mask.cpu(), token_logps.cpu(), (~finished).cpu(), texts, stats)

def completion_mask_from(tokens: torch.Tensor, eos_ids: Sequence[int]) -> torch.Tensor:
    """1 for every token up to and including the first EOS, 0 after it: [5, 7, EOS, 0, 0] -> [1, 1, 1, 0, 0]."""
    is_eos = torch.isin(tokens, torch.tensor(list(eos_ids), device=tokens.device)).long()  # [B, T]
    return (is_eos.cumsum(1) - is_eos == 0).long()  # no EOS strictly before the position

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

# ----- 4. Per-token log-probs of completions -----
def scoring_inputs(model, prompts: Sequence[EncodedPrompt], completion_ids: torch.Tensor,
                   completion_mask: torch.Tensor, pad_id: int, device) -> dict[str, torch.Tensor]:
    """Model inputs for rows of [left-padded prompt | right-padded completion], the completion's positions following."""
    batch = collate_prompts(model, prompts, pad_id, device)
    comp = completion_ids.to(device)  # [B, T]
    start = batch["position_ids"].amax(dim=(0, 2)) + 1  # [B] first completion position
    comp_pos = (start[:, None] + torch.arange(comp.shape[1], device=device)).expand(3, -1, -1)  # [3, B, T]
    return dict(batch, input_ids=torch.cat([batch["input_ids"], comp], 1),  # the images as collated
                attention_mask=torch.cat([batch["attention_mask"], completion_mask.to(device).long()], 1),
                mm_token_type_ids=torch.cat([batch["mm_token_type_ids"], torch.zeros_like(comp)], 1),
                position_ids=torch.cat([batch["position_ids"], comp_pos], 2))

# vocabulary scores (rows x positions x vocab) computed at once when scoring: 256 MiB in fp32; at Qwen's 151,936-token
# vocabulary and 16 rows, chunks of 27 positions; at the stand-in's, every position at once
LOGITS_BUDGET = 2 ** 26

def _head_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                   temperature: float) -> torch.Tensor:
    """log softmax(linear(hidden) / T)[target] for one chunk of positions; the projection is made here, so the
    temperature divides its fp32 copy in place."""
    scores = F.linear(hidden, weight, bias).float()  # [b, t, V]
    if temperature != 1.0:
        scores.div_(temperature)
    return scores.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - scores.logsumexp(-1)  # [b, t]

@contextlib.contextmanager
def lm_head_returns_logprobs(model, targets: torch.Tensor, temperature: float, predictors: torch.Tensor | None = None):
    """Trick "no full logits": for one forward, `lm_head` returns the log-probs of `targets` [B, T] from the states
    predicting them (the first T of the last T+1, or `predictors` [B, T] among the flattened kept states), in chunks
    within LOGITS_BUDGET recomputed in the backward. Swapped inside the model's forward, where DDP / FSDP2 expect it."""
    head = unwrap(model).lm_head

    def scores(hidden):  # [rows, kept, hidden] -> [B, T]; the last kept position predicts past the completion
        hidden = hidden[:, :-1] if predictors is None else hidden.reshape(-1, hidden.shape[-1])[predictors]
        chunk = max(1, LOGITS_BUDGET // (hidden.shape[0] * head.weight.shape[0]))
        grad = torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad)
        checkpointed = functools.partial(torch.utils.checkpoint.checkpoint, _head_logprobs, use_reentrant=False)
        run = checkpointed if grad else _head_logprobs  # with grad, a chunk's scores are recomputed in the backward
        return torch.cat([run(hidden[:, s:s + chunk], head.weight, head.bias, targets[:, s:s + chunk], temperature)
                          for s in range(0, hidden.shape[1], chunk)], 1)  # [B, T]
    head.forward = scores
    try:
        yield
    finally:
        del head.forward

@contextlib.contextmanager
def images_encoded_once(model):
    """Trick "encode each image once": for one forward, the vision tower encodes each run of identical consecutive
    images (a group's G copies) once and repeats its output rows; the gradient of a repeat sums over its users, as
    with G encodings. Swaps `visual.forward` only, inside the model's forward (hooks unaffected)."""
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
    """[B, T] completion log-probs (with grad if enabled) via the wrapped model; only the last T+1 positions scored."""
    targets = completion_ids.to(inputs["input_ids"].device)  # [B, T]
    with lm_head_returns_logprobs(model, targets, temperature), images_encoded_once(model):
        return model(**inputs, use_cache=False, logits_to_keep=targets.shape[1] + 1).logits  # log-probs, not logits

def prompt_runs(prompts: Sequence[EncodedPrompt]) -> list[tuple[int, int]]:
    """[start, end) of each run of consecutive rows that share one prompt (the same EncodedPrompt object: the G rows
    of a group, as the sampler lays them out): [p, p, p, q, q] -> [(0, 3), (3, 5)]."""
    starts = [i for i, p in enumerate(prompts) if i == 0 or p is not prompts[i - 1]]
    return list(zip(starts, starts[1:] + [len(prompts)]))

# The packed rows of the shared-prefix forward (`shared_prefix_inputs`), handed to every decoder layer in place of an
# attention mask: each packed row is a prompt left-padded to `prompt_width` slots, `prompt_lengths[r]` of them real,
# then `groups` completion slots of `width` tokens each.
PrefixLayout = namedtuple("PrefixLayout", "prompt_width groups width prompt_lengths")

def prefix_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                     base: str = "sdpa", **kwargs):
    """The text model's attention (installed by shared_prefix_supported); other calls go to `base`. Given a
    PrefixLayout, per packed row: the prompt's real tokens causally, then each completion over the prompt and its
    own earlier tokens (a lower-right causal bias, no mask tensor). query [R, H, S, D], key / value [R, Hkv, S, D]."""
    if not isinstance(attention_mask, PrefixLayout):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import eager_attention_forward
        attend = eager_attention_forward if base == "eager" else ALL_ATTENTION_FUNCTIONS[base]
        return attend(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    from torch.nn.attention.bias import causal_lower_right
    layout, dtype = attention_mask, autocast_dtype(query.device.type)
    if dtype is not None:  # what autocast does to a plain SDPA call
        query, key, value = (x.to(dtype) for x in (query, key, value))
    key, value = (x.repeat_interleave(query.shape[1] // key.shape[1], 1) for x in (key, value))  # [R, H, S, D]
    L, g, T = layout.prompt_width, layout.groups, layout.width
    packed = []
    for r, n in enumerate(layout.prompt_lengths):
        q, k, v = query[r:r + 1], key[r:r + 1], value[r:r + 1]  # [1, H, S, D] (4-D, as the fused kernels want)
        real = slice(L - n, L)  # the prompt's real tokens, after its left padding
        prompt = F.scaled_dot_product_attention(q[:, :, real], k[:, :, real], v[:, :, real], dropout_p=dropout,
                                                is_causal=True, scale=scaling)  # [1, H, n, D]
        qc, kc, vc = (x[0, :, L:].unflatten(1, (g, T)).transpose(0, 1) for x in (q, k, v))  # [g, H, T, D]
        kc, vc = (torch.cat([x[:, :, real].expand(g, -1, -1, -1), c], 2) for x, c in ((k, kc), (v, vc)))  # [g,H,n+T,D]
        done = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=causal_lower_right(T, n + T), dropout_p=dropout,
                                              scale=scaling)  # [g, H, T, D]
        packed.append(torch.cat([q.new_zeros((1, q.shape[1], L - n, q.shape[3])), prompt,
                                 done.transpose(0, 1).flatten(1, 2)[None]], 2))  # [1, H, S, D]; padding slots 0
    return torch.cat(packed).transpose(1, 2), None  # [R, S, H, D], as transformers' attention functions return

def shared_prefix_supported(model) -> bool:
    """Whether the shared-prefix forward can run (text attention sdpa or eager, not flash-attention 2), installing
    `prefix_attention` as the text model's attention on the way (once; other calls still reach sdpa / eager)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface
    config = unwrap(model).config.text_config
    name = config._attn_implementation or "sdpa"
    base = name.removeprefix("prefix+")
    if base not in ("sdpa", "eager"):
        return False
    if name == base:
        AttentionInterface.register("prefix+" + base, functools.partial(prefix_attention, base=base))
        AttentionMaskInterface.register("prefix+" + base, ALL_MASK_ATTENTION_FUNCTIONS[base])
        config._attn_implementation = "prefix+" + base
    return True

def shared_prefix_inputs(model, prompts: Sequence[EncodedPrompt], completion_ids: torch.Tensor, pad_id: int,
                         device) -> tuple[dict, torch.Tensor, int]:
    """Trick "shared prefix": rows sharing a prompt become one sequence [left-padded prompt | completion 1 | ... |
    completion g] (T slots each; PrefixLayout: each sees the prompt and itself only, at its own positions), so prompt
    and image run once. Returns (inputs, predictors [B, T] among the kept last 1 + g*T of each sequence, keep)."""
    runs = prompt_runs(prompts)
    comp = torch.nn.utils.rnn.pad_sequence([completion_ids[start:end] for start, end in runs], batch_first=True,
                                           padding_value=pad_id)  # [R, g, T]
    g_max, T = comp.shape[1:]
    inputs = scoring_inputs(model, [prompts[start] for start, _ in runs], comp.flatten(1),
                            torch.ones_like(comp.flatten(1)), pad_id, device)  # [R, S], S = L + g*T
    L = inputs["input_ids"].shape[1] - g_max * T
    # each completion at the positions it would have alone; the layout is handed to each decoder layer as it is
    inputs["position_ids"][:, :, L:] = inputs["position_ids"][:, :, L:L + T].repeat(1, 1, g_max)  # [3, R, S]
    inputs["attention_mask"] = {"full_attention": PrefixLayout(L, g_max, T, [len(prompts[s]) for s, _ in runs])}
    # kept positions are L-1 .. S-1; completion k's token t is predicted at L-1 (t = 0) or L + k*T + t - 1
    keep = g_max * T + 1
    within = torch.arange(g_max * T, device=device).view(g_max, T)  # [g, T] index into kept
    within[:, 0] = 0
    predictors = torch.cat([r * keep + within[:end - start] for r, (start, end) in enumerate(runs)])  # [B, T]
    return inputs, predictors, keep

def score_completions(model, prompts: Sequence[EncodedPrompt], completion_ids: torch.Tensor,
                      completion_mask: torch.Tensor, pad_id: int, temperature: float = 1.0,
                      shared_prefix: bool = True) -> torch.Tensor:
    """[B, T] log-probs of one micro-batch's completions (with grad if enabled): the one scoring path of every
    method's old / reference log-probs and update. Past a row's mask: garbage, mask it."""
    device = next(unwrap(model).parameters()).device
    if shared_prefix and shared_prefix_supported(model) and any(e - s > 1 for s, e in prompt_runs(prompts)):
        inputs, predictors, keep = shared_prefix_inputs(model, prompts, completion_ids, pad_id, device)
        with lm_head_returns_logprobs(model, completion_ids.to(device), temperature, predictors):
            return model(**inputs, use_cache=False, logits_to_keep=keep).logits  # [B, T] log-probs, not logits
    return forward_logprobs(model, scoring_inputs(model, prompts, completion_ids, completion_mask, pad_id, device),
                            completion_ids, temperature)

@torch.no_grad()
def completion_logprobs(model, processor, prompts: Sequence[EncodedPrompt], completion_ids: torch.Tensor,
                        completion_mask: torch.Tensor, *, temperature: float = 1.0, micro_batch: int = 8,
                        shared_prefix: bool = True) -> torch.Tensor:
    """[B, T] log-probs (no grad), row b scored with prompts[b], `micro_batch` rows at a time, each micro-batch cut to
    its longest completion as the updates cut it; 0 past the completion mask. One copy to the host, at the end."""
    pad_id = special_token_ids(processor)["<|endoftext|>"]
    out = torch.zeros(completion_mask.shape, device=next(unwrap(model).parameters()).device)  # [B, T]
    for s in range(0, len(prompts), micro_batch):
        rows = slice(s, s + micro_batch)
        width = max(1, int(completion_mask[rows].sum(1).max()))  # the mask is on the host: no sync
        out[rows, :width] = score_completions(model, prompts[rows], completion_ids[rows, :width],
                                              completion_mask[rows, :width], pad_id, temperature, shared_prefix)
    return out.cpu() * completion_mask

def sft_loss(model, processor, prompts: Sequence[EncodedPrompt], targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over target tokens only (the prompt is context, never a label). Targets are right-padded
    and scored like completions: position for position the same inputs the RL losses see."""
    pad_id = special_token_ids(processor)["<|endoftext|>"]
    ids = torch.nn.utils.rnn.pad_sequence(list(targets), batch_first=True, padding_value=pad_id)  # [B, T]
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(t) for t in targets], batch_first=True)  # [B, T]
    logp = score_completions(model, prompts, ids, mask, pad_id, shared_prefix=False)  # [B, T]
    mask = mask.to(logp.device)
    return -(logp * mask).sum() / mask.sum()

# ----- 5. Precision, DDP / FSDP2 -----
@dataclasses.dataclass(frozen=True)
class Precision:
    """Weights dtype, compute dtype, and how compute is reached: 'weights' (the same), 'fsdp' (FSDP2 mixed precision)
    or 'autocast' (DDP, or one process)."""
    weights: torch.dtype
    compute: torch.dtype
    via: str
    device_type: str

    def context(self):
        """Enter around every forward (sampling, log-probs, the loss, evaluation): autocast where it is the way."""
        return torch.autocast(self.device_type, dtype=self.compute, enabled=self.via == "autocast")

    @property
    def fsdp_param_dtype(self) -> torch.dtype | None:  # wrap_model's param_dtype
        return self.compute if self.via == "fsdp" else None

    def __str__(self):
        how = {"weights": "", "fsdp": " through FSDP2 mixed precision", "autocast": " through autocast"}[self.via]
        return f"weights {self.weights}, compute {self.compute}{how}".replace("torch.", "")

def precision_for(dtype: str, ranks: Dist, parallel: str, trained_weights: bool = True) -> Precision:
    """The run's Precision from --dtype. auto: fp32 on CPU; on GPU bf16 compute over fp32 master weights where AdamW
    updates (lr 1e-6 steps round away in bf16), else bf16 weights. bf16-mixed: fp32 weights, bf16 compute; bf16 / fp32:
    both. Mixed compute is FSDP2's policy when sharded, else autocast; fp32 matmuls on GPU use TF32."""
    if dtype not in DTYPES:
        raise SystemExit(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    on_gpu = ranks.device.type == "cuda"
    if on_gpu:
        torch.set_float32_matmul_precision("high")  # TF32 for whatever still runs in fp32
    if dtype == "bf16-mixed" or (dtype == "auto" and on_gpu and trained_weights):
        weights, compute = torch.float32, torch.bfloat16
    else:
        weights = compute = resolve_dtype(dtype, ranks.device)
    via = "weights" if weights == compute else ("fsdp" if parallel == "fsdp" and ranks.distributed else "autocast")
    return Precision(weights, compute, via, ranks.device.type)

def enable_activation_checkpointing(model):
    """Recompute each layer in the backward (non-reentrant): `activation_checkpointing_enable` from transformers 5.2x,
    `gradient_checkpointing_enable` before it (now a deprecated alias that warns)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

def wrap_model(model, ranks: Dist, parallel: str = "ddp", activation_checkpointing: bool = False,
               param_dtype: torch.dtype | None = None):
    """DDP, or FSDP2 (`fully_shard` per vision block, per decoder layer, then the root); one process: the model."""
    if activation_checkpointing:
        enable_activation_checkpointing(model)
        model.config.use_cache = False
    if not ranks.distributed:
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(model, device_ids=[ranks.local_rank] if ranks.device.type == "cuda" else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mixed = param_dtype not in (None, torch.float32)
    kw = {"mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)} if mixed else {}
    for module in [*model.model.visual.blocks, *model.model.language_model.layers, model]:
        fully_shard(module, **kw)
    return model

def grad_sync(model, on: bool):
    """Gradient accumulation: skip DDP's all-reduce on all but the last micro-batch of an optimizer step. Under
    FSDP2 every micro-batch reduce-scatters (the gradients stay sharded; skipping would hold them whole)."""
    if hasattr(model, "require_backward_grad_sync"):
        model.require_backward_grad_sync = on

def clip_gradients(params, max_norm: float) -> float:
    """Global grad-norm clipping (0: off, still measured) of DDP tensors or FSDP2 shards; the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

def _fsdp_modules(model):
    from torch.distributed.fsdp import FSDPModule
    return [m for m in model.modules() if isinstance(m, FSDPModule)]

@contextlib.contextmanager
def gathered_params(model, warmup_inputs: dict | None = None):
    """For sampling on an FSDP2 model: all-gather the parameters once for the whole phase (not per decode step), then
    reshard; a no-op otherwise. FSDP2 needs one forward through the root first: `warmup_inputs`, when given."""
    mods = _fsdp_modules(model)  # none: every step below does nothing
    if mods and warmup_inputs is not None:
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
    pad_id = special_token_ids(processor)["<|endoftext|>"]
    return collate_prompts(model, [prompt], pad_id, next(model.parameters()).device) if _fsdp_modules(model) else None

def progress_bar(show: bool, **kw):
    """A tqdm bar where `show` (rank 0), None elsewhere: `bar = progress_bar(ranks.is_main, total=steps, desc="grpo")`.
    Drawn on a terminal only: in a redirected log, redraws (and a nested bar's cursor moves) would bury the lines."""
    if not show:
        return None
    from tqdm import tqdm
    return tqdm(dynamic_ncols=True, disable=not sys.stderr.isatty(), **kw)

def eval_dir(out: str, step: int, *parts: str) -> str:
    """Where an in-run evaluation at `step` writes: <out>/eval/step_0000030[/group]; the same in every method."""
    return os.path.join(out, "eval", f"step_{step:07d}", *parts)

# ----- 6. JSONL inputs and the resumable per-rank map -----
def read_jsonl(path: str, required: Sequence[str] = (), skip_cut_tail: bool = False) -> list[dict]:
    """The records of a JSONL file; a line not JSON or without the `required` keys stops with the file and line (blank
    lines counted, as an editor does), except that `skip_cut_tail` skips a last line cut by a kill (its item redone)."""
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

def remove_rank_parts(folder: str, stem: str):
    """Delete resumable_map's per-rank files <folder>/<stem>.part<rank>.jsonl (once their records are merged)."""
    for path in glob.glob(os.path.join(folder, f"{stem}.part*.jsonl")):
        os.remove(path)

def resumable_map(folder: str, stem: str, keys: Sequence[str], work, ranks: Dist, desc: str) -> dict[str, Any]:
    """{key: result} for every key, on every rank: each rank runs `work(its keys)` over its share of the keys no
    earlier run finished, `work` yielding (key, result) as each is done, appended to <folder>/<stem>.part<rank>.jsonl
    at once, so a killed run (on any number of ranks) redoes only the unfinished. The caller removes the parts."""
    def finished() -> dict[str, Any]:  # every rank's part, a last line cut by a kill skipped
        return {rec["key"]: rec["value"] for path in sorted(glob.glob(os.path.join(folder, f"{stem}.part*.jsonl")))
                for rec in read_jsonl(path, skip_cut_tail=True)}
    done = finished()
    barrier()  # every rank has read the parts (and agrees on what is left) before any rank appends to them
    todo = [key for key in keys if key not in done]
    print0(f"{desc}: {len(todo)} to do, {len(done)} done by an earlier run, over {ranks.world_size} rank(s)")
    mine = os.path.join(folder, f"{stem}.part{ranks.rank}.jsonl")
    repair_jsonl_tail(mine)  # a line cut by a kill is dropped before appending
    with open(mine, "a") as f:
        for key, value in work(todo[ranks.rank::ranks.world_size]):  # every rank enters work, even with nothing to do
            f.write(json.dumps({"key": key, "value": value}) + "\n")
            f.flush()
    barrier()
    done.update(finished())
    return done
