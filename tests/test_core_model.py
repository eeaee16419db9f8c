"""Loading, saving and the tiny stand-in."""
import os

import torch

import common


def _inputs(proc, images, text="Classify the image."):
    prompts = [common.encode_prompt(proc, im, text) for im in images]
    return prompts


def test_save_reload_identical(tiny, toy_test, tmp_path):
    model, proc = tiny
    path = str(tmp_path / "export")
    common.export_hf(model, proc, path)
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
    prompts = [common.encode_prompt(proc, e.image, common.SPECIARL_PROMPT) for e in exs]
    ro = common.sample(model, proc, prompts, group_size=1, max_new_tokens=40, temperature=0)
    fmt = sum(common.format_ok(t) for t in ro.texts) / len(exs)
    acc = sum(common.normalize(common.parse_answer(t) or "") == common.normalize(e.class_name)
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
