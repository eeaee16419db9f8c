"""Loading, saving and the tiny stand-in."""
import copy
import importlib.util
import json
import os

import torch

import common
import lifecycle
import judges
import speciarl
import tiny


def _inputs(proc, images, text="Classify the image."):
    prompts = [common.encode_prompt(proc, im, text) for im in images]
    return prompts


def test_save_reload_identical(tiny, toy_test, tmp_path):
    model, proc = tiny
    path = str(tmp_path / "export")
    lifecycle.export_hf(model, proc, path, dtype="fp32")  # an exact copy
    assert os.path.exists(os.path.join(path, "model.safetensors"))
    model2, proc2 = common.load_model(path, device=torch.device("cpu"))
    model2.eval()
    img = toy_test.examples[0].image
    a, b = common.encode_prompt(proc, img, "Classify the image."), common.encode_prompt(proc2, img, "Classify the image.")
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.pixel_values, b.pixel_values)
    assert type(proc2).__name__ == type(proc).__name__ == "ImageOnlyQwen2_5_VLProcessor"
    with torch.no_grad():
        inp = common.collate_prompts(model, [a], 0, "cpu")
        la = model(**inp).logits
        lb = model2(**inp).logits
    assert torch.equal(la, lb)


def test_random_preset_shapes():
    """The random presets carry the published shapes (counted without building the 7B: config only)."""
    from transformers import Qwen2_5_VLConfig
    for name, n_layers, hidden in [("qwen2.5-vl-3b-random", 36, 2048), ("qwen2.5-vl-7b-random", 28, 3584)]:
        spec = dict(common.RANDOM_PRESETS[name])
        cfg = common.qwen_vl_config(special_ids=common.QWEN_SPECIAL_IDS, **spec)
        assert isinstance(cfg, Qwen2_5_VLConfig)
        assert cfg.text_config.num_hidden_layers == n_layers and cfg.text_config.hidden_size == hidden
        assert cfg.text_config.rope_parameters["mrope_section"] == [16, 24, 24]
        assert cfg.vision_config.depth == 32 and cfg.vision_config.out_hidden_size == hidden
        assert cfg.image_token_id == 151655


def test_tiny_starts_in_format(tiny, toy_test):
    """The stand-in speaks the answer format greedily but is far from perfect: room for RL."""
    model, proc = tiny
    exs = toy_test.examples[::6]
    prompts = [common.encode_prompt(proc, e.image, speciarl.PROMPT) for e in exs]
    ro = common.sample(model, proc, prompts, group_size=1, max_new_tokens=40, temperature=0)
    fmt = sum(judges.format_ok(t) for t in ro.texts) / len(exs)
    acc = sum(judges.normalize(judges.parse_answer(t) or "") == judges.normalize(e.class_name)
              for t, e in zip(ro.texts, exs)) / len(exs)
    assert fmt >= 0.9
    assert 0.1 <= acc <= 0.85


def test_bad_model_paths(tmp_path):
    import pytest
    with pytest.raises(SystemExit, match="no such directory"):
        common.load_model(str(tmp_path / "nope"), device=torch.device("cpu"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(SystemExit, match="qwen2_5_vl"):
        common.load_model(str(tmp_path / "other"), device=torch.device("cpu"))


HUB_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
             "chat_template.json", "preprocessor_config.json"}


def test_export_is_a_hub_checkpoint_that_plain_transformers_reads(tiny, toy_test, tmp_path):
    """final/ has a hub checkpoint's file set (no processor_config.json naming this project's class), bf16 weights by
    default, and loads with plain transformers classes: the image processor and tokenizer encode a prompt exactly as
    the run's processor, and the model gives the log-probs of the run's model in bf16. (AutoProcessor itself also
    builds a video processor, which needs torchvision: checked where torchvision is installed.)"""
    from safetensors.torch import load_file
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration
    model, proc = tiny
    path = str(tmp_path / "final")
    lifecycle.export_hf(model, proc, path)
    assert set(os.listdir(path)) == HUB_FILES
    umask = os.umask(0)
    os.umask(umask)
    assert {os.stat(os.path.join(path, n)).st_mode & 0o777 for n in HUB_FILES} == {0o666 & ~umask}  # no 0600 file
    with open(os.path.join(path, "preprocessor_config.json")) as f:
        pre = json.load(f)
    size = proc.image_processor.size
    assert pre["processor_class"] == "Qwen2_5_VLProcessor"
    assert (pre["min_pixels"], pre["max_pixels"]) == (size["shortest_edge"], size["longest_edge"])
    with open(os.path.join(path, "tokenizer_config.json")) as f:
        assert json.load(f)["processor_class"] == "Qwen2_5_VLProcessor"
    weights = load_file(os.path.join(path, "model.safetensors"))
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.bfloat16}
    assert len(weights) == len(model.state_dict())

    image_processor, tokenizer = AutoImageProcessor.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    assert tokenizer.chat_template == proc.chat_template
    plain = common.processor_class()(image_processor=image_processor, tokenizer=tokenizer,
                                     chat_template=tokenizer.chat_template)
    image = toy_test.examples[0].image
    a, b = (common.encode_prompt(p, image, speciarl.PROMPT) for p in (proc, plain))
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.pixel_values, b.pixel_values)
    if importlib.util.find_spec("torchvision") is not None:
        assert type(AutoProcessor.from_pretrained(path)).__name__ == "Qwen2_5_VLProcessor"

    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(path).eval()
    assert reloaded.dtype == torch.bfloat16
    run_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    ro = common.sample(model, proc, [a], group_size=2, max_new_tokens=12, generator=torch.Generator().manual_seed(0))
    lp = [common.completion_logprobs(m, proc, ro.row_prompts, ro.completion_ids, ro.completion_mask)
          for m in (reloaded, run_bf16, model)]
    ours = run_bf16.state_dict()
    assert all(torch.equal(v, ours[k]) for k, v in reloaded.state_dict().items())  # the run's weights, in bf16
    assert (lp[0] - lp[1]).abs().max() < 0.01  # bf16 arithmetic; buffers such as RoPE's are rebuilt on load (3e-4)
    assert (lp[0] - lp[2]).abs().max() < 0.1  # bf16 weights against the fp32 run (0.016 measured)


def test_tied_embeddings_are_exported_once(tiny, toy_test, tmp_path):
    """Qwen2.5-VL-3B ties lm_head to the input embedding: the export stores the tensor once and reloads tied."""
    from safetensors.torch import load_file
    from transformers import Qwen2_5_VLForConditionalGeneration
    model, proc = tiny
    config = copy.deepcopy(model.config)
    config.tie_word_embeddings = config.text_config.tie_word_embeddings = True
    torch.manual_seed(0)
    tied = Qwen2_5_VLForConditionalGeneration(config).eval()
    assert tied.lm_head.weight is tied.model.language_model.embed_tokens.weight
    path = str(tmp_path / "tied")
    lifecycle.export_hf(tied, proc, path, dtype="fp32")
    names = set(load_file(os.path.join(path, "model.safetensors")))
    assert "lm_head.weight" not in names and len(names) == len(tied.state_dict()) - 1
    again, _ = common.load_model(path, device=torch.device("cpu"))
    assert again.lm_head.weight.data_ptr() == again.model.language_model.embed_tokens.weight.data_ptr()
    inputs = common.collate_prompts(tied, [common.encode_prompt(proc, toy_test.examples[0].image, "Classify.")], 0,
                                    "cpu")
    with torch.no_grad():
        assert torch.equal(tied(**inputs).logits, again.eval()(**inputs).logits)


PROBE = '''
import json, resource, sys
import torch
import common
common.RANDOM_PRESETS["probe"] = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                                     num_attention_heads=8, num_key_value_heads=2, vocab_size=151936, tie=False,
                                     vision=dict(depth=2, hidden_size=256, intermediate_size=512, num_heads=4,
                                                 fullatt_block_indexes=[1]))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model, _ = common.load_model("probe", device=torch.device("cpu"), dtype="bf16")
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_growth": (after - before) * 1024, "dtype": str(next(model.parameters()).dtype),
                  "bytes": sum(p.numel() * p.element_size() for p in model.parameters())}))
'''


def test_loading_holds_one_copy_in_the_target_dtype(monkeypatch):
    """A random preset is built where it will live, in its dtype: the process's peak memory grows by about one bf16
    copy (it grew by an fp32 copy plus the bf16 one, 2.5x, when built in fp32 and cast). A checkpoint directory is
    read with a device_map, i.e. tensor by tensor onto the device, not into host memory first."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-2000:]
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert probe["dtype"] == "torch.bfloat16"
    assert probe["peak_growth"] < 1.5 * probe["bytes"], probe  # 1.00x measured; 2.47x when built fp32 then cast
    from transformers import Qwen2_5_VLForConditionalGeneration
    seen = {}
    real = Qwen2_5_VLForConditionalGeneration.from_pretrained.__func__

    def spy(cls, path, **kwargs):
        seen.update(kwargs)
        return real(cls, path, **kwargs)
    monkeypatch.setattr(Qwen2_5_VLForConditionalGeneration, "from_pretrained", classmethod(spy))
    model, _ = common.load_model(tiny.tiny_model_dir(), device=torch.device("cpu"), dtype="bf16")
    assert seen["device_map"] == {"": torch.device("cpu")} and seen["dtype"] == torch.bfloat16
    assert next(model.parameters()).dtype == torch.bfloat16


def test_a_random_preset_loads_the_same_weights_every_time():
    """The KL reference of dive_k / speciarl is loaded like the policy: on a random preset both must be the same
    weights, so that the KL starts at 0; the caller's random stream is left as it was."""
    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    a, _ = common.load_model("qwen2.5-vl-30m-random", device=torch.device("cpu"), dtype="fp32")
    after = torch.rand(1)
    b, _ = common.load_model("qwen2.5-vl-30m-random", device=torch.device("cpu"), dtype="fp32")
    assert torch.equal(before, after)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
