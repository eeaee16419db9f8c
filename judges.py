"""
judges.py: what a completion answers and whether it is right.

  * parsing: the first <answer>...</answer> (as the papers' code), name normalisation, the format check, refusals;
  * judges: six verifier labels (SpeciaRL's ladder, wrong < abstain < generic < less_specific < specific <
    more_specific) from `rules` (offline, from the dataset's names and hierarchy), `hf:<model>` (an LLM scoring each
    label) or `openai:<model>` (an LLM behind an OpenAI-compatible server), cached per normalised pair.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import os
import random
import re
import threading
import time
import unicodedata
from collections import Counter
from typing import Callable, Sequence

import torch

import common
from data import Dataset, NameMap, normalize  # noqa: F401 (judges.normalize and judges.NameMap are used elsewhere)

# ----- 1. answer parsing, normalisation, format check -----
FORMAT_RE = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL)
ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)  # the first opening tag, up to the next closing one

def verifier_text(text: str) -> str:
    """What a verifier reads of a name or an answer (SpeciaRL's preparation, the judge cache's key): lowercase,
    letters (any script), digits and dashes kept, anything else a space, spaces collapsed: "Anna's Black-chinned
    Hummingbird?" -> 'anna s black-chinned hummingbird', "???" -> '', 'Crème brûlée' -> 'crème brûlée'."""
    text = unicodedata.normalize("NFC", text)
    text = "".join(ch if ch.isalnum() or ch.isspace() or unicodedata.category(ch) == "Pd" else " " for ch in text)
    return " ".join(text.lower().split())

def parse_answer(completion: str) -> str | None:
    """The text inside the FIRST <answer>...</answer>, stripped, as the three papers' code reads it (`<answer>x</answer>
    <answer>y</answer>` -> 'x'); None without a closed tag or for a blank answer (SpeciaRL's code: a missing one)."""
    found = ANSWER_RE.search(completion)
    return found.group(1).strip() or None if found else None

# Answer-format prefixes DiVE-k's code strips, every occurrence, case-insensitive ("species name: Laysan Albatross"):
# mining strips the dataset's own format (one of the first two), two-step evaluation all four.
DIVEK_PREFIXES = ("species name: ", "make model: ", "species: ", "make and model: ")

def strip_prefixes(answer: str, prefixes: Sequence[str]) -> str:
    text = answer.strip().lower()
    for prefix in prefixes:
        text = text.replace(prefix, "")
    return text

def format_ok(completion: str) -> bool:
    """The whole completion is `<think>...</think> <answer>...</answer>` (whitespace allowed between and around)."""
    return FORMAT_RE.match(completion) is not None

ABSTAIN_ANSWERS = {  # normalised refusals (an empty answer is one too), besides those ABSTAIN_RE finds
    "", "none", "unknown", "no idea", "unsure", "uncertain", "unclear", "undetermined", "n a", "na", "nothing",
    "no answer", "none of the above", "none of these", "unidentified", "unidentifiable", "not identifiable",
    "impossible to tell", "not possible to tell", "abstain", "pass"}
ABSTAIN_RE = re.compile(r"^(i m |i am |i )?(cannot|can t|can not|could not|couldn t|am unable to|unable to|"
                        r"do not know|don t know|have no idea|m not sure|not sure)\b")
HEDGE_RE = re.compile(r"\b(or|either|versus|vs)\b")

def is_abstain(answer: str | None) -> bool:
    """An explicit refusal: empty, 'None', 'unknown', "I don't know", 'cannot tell', "I'm not sure which",
    'Unable to identify the species' ...; not 'unknown warbler'."""
    text = normalize(answer or "")
    return text in ABSTAIN_ANSWERS or ABSTAIN_RE.match(text) is not None

def is_hedge(answer: str | None) -> bool:
    """Several options offered instead of one ('robin or cardinal', 'either a gull or a tern', 'A vs B', 'A and/or
    B'); lists of names without a connective are caught by the rules judge, which knows the class names."""
    return HEDGE_RE.search(normalize(answer or "")) is not None

# Multiple-choice letters, and the format request every method's prompt ends with (what format_ok checks).
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
FORMAT_LINE = ("Write your reasoning inside <think> </think> and your final answer inside <answer> </answer>, in this "
               "form:\n<think> ... </think> <answer> {shape} </answer>\nFollow this format exactly.")

# ----- 2. answer judges -----
JUDGE_LABELS = ["wrong", "abstain", "generic", "less_specific", "specific", "more_specific"]
CORRECT_LABELS = ("generic", "less_specific", "specific", "more_specific")  # correct at some level
SPECIFIC_LABELS = ("specific", "more_specific")  # what 'accuracy' counts
JUDGE_ERROR = "judge_error"  # no usable label (an LLM judge's answer off the ladder): counted, never a silent 'wrong'

def label_metrics(labels: Sequence[str]) -> dict[str, float]:
    """Counts and shares of the six labels and SpeciaRL's metrics: correctness = share correct at any level;
    specificity = share (more) specific among the correct (`specificity_of_all`: of all; the paper's definition is not
    public); hm = their harmonic mean; accuracy = share (more) specific. Judge errors: in judge_errors, in no share."""
    counts = Counter(lab for lab in labels if lab != JUDGE_ERROR)
    n = sum(counts.values())
    if set(counts) - set(JUDGE_LABELS):
        raise ValueError(f"labels outside JUDGE_LABELS: {sorted(set(counts) - set(JUDGE_LABELS))}")
    correct, specific = (sum(counts[lab] for lab in group) for group in (CORRECT_LABELS, SPECIFIC_LABELS))
    correctness, specificity = correct / n if n else 0.0, specific / correct if correct else 0.0
    out = {"n": n, "judge_errors": len(labels) - n, "accuracy": specific / n if n else 0.0, "correctness": correctness,
           "specificity": specificity, "specificity_of_all": specific / n if n else 0.0,
           "hm": 2 * specificity * correctness / (specificity + correctness) if specificity + correctness else 0.0}
    for lab in JUDGE_LABELS:
        out[f"count/{lab}"], out[f"share/{lab}"] = counts[lab], counts[lab] / n if n else 0.0
    return out

def add_judge_flags(group):
    group.add_argument("--judge-max-tokens", type=int, default=0, help="max_tokens of an openai: judge's answer (0 = "
                       "not sent: the server's limit, as the paper's client; a thinking judge needs room)")
    group.add_argument("--judge-thinking", type=int, default=0, choices=[0, 1], help="an openai: judge's "
                       "chat_template_kwargs enable_thinking (paper 0: its Qwen3 verifier does not think)")
    group.add_argument("--max-judge-errors", type=float, default=0.05, help="stop when more than this share of judged "
                       "answers gets no label from the judge (a constrained judge, as the paper's, gives none)")

def judge_error_stop(errors: float, judged: float, limit: float) -> str:
    if judged and errors / judged > limit:
        return (f"{errors:.0f} of {judged:.0f} judged answers got no label from the judge ({errors / judged:.0%}, "
                f"above --max-judge-errors {limit}): check the judge's server and flags (README: servers)")
    return ""

class Judge:
    """A judge sees only normalised strings, as SpeciaRL's verifier, and caches each pair in an append-only JSONL file
    keyed by its `name`, so that a long (or restarted) run judges each distinct pair once. Subclasses implement
    `_judge(pairs of normalised strings) -> labels` (None for a pair it could not label)."""
    writes_as_it_goes = False  # True: _judge persists each label itself as it arrives

    def __init__(self, name: str, cache_path: str | None):
        self.name, self.cache_path, self.cache = name, cache_path, {}  # cache: (truth, prediction) -> label
        # pairs sent to _judge here, lookups answered from the cache, unreadable cache lines, pairs given no label
        self.judged = self.hits = self.bad_cache_lines = self.errors = 0
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
        self.hits += sum(k in self.cache for k in keys)  # a pair repeated within this call is no hit
        if todo:
            labels = self._judge(todo)
            assert len(labels) == len(todo) and all(lab in JUDGE_LABELS or lab is None for lab in labels), labels
            good = [(k, lab) for k, lab in zip(todo, labels) if lab is not None]
            self.cache.update(good)
            if self.cache_path and not self.writes_as_it_goes:
                self._persist(good)
            self.errors += len(todo) - len(good)
        self.judged += len(todo)
        return [self.cache.get(k, JUDGE_ERROR) for k in keys]

    def stats(self) -> dict[str, float]:
        return {"judge/judged": self.judged, "judge/cache_hits": self.hits,
                "judge/cache_hit_rate": self.hits / max(self.judged + self.hits, 1), "judge/errors": self.errors}

    def _persist(self, records: list[tuple[tuple[str, str], str]]):
        os.makedirs(os.path.dirname(os.path.abspath(self.cache_path)), exist_ok=True)
        text = "".join(json.dumps({"judge": self.name, "truth": t, "prediction": p, "label": lab}) + "\n"
                       for (t, p), lab in records)
        # one O_APPEND write per batch: ranks sharing the file never interleave inside a line; a file whose last line
        # was cut short gets a newline first so the new records stay parseable
        fd = os.open(self.cache_path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            os.write(fd, (("\n" if size and os.pread(fd, 1, size - 1) != b"\n" else "") + text).encode("utf-8"))
        finally:
            os.close(fd)

def _canon(text: str) -> str:
    """normalise, drop a lone 's' after a word (what is left of a possessive in the verifier's text: "anna s
    hummingbird"), drop a leading article, 'grey' -> 'gray'."""
    words = [w for i, w in enumerate(normalize(text).split()) if not (w == "s" and i > 0)]
    if len(words) > 1 and words[0] in ("a", "an", "the"):
        words = words[1:]
    return " ".join("gray" if w == "grey" else w for w in words)

class RulesJudge(Judge):
    """Offline, deterministic labels from the dataset's names, the first rule that applies (plurals match too):
      only punctuation -> wrong; a refusal ('none', "I don't know") -> abstain;
      the class name or a synonym (articles, hyphens, grey/gray, a trailing kind word like 'dog' ignored) -> specific;
      a hedge ('X or Y', 'either ...', 'X vs Y') -> wrong;
      an ancestor in dataset.hierarchy: the last one (the kind) or a dataset.generic word ('animal') -> generic,
      a nearer one -> less_specific; a known descendant (its ancestors include the truth) -> more_specific;
      the truth inside a longer answer naming no other class ('adult male yellow warbler') -> more_specific;
      anything else (two class names listed too) -> wrong."""

    def __init__(self, dataset: Dataset, cache_path: str | None = None):
        super().__init__(f"rules-v2:{dataset.name}", cache_path)
        self.hierarchy = NameMap(dataset.hierarchy)  # normalised lookups even for a plain dict keyed by display names
        self.generic_words = {_canon(w) for w in [dataset.kind, *dataset.generic] if w}  # 'generic' for any class
        # words a trailing mention of which adds nothing ('golden retriever dog'): those and every chain's top
        self.kind_words = sorted(self.generic_words | {_canon(c[-1]) for c in self.hierarchy.values() if c},
                                 key=len, reverse=True)
        self.groups: dict[str, set[str]] = {}  # synonyms: canon name -> every canon name of the same thing
        for name, others in dataset.synonyms.items():
            group = {_canon(name), *(_canon(o) for o in others)}
            group = group.union(*(self.groups.get(member, set()) for member in group))  # joins groups met before
            self.groups.update({member: group for member in group})
        self.below: dict[str, set[str]] = {}  # descendants: canon ancestor -> canon names below it
        for name, chain in self.hierarchy.items():
            for a in chain:
                self.below.setdefault(_canon(a), set()).add(_canon(name))
        self.mentionable: dict[str, str] = {}  # every class (and synonym) form -> its canon class name
        for cname in dataset.class_names:
            for form in (f for n in self._names(cname) for f in self._forms(n, compact=False)):
                self.mentionable.setdefault(form, _canon(cname))

    def _names(self, name: str) -> set[str]:
        c = _canon(name)
        return self.groups.get(c, {c})

    def _forms(self, text: str, compact: bool = True) -> set[str]:
        c = _canon(text)
        forms = {c, next((c[: -len(g) - 1] for g in self.kind_words if c.endswith(" " + g)), c)}  # kind word cut
        return forms | {f.replace(" ", "") for f in forms} if compact else forms

    def _matches(self, answer: set[str], name: str) -> bool:
        return any(answer & self._forms(n) for n in self._names(name))

    def _mentions(self, text: str) -> set[str]:
        """Canon class names found as whole-word spans in `text`, keeping only maximal spans."""
        padded, spans = f" {_canon(text)} ", []
        for form, cname in self.mentionable.items():  # str.find, not a regex per name: hundreds of names per answer
            start = padded.find(f" {form} ")
            while start >= 0:
                spans.append((start, start + len(form) + 1, cname))
                start = padded.find(f" {form} ", start + 1)
        return {c for s, e, c in spans if not any(s2 <= s and e <= e2 and (e2 - s2) > (e - s) for s2, e2, _ in spans)}

    def label(self, truth: str, answer: str) -> str:
        canon = _canon(answer)
        if not canon:  # nothing but punctuation ('???', '...'): malformed, as the paper's verifier rules
            return "wrong"
        if is_abstain(answer):
            return "abstain"
        words, forms = canon.split(), self._forms(canon)
        if words and len(words[-1]) > 3 and words[-1].endswith("s") and not words[-1].endswith("ss"):
            forms |= self._forms(" ".join(words[:-1] + [words[-1][:-1]]))  # 'warblers' -> 'warbler'
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
        if any(self._matches(forms, below) for n in self._names(truth) for below in self.below.get(n, ())):
            return "more_specific"
        truth_names, padded = self._names(truth), f" {canon} "
        # the class names in the answer, else the truth's (the truth may not be a class of the dataset)
        mentioned = self._mentions(answer) or {n for n in truth_names if f" {n} " in padded}
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
JUDGE_LABEL_TEXT = {lab: lab.replace("_", " ") for lab in JUDGE_LABELS}  # 'less_specific' -> 'less specific'...
LABEL_TEXT_RE = re.compile(  # the label texts, longest first ('more specific' before 'specific')
    rf"\b({'|'.join(sorted(JUDGE_LABEL_TEXT.values(), key=len, reverse=True))})\b")

class HFJudge(Judge):
    """An LLM judge with transformers. For every pair the prompt is scored once with each of the six label texts
    appended; the label with the highest total log-probability wins (temperature 0, constrained to the six labels).
    Rows are left-padded so the label tokens sit at the end, and only those positions reach the vocabulary layer."""

    def __init__(self, model_path: str, cache_path: str | None = None):
        super().__init__(f"hf:{model_path}", cache_path)
        self.model_path, self.model = model_path, None  # loaded at the first pair the cache does not answer
        self.device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")

    def _load(self):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        path = self.model_path
        local = path.startswith((".", "/")) or os.path.isdir(path)
        if local and not os.path.exists(os.path.join(path, "config.json")):
            raise SystemExit(f"--judge hf:{path}: no config.json there; expected a Hugging Face causal-LM directory "
                             f"(config.json, *.safetensors, tokenizer files) or a hub id")
        self.tokenizer = tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=common.resolve_dtype("auto", self.device))
        self.model.to(self.device).eval()
        self.label_ids = [tok(JUDGE_LABEL_TEXT[lab], add_special_tokens=False)["input_ids"] for lab in JUDGE_LABELS]
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    def prompt_ids(self, truth: str, answer: str) -> list[int]:
        text, tok = JUDGE_PROMPT.format(truth=truth, answer=answer), self.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
            return tok(text, add_special_tokens=False)["input_ids"]
        return tok(text + "\nCategory: ", add_special_tokens=True)["input_ids"]

    @torch.no_grad()
    def label_scores(self, pairs: list[tuple[str, str]]) -> torch.Tensor:
        if self.model is None:
            self._load()
        rows = [self.prompt_ids(t, a) + ids for t, a in pairs for ids in self.label_ids]
        lens = [len(ids) for _ in pairs for ids in self.label_ids]
        width, keep = max(len(r) for r in rows), max(lens) + 1
        input_ids = torch.tensor([[self.pad_id] * (width - len(r)) + r for r in rows])  # left-padded: rows end together
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        vocab = self.model.get_input_embeddings().num_embeddings
        if int(input_ids.max()) >= vocab:  # a tokenizer that does not match the model (its eos / pad id, a token)
            raise SystemExit(f"--judge {self.name}: token id {int(input_ids.max())} (the tokenizer's pad / eos id or a "
                             f"prompt token) lies outside the model's {vocab} embeddings; expected a tokenizer that "
                             f"matches the model")
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        logits = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                            position_ids=positions.to(self.device), logits_to_keep=keep).logits  # [R, keep, V]
        logp = logits[:, :-1].float().log_softmax(-1)  # [R, keep-1, V] predicts the last keep-1 tokens
        tok_logp = logp.gather(-1, input_ids[:, width - keep + 1:].to(self.device).unsqueeze(-1)).squeeze(-1)
        first = keep - 1 - torch.tensor(lens, device=self.device)  # [R] column of each row's first label token
        label_mask = torch.arange(keep - 1, device=self.device)[None] >= first[:, None]  # [R, keep-1]
        return (tok_logp * label_mask).sum(1).view(len(pairs), len(JUDGE_LABELS)).cpu()  # [P, 6]

    def _judge(self, pairs):  # 8 pairs (48 rows) per forward
        scores = torch.cat([self.label_scores(pairs[s:s + 8]) for s in range(0, len(pairs), 8)])
        return [JUDGE_LABELS[i] for i in scores.argmax(1).tolist()]

# ----- a judge or a teacher behind an OpenAI-compatible server (vLLM, SGLang, transformers serve, a hosted API) -----
# Plain HTTP with the standard library (no extra dependency). The papers run their verifier (SpeciaRL: Qwen3-30B-A3B
# for training, Llama-3-70B for evaluation) behind a vLLM server; at that size it cannot sit next to the policy.

class ServerError(RuntimeError):
    """The server did not answer after the retries (connection refused or dropped, timeouts, 408, 409, 429, 5xx); inside
    OpenAIServer.request also one failed try, with the seconds the server asked to wait, if it did."""

    def __init__(self, message: str, wait: float | None = None):
        super().__init__(message)
        self.wait = wait

class BadRequest(RuntimeError):
    """The server refused the request with a 4xx that is not retried; the message names the URL."""

    def __init__(self, message: str, code: int, detail: str):
        super().__init__(message)
        self.code, self.detail = code, detail

def retry_after(headers) -> float | None:
    """The seconds a reply asks the client to wait: retry-after-ms, else Retry-After in seconds or as an HTTP date
    (the headers the official openai client reads, in its order)."""
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        with contextlib.suppress(TypeError, ValueError):
            return float(headers.get(name)) * scale
    with contextlib.suppress(TypeError, ValueError):
        return email.utils.parsedate_to_datetime(headers.get("retry-after") or "").timestamp() - time.time()
    return None

class OpenAIServer:
    """A chat-completions endpoint (`base_url` such as http://host:8000/v1, a model name), requests in a bounded pool,
    retried as the official openai client retries (README: servers)."""

    BACKOFF = 0.5  # seconds before the first retry, doubling up to 16 x (the openai client's 0.5 s .. 8 s)
    MAX_RETRY_AFTER = 60.0  # a longer wait asked by the server is not taken: the backoff is used (openai client)

    def __init__(self, base_url: str | None, model: str, *, what: str, concurrency: int = 16):
        base_url = base_url or os.environ.get("OPENAI_BASE_URL")
        if not base_url:
            raise SystemExit(f"{what}: no server address; pass {what} http://HOST:PORT/v1 or set OPENAI_BASE_URL")
        self.url, self.model, self.what, self.concurrency = base_url.rstrip("/"), model, what, concurrency
        key = os.environ.get("OPENAI_API_KEY")
        self.headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        self.counts = Counter()  # requests, retries, seconds (summed latency), wall (seconds with requests running)
        self._lock = threading.Lock()

    def _once(self, method: str, path: str, body: dict | None, timeout: float) -> dict:
        import http.client
        import urllib.error
        import urllib.request
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers=self.headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")[:300].strip()
            should = e.headers.get("x-should-retry")
            if should == "true" or (should != "false" and (e.code in (408, 409, 429) or e.code >= 500)):
                raise ServerError(f"HTTP {e.code} {detail}", retry_after(e.headers))
            if e.code == 401:
                raise SystemExit(f"{self.what} {self.url}: 401 unauthorized; set OPENAI_API_KEY to the server's key")
            if e.code == 404 and "model" in detail.lower():
                raise SystemExit(f"{self.what} {self.url}: the server does not serve the model {self.model!r} "
                                 f"({detail})")
            raise BadRequest(f"{self.what} {self.url}: {method} {path} answered HTTP {e.code} {detail}", e.code, detail)
        except (OSError, TimeoutError, http.client.HTTPException) as e:  # refused, reset, dropped, cut, timed out
            raise ServerError(f"{type(e).__name__}: {e}")
        try:
            return json.loads(raw)
        except ValueError:
            raise ServerError(f"a reply that is not JSON: {raw[:80]!r}")

    def request(self, method: str, path: str, body: dict | None = None, retries: int = 5,
                timeout: float = 60.0) -> dict:
        for attempt in range(retries + 1):
            t0 = time.perf_counter()
            try:
                out = self._once(method, path, body, timeout)
                with self._lock:
                    self.counts.update(requests=1, seconds=time.perf_counter() - t0)  # a Counter: adds
                return out
            except ServerError as e:
                if attempt == retries:
                    raise ServerError(f"{self.what} {self.url}: no answer after {retries + 1} tries (last: {e})")
                with self._lock:
                    self.counts["retries"] += 1
                asked = e.wait is not None and 0 < e.wait <= self.MAX_RETRY_AFTER
                time.sleep(e.wait if asked else min(self.BACKOFF * 2 ** attempt, 16 * self.BACKOFF)
                           * (1 - 0.25 * random.random()))

    def check(self):
        """At start: the server answers within seconds and serves the model (else one message naming the URL). An
        address without the API's /v1 (http://HOST:PORT) gets it added when the server answers there."""
        urls = [self.url] if self.url.endswith("/v1") else [self.url, self.url + "/v1"]
        for self.url in urls:
            try:
                listing = self.request("GET", "/models", retries=1, timeout=5.0)
                break
            except ServerError as e:
                raise SystemExit(f"{self.what} {self.url}: cannot reach the server ({e}); start it (README: vLLM) or "
                                 f"fix the address")
            except BadRequest as e:
                if e.code != 404 or self.url == urls[-1]:
                    raise SystemExit(f"{e}: no OpenAI API there; pass the API's base address, e.g. {self.what} "
                                     f"http://HOST:PORT/v1")
        if self.url != urls[0]:
            common.print0(f"{self.what} {urls[0]}: no API there, using {self.url}")
        served = [m.get("id") for m in listing.get("data", [])] if isinstance(listing, dict) else []
        if served and self.model not in served:
            raise SystemExit(f"{self.what} {self.url}: the server does not serve {self.model!r}; it serves {served}")

    def chat(self, body: dict) -> list[str]:
        """The texts of the choices; reasoning the server split out of the text (`reasoning_content`: vLLM's reasoning
        parsers; `reasoning`: newer vLLM) is put back in front as <think>...</think>, as the model wrote it."""
        reply = self.request("POST", "/chat/completions", {"model": self.model, **body})
        try:
            messages = [choice["message"] for choice in reply["choices"]]
            thoughts = [message.get("reasoning_content") or message.get("reasoning") for message in messages]
            return [(f"<think>{t}</think>" if t else "") + (m["content"] or "") for m, t in zip(messages, thoughts)]
        except (KeyError, TypeError, IndexError, AttributeError):
            raise ServerError(f"{self.what} {self.url}: a reply without choices/message/content: {str(reply)[:200]}")

    def map(self, fn: Callable, inputs: Sequence) -> list:
        """[fn(x) for x in inputs], `concurrency` at a time; the first error cancels what has not started."""
        from concurrent.futures import ThreadPoolExecutor
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(inputs)))) as pool:
            try:
                return list(pool.map(fn, inputs))
            finally:
                self.counts["wall"] += time.perf_counter() - t0

    def chat_image(self, image: str, text: str, **body) -> list[str]:
        """chat() on an image file (inline as a data URL) and a text; `body`: n, temperature, max_tokens, ..."""
        import base64
        with open(image, "rb") as f:
            inline = (f"data:image/{'png' if image.lower().endswith('.png') else 'jpeg'};base64,"
                      f"{base64.b64encode(f.read()).decode()}")
        content = [{"type": "image_url", "image_url": {"url": inline}}, {"type": "text", "text": text}]
        return self.chat({"messages": [{"role": "user", "content": content}], **body})

def strip_think(text: str) -> str:
    """The text after the last </think>, cut at an unclosed <think> (reasoning the token budget stopped)."""
    return text.rsplit("</think>", 1)[-1].split("<think>", 1)[0]

def label_from_text(text: str) -> str | None:
    """The ladder label an LLM's answer names ('Less specific.', 'less_specific', 'Category: generic'), or None
    when it names none or several. Reasoning in <think> is skipped; an answer at length that names several labels
    is read by its last line ('... Category: less specific')."""
    text = strip_think(text)
    lines = [line for line in text.splitlines() if line.strip()]
    for part in (text, lines[-1] if lines else ""):
        found = set(LABEL_TEXT_RE.findall(re.sub(r"[^a-z]+", " ", part.lower())))
        if len(found) == 1:
            return found.pop().replace(" ", "_")
    return None

class OpenAIJudge(Judge):
    """The six-label verifier behind an OpenAI-compatible server: HFJudge's prompt, temperature 0, the answer kept to
    the labels by the field a probe finds the server reads (`structured_outputs`, else `guided_choice`, else none: free
    text is read); naming no label is a judge error. README: "A judge or a teacher behind a server"."""
    writes_as_it_goes = True
    PROBE = "zq"  # the probe's one allowed answer, a word no model gives to "Reply with one word." unconstrained

    def __init__(self, model: str, cache_path: str | None = None, *, url: str | None = None, concurrency: int = 16,
                 check: bool = True, max_tokens: int = 0, thinking: bool = False):
        super().__init__(f"openai:{model}", cache_path)  # the cache is keyed by the model, whatever server serves it
        self.server = OpenAIServer(url, model, what="--judge-url", concurrency=concurrency)
        self.options = {"chat_template_kwargs": {"enable_thinking": thinking},
                        **({"max_tokens": max_tokens} if max_tokens else {})}
        self.constraint = ""  # the field the server reads a choice from ("" none), found by the probe
        self._cache_lock = threading.Lock()  # the pool's threads append to one cache file
        if check:
            self.server.check()
            self.constraint = self._probe()
            common.print0(f"--judge-url {self.server.url}: the answer constrained by "
                          f"{self.constraint or 'nothing (the server reads no choice field; free text is read)'}")

    def _send(self, text: str, choices: list[str]) -> str:
        body = {"messages": [{"role": "user", "content": text}], "temperature": 0.0, **self.options}
        if self.constraint:
            body[self.constraint] = {"choice": choices} if self.constraint == "structured_outputs" else choices
        try:
            return self.server.chat(body)[0]
        except BadRequest as e:  # a server that refuses fields it does not know (400 / 422 naming the field)
            if "chat_template_kwargs" in e.detail and self.options.pop("chat_template_kwargs", None):
                return self._send(text, choices)
            raise

    def _probe(self) -> str:
        for self.constraint in ("structured_outputs", "guided_choice"):  # the first choice field the server obeys
            with contextlib.suppress(BadRequest):  # the field refused
                if strip_think(self._send("Reply with one word.", [self.PROBE])).strip() == self.PROBE:
                    return self.constraint
        return ""  # none: the free text is read

    def _ask(self, pair: tuple[str, str]) -> str | None:  # the label goes to the cache file the moment it arrives
        try:
            label = label_from_text(self._send(JUDGE_PROMPT.format(truth=pair[0], answer=pair[1]),
                                               [JUDGE_LABEL_TEXT[lab] for lab in JUDGE_LABELS]))
        except BadRequest as e:
            raise SystemExit(f"{e} (the judge's request refused)")
        if label is not None and self.cache_path:
            with self._cache_lock:
                self._persist([(pair, label)])
        return label

    def _judge(self, pairs):
        return self.server.map(self._ask, pairs)

    def stats(self) -> dict[str, float]:
        c = self.server.counts
        return {**super().stats(), "judge/requests": c["requests"], "judge/retries": c["retries"],
                "judge/requests_per_s": c["requests"] / c["wall"] if c["wall"] else 0.0,
                "judge/mean_latency_s": c["seconds"] / c["requests"] if c["requests"] else 0.0}

def get_judge(spec: str, dataset: Dataset, cache_path: str | None = None, *, url: str | None = None,
              concurrency: int = 16, max_tokens: int = 0, thinking: bool = False):
    """'rules', 'hf:<model dir or hub id>' or 'openai:<model>' (a server at `url`, default $OPENAI_BASE_URL; its
    token budget and thinking switch); `judge.judge([(truth, answer), ...]) -> labels`."""
    if spec == "rules":
        return RulesJudge(dataset, cache_path)
    if spec.startswith("hf:") and len(spec) > 3:
        return HFJudge(spec[3:], cache_path)
    if spec.startswith("openai:") and len(spec) > 7:
        return OpenAIJudge(spec[7:], cache_path, url=url, concurrency=concurrency, max_tokens=max_tokens,
                           thinking=thinking)
    raise SystemExit(f"--judge {spec}: expected 'rules', 'hf:<causal LM directory or hub id>' or 'openai:<model "
                     f"served at --judge-url>'")
