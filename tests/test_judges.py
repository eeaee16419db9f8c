"""Answer parsing and the judges: a parser / format-check truth table, the rules judge against a truth table across
datasets, label metrics by hand, the append-only cache, and the hf: judge on a tiny locally built causal LM."""
import json

import pytest
import torch

import common
import data
import judges
import fake_datasets as fake


# ----- parsing and the format check -----

PARSE_TABLE = [  # completion, parse_answer, format_ok
    ("<think>round, red</think><answer>red circle</answer>", "red circle", True),
    ("<think>a</think>\n\n<answer> Yellow Warbler </answer>\n", "Yellow Warbler", True),
    ("  <think>\nmulti\nline\n</think> <answer>B</answer>  ", "B", True),
    ("<think></think><answer></answer>", None, True),  # blank: no answer (SpeciaRL's code: a parse failure)
    ("<answer>B</answer>", "B", False),  # no reasoning block
    ("<think>a</think><answer>B</answer> and more", "B", False),  # text after the answer
    ("preamble <think>a</think><answer>B</answer>", "B", False),  # text before the reasoning
    ("<think>a<answer>B</answer>", "B", False),  # reasoning never closed
    ("<think>a</think><answer>x</answer><answer>y</answer>", "x", True),  # the FIRST answer, as all three papers' code
    ("<answer>x</think><answer>y</answer>", "x</think><answer>y", False),  # from the first opening tag, as released
    ("<think>a</think><answer>x <answer>y</answer>", "x <answer>y", True),  # the papers' format regex allows it
    ("<think>a</think><answer>unclosed", None, False),
    ("no tags at all", None, False),
    ("<THINK>a</THINK><ANSWER>b</ANSWER>", None, False),  # tags are case-sensitive
]


@pytest.mark.parametrize("completion,answer,ok", PARSE_TABLE)
def test_parse_and_format(completion, answer, ok):
    assert judges.parse_answer(completion) == answer
    assert judges.format_ok(completion) is ok


def test_names_keep_their_letters():
    """One comparison key for names everywhere (accents kept, a possessive 's and hyphens folded), and the text a
    verifier reads, as SpeciaRL's verifier prepares it (letters of any script, digits and dashes kept)."""
    assert judges.normalize("Cr\u00e8me Br\u00fbl\u00e9e") == "cr\u00e8me br\u00fbl\u00e9e"
    assert judges.normalize("Cre\u0300me bru\u0302le\u0301e") == "cr\u00e8me br\u00fbl\u00e9e"  # NFC first
    assert judges.normalize("Anna's hummingbird") == judges.normalize("Anna Hummingbird") == "anna hummingbird"
    assert judges.normalize("Black-footed Albatross") == judges.normalize("black footed albatross")
    assert judges.normalize("Colt's Foot") == "colt foot"
    assert judges.normalize("Pe\u00f1a Blanca \u00c9t\u00e9") == "pe\u00f1a blanca \u00e9t\u00e9"
    assert judges.verifier_text("Cr\u00e8me Br\u00fbl\u00e9e!") == "cr\u00e8me br\u00fbl\u00e9e"
    assert judges.verifier_text("Anna's Hummingbird") == "anna s hummingbird"
    assert judges.verifier_text("Black-footed  Albatross.") == "black-footed albatross"
    assert judges.verifier_text("???") == "" and judges.verifier_text("\u2014") == "\u2014"


def test_punctuation_answers_are_judged_not_missing():
    """'???' and a dash are answers (the verifier judges them, as SpeciaRL's code does); only a blank or missing
    <answer> is no answer."""
    texts = ["<think>a</think><answer>???</answer>", "<think>a</think><answer>\u2014</answer>",
             "<think>a</think><answer>  </answer>", "<think>a</think>"]
    assert [judges.parse_answer(text) for text in texts] == ["???", "\u2014", None, None]


def test_normalize_abstain_hedge():
    assert judges.normalize("Chuck-will's-Widow") == "chuck will widow"
    assert judges.normalize("  Brewer\u2019s   Blackbird ") == "brewer blackbird"  # typographic apostrophe
    assert judges.normalize("F-16A/B") == "f 16a b"
    for text in ["None", "", None, "unknown", "I don't know", "I do not know.", "Not sure", "cannot tell",
                 "I cannot identify this bird", "Unable to determine", "N/A"]:
        assert judges.is_abstain(text), text
    for text in ["Yellow Warbler", "unknown warbler", "nonesuch", "Canada Warbler"]:
        assert not judges.is_abstain(text), text
    for text in ["robin or cardinal", "either a gull or a tern", "707-320 vs 727-200", "A and/or B"]:
        assert judges.is_hedge(text), text
    for text in ["Orange crowned Warbler", "Oriole", "Northern Flicker", "Red-eyed Vireo"]:
        assert not judges.is_hedge(text), text


# ----- the rules judge -----

@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("judge_data")
    out = {"toy": data.load_dataset("toy", "test"),
           "cub": data.load_dataset("cub", "test", root=fake.make_cub(str(root / "cub"))),
           "pets": data.load_dataset("pets", "test", root=fake.make_pets(str(root / "pets"))),
           "aircraft": data.load_dataset("aircraft", "test", root=fake.make_aircraft(str(root / "aircraft")))}
    out["flowers"] = data.load_dataset("flowers", "test", root=fake.make_flowers(str(root / "flowers"), coop=True))
    with open(root / "garden.json", "w") as f:  # a user's own data with a hierarchy and synonyms
        json.dump({"classes": ["rose", "desert-rose", "yellow rose"], "kind": "flower",
                   "hierarchy": {"yellow rose": ["rose", "flower"]},  # a class below another class
                   "synonyms": {"desert-rose": ["Adenium obesum"]}, "test": []}, f)
    out["json"] = data.read_json(str(root / "garden.json"), "test")
    try:
        out["cars"] = data.load_dataset("cars", "test", root=fake.make_cars(str(root / "cars")))
    except ImportError:  # scipy missing: the cars rows are skipped
        pass
    return out


RULES_TABLE = [  # dataset, ground truth, prediction, label
    ("toy", "red striped circle", "Red striped circle", "specific"),
    ("toy", "red striped circle", "striped red circle", "specific"),  # synonym
    ("toy", "red striped circle", "a red-striped circle", "specific"),  # article, hyphen
    ("toy", "red striped circle", "red striped circle shape", "specific"),  # trailing kind word
    ("toy", "red striped circle", "circle", "less_specific"),  # family
    ("toy", "red striped circle", "circles", "less_specific"),  # plural
    ("toy", "red striped circle", "shape", "generic"),  # the kind
    ("toy", "red striped circle", "object", "generic"),
    ("toy", "red striped circle", "None", "abstain"),
    ("toy", "red striped circle", "???", "wrong"),  # malformed: judged, as the released verifier does
    ("toy", "red striped circle", "\u2014", "wrong"),
    ("toy", "red striped circle", "I don't know", "abstain"),
    ("toy", "red striped circle", "red striped circle or blue plain square", "wrong"),  # hedge, truth included
    ("toy", "red striped circle", "either a circle or a square", "wrong"),
    ("toy", "red striped circle", "red striped circle, blue plain square", "wrong"),  # a list
    ("toy", "red striped circle", "blue plain square", "wrong"),  # another class
    ("toy", "red striped circle", "square", "wrong"),  # another family
    ("toy", "red striped circle", "red striped", "wrong"),  # a fragment
    ("toy", "red striped circle", "big red striped circle", "more_specific"),  # the truth, qualified
    ("toy", "circle", "red striped circle", "more_specific"),  # a known descendant
    ("cub", "Black footed Albatross", "Black-footed Albatross", "specific"),
    ("cub", "Black footed Albatross", "blackfooted albatross", "specific"),
    ("cub", "Gray Catbird", "Grey Catbird", "specific"),  # spelling synonym
    ("cub", "Yellow Warbler", "Yellow Warblers", "specific"),
    ("cub", "Black footed Albatross", "albatross", "less_specific"),  # group noun
    ("cub", "Yellow Warbler", "the warbler", "less_specific"),
    ("cub", "Black footed Albatross", "bird", "generic"),
    ("cub", "Black footed Albatross", "animal", "generic"),
    ("cub", "Black footed Albatross", "Laysan Albatross", "wrong"),
    ("cub", "Black footed Albatross", "Laysan albatross or black-footed albatross", "wrong"),
    ("cub", "Black footed Albatross", "laysan albatross black footed albatross", "wrong"),  # two classes, no comma
    ("cub", "Chuck will Widow", "widow", "wrong"),  # not a group noun
    ("cub", "Yellow Warbler", "adult male yellow warbler", "more_specific"),
    ("cub", "Yellow Warbler", "Kirtland's Warbler", "wrong"),
    ("cub", "Anna Hummingbird", "Anna's Hummingbird", "specific"),  # CUB's names drop the possessive
    ("cub", "Anna Hummingbird", "an adult male Anna\u2019s hummingbird", "more_specific"),
    ("cub", "Yellow Warbler", "unknown", "abstain"),
    ("pets", "beagle", "dog", "generic"),  # species: much broader
    ("pets", "abyssinian", "cat", "generic"),
    ("pets", "abyssinian", "dog", "wrong"),
    ("pets", "american bulldog", "American Bulldog dog", "specific"),
    ("aircraft", "A340-600", "Airbus A340-600", "specific"),  # maker + variant
    ("aircraft", "A340-600", "A340", "less_specific"),  # family
    ("aircraft", "A340-600", "Airbus A340", "less_specific"),  # family, with its maker
    ("aircraft", "A340-600", "Airbus", "less_specific"),  # manufacturer
    ("aircraft", "707-320", "Boeing 707", "less_specific"),
    ("aircraft", "A340-600", "airplane", "generic"),
    ("aircraft", "A340-600", "A340-500", "wrong"),
    ("aircraft", "A340-600", "707-320", "wrong"),
    ("flowers", "barbeton daisy", "Barberton daisy", "specific"),  # the dataset's misspelling
    ("flowers", "rose", "rose flower", "specific"),
    ("flowers", "rose", "flowering plant", "generic"),
    ("flowers", "sword lily", "lily", "wrong"),  # no hierarchy below 'flower' for Flowers102
    ("json", "rose", "desert rose", "wrong"),  # another class that contains the truth's name
    ("json", "desert-rose", "pink desert rose", "more_specific"),
    ("json", "desert-rose", "Adenium obesum", "specific"),  # a scientific-name synonym
    ("json", "yellow rose", "rose", "less_specific"),  # its parent, itself a class
    ("json", "rose", "yellow rose", "more_specific"),  # a known descendant
    ("json", "yellow rose", "Flower", "generic"),
    ("cars", "2012 Audi TTS Coupe", "Audi TTS Coupe 2012", "specific"),  # devkit word order
    ("cars", "2012 Audi TTS Coupe", "Audi TTS Coupe", "less_specific"),  # no year
    ("cars", "2012 Audi TTS Coupe", "Audi", "less_specific"),  # make
    ("cars", "2012 Audi TTS Coupe", "car", "generic"),
    ("cars", "2012 Audi TTS Coupe", "Audi TT", "wrong"),  # another model line
    ("cars", "2012 Audi TTS Coupe", "2011 Audi TT Hatchback", "wrong"),
]


def test_rules_truth_table(datasets):
    judge_of = {name: judges.get_judge("rules", ds) for name, ds in datasets.items()}
    rows = [r for r in RULES_TABLE if r[0] in judge_of]
    assert len(rows) >= 25
    for name, truth, pred, label in rows:
        got = judge_of[name].judge([(truth, pred)])[0]
        assert got == label, f"{name}: ({truth!r}, {pred!r}) -> {got}, expected {label}"
    assert judges.JUDGE_LABELS == ["wrong", "abstain", "generic", "less_specific", "specific", "more_specific"]


def test_label_metrics_by_hand():
    labels = ["specific", "more_specific", "less_specific", "generic", "abstain", "wrong", "wrong", "specific"]
    m = judges.label_metrics(labels)
    # correct at any level: 2 specific + 1 more + 1 less + 1 generic = 5 of 8; specific-or-more among them: 3 of 5
    assert m["n"] == 8 and m["correctness"] == 5 / 8 and m["specificity"] == 3 / 5 and m["accuracy"] == 3 / 8
    assert m["hm"] == pytest.approx(2 * (3 / 5) * (5 / 8) / (3 / 5 + 5 / 8))
    assert m["count/wrong"] == 2 and m["share/abstain"] == 1 / 8 and m["specificity_of_all"] == 3 / 8
    assert sum(m[f"share/{lab}"] for lab in judges.JUDGE_LABELS) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        judges.label_metrics(["right"])


def test_cache_persisted_and_robust(tmp_path, datasets):
    path = str(tmp_path / "judge_cache.jsonl")
    judge = judges.get_judge("rules", datasets["toy"], cache_path=path)
    pairs = [("red striped circle", "circle"), ("red striped circle", "Circle!"), ("blue plain square", "None")]
    assert judge.judge(pairs) == ["less_specific", "less_specific", "abstain"]
    assert judge.judged == 2 and judge.hits == 0  # "circle" and "Circle!": one pair, judged once, no cache hit
    assert judge.judge(pairs[:2]) == ["less_specific"] * 2 and judge.judged == 2 and judge.hits == 2
    assert judge.stats()["judge/cache_hit_rate"] == 0.5  # 2 lookups answered by the cache, 2 pairs judged
    with open(path) as f:
        assert len(f.readlines()) == 2
    with open(path, "a") as f:  # a kill mid-write leaves a cut line; and a record of another judge is ignored
        f.write(json.dumps({"judge": "hf:other", "truth": "blue plain square", "prediction": "square",
                            "label": "specific"}) + "\n" + '{"judge": "rules-v2:toy", "tru')
    again = judges.get_judge("rules", datasets["toy"], cache_path=path)
    assert again.bad_cache_lines == 1 and len(again.cache) == 2
    assert again.judge([("blue plain square", "square")]) == ["less_specific"] and again.judged == 1
    with open(path) as f:
        lines = f.read().splitlines()
    assert json.loads(lines[-1])["prediction"] == "square"  # the new record starts on its own line
    third = judges.get_judge("rules", datasets["toy"], cache_path=path)
    assert len(third.cache) == 3 and third.bad_cache_lines == 1


def test_get_judge_rejects_unknown(datasets):
    with pytest.raises(SystemExit, match="expected 'rules', 'hf:<causal LM directory or hub id>' or 'openai:"):
        judges.get_judge("gpt", datasets["toy"])


# ----- the hf: judge on a tiny causal LM built here -----

@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    corpus = [judges.JUDGE_PROMPT.format(truth="yellow warbler", answer="warbler")] * 4
    corpus += [" ".join(judges.JUDGE_LABEL_TEXT.values())] * 4 + ["red striped circle blue plain square none"] * 4
    tok, _ = common.train_tokenizer(corpus, 420)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                      pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"))
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # a spread of logits so the labels' scores differ clearly
        model.lm_head.weight.normal_(0, 2.0)
    path = str(tmp_path_factory.mktemp("judge_lm"))
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def reference_scores(judge, truth, answer):
    """Each label's log-likelihood after the prompt, one unpadded forward per label (no batching tricks)."""
    prompt = judge.prompt_ids(truth, answer)
    scores = []
    for ids in judge.label_ids:
        x = torch.tensor([prompt + ids])
        with torch.no_grad():
            logp = judge.model(input_ids=x).logits[0, :-1].float().log_softmax(-1)
        scores.append(sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(ids)))
    return scores


def test_hf_judge_scores_labels_and_caches(tiny_lm, datasets, tmp_path):
    path = str(tmp_path / "cache.jsonl")
    judge = judges.get_judge(f"hf:{tiny_lm}", datasets["toy"], cache_path=path)
    pairs = [("red striped circle", "red striped circle"), ("red striped circle", "blue plain square"),
             ("blue plain square", "Shape")]
    labels = judge.judge(pairs)
    assert all(lab in judges.JUDGE_LABELS for lab in labels) and judge.judged == 3
    assert judge.name == f"hf:{tiny_lm}"
    # the batched, left-padded scores equal one-by-one scoring, and the label is their argmax
    batched = judge.label_scores([(judges.verifier_text(t), judges.verifier_text(a)) for t, a in pairs])
    assert batched.shape == (3, 6)
    for i, (t, a) in enumerate(pairs[:2]):
        ref = reference_scores(judge, judges.verifier_text(t), judges.verifier_text(a))
        assert torch.allclose(batched[i], torch.tensor(ref), atol=1e-3), (batched[i], ref)
        assert labels[i] == judges.JUDGE_LABELS[max(range(6), key=lambda k: ref[k])]
    assert len({tuple(batched[i].tolist()) for i in range(3)}) == 3  # scores depend on the pair
    # cached: the same pairs (also differently written) never reach the model again, in this process or the next
    calls = []
    judge.label_scores = lambda batch: calls.append(batch)
    assert judge.judge([("Red striped Circle", "Blue plain square!")] + pairs) == [labels[1]] + labels
    assert calls == [] and judge.hits == 4
    fresh = judges.get_judge(f"hf:{tiny_lm}", datasets["toy"], cache_path=path)
    assert fresh.judge(pairs) == labels and fresh.judged == 0 and fresh.model is None  # never even loaded
    with pytest.raises(SystemExit, match="no config.json"):
        judges.get_judge(f"hf:{tmp_path}", datasets["toy"]).judge([("a", "b")])
    fresh._load()
    fresh.pad_id = fresh.model.get_input_embeddings().num_embeddings  # an eos / pad id outside the vocabulary
    with pytest.raises(SystemExit, match=f"--judge hf:{tiny_lm}: token id {fresh.pad_id} .* lies outside the "
                                         f"model's {fresh.pad_id} embeddings; expected a tokenizer that matches"):
        fresh.label_scores([("red striped circle", "red striped circle")])


def test_rules_judge_on_a_hand_built_dataset():
    # a Dataset built by hand with a plain dict keyed by display names (not a NameMap) still works
    ds = data.Dataset("mine", [], ["Yellow Warbler", "Song Sparrow"], "bird",
                        hierarchy={"Yellow Warbler": ["warbler", "bird"], "Song Sparrow": ["sparrow", "bird"]})
    judge = judges.get_judge("rules", ds)
    pairs = [("Yellow Warbler", "warbler"), ("Yellow Warbler", "Bird"), ("Yellow Warbler", "sparrow"),
             ("warbler", "yellow warbler")]
    assert judge.judge(pairs) == ["less_specific", "generic", "wrong", "more_specific"]
