"""The verifier and the teacher behind an OpenAI-compatible server (tests/openai_server.py on 127.0.0.1): labels and
the cache, concurrency, retries, the failure messages, eval.py with the server judge against the in-process one,
ranks sharing one cache, speciarl stopping cleanly when the server goes away and resuming, fine_r1's teacher."""
import json
import multiprocessing
import os
import sys
import time
import types

import pytest

import common
import data
import judges
import openai_server as fake

PAIRS = [("red striped circle", "red striped circle"), ("red striped circle", "circle"),
         ("blue plain square", "Blue plain triangle"), ("blue plain square", "None")]


@pytest.fixture(scope="module")
def toy():
    return data.load_dataset("toy", "test")


def rules_labels(toy):
    """The server answers what the in-process rules judge would (so both judges can be compared)."""
    rules = judges.get_judge("rules", toy)
    return lambda truth, answer: rules.judge([(truth, answer)])[0]


def quick(judge):
    judge.server.BACKOFF = 0.01  # retries without the real backoff
    return judge


def test_labels_cache_and_stats(toy, tmp_path):
    cache = str(tmp_path / "judge_cache.jsonl")
    with fake.Server(fake.Behaviour(rules_labels(toy))) as server:
        judge = judges.get_judge("openai:judge-model", toy, cache, url=server.url)
        labels = judge.judge(PAIRS + PAIRS[:1])
        assert labels == ["specific", "less_specific", "wrong", "abstain", "specific"]
        assert sum(server.behaviour.pairs.values()) == 4  # each distinct pair once
        assert ("red striped circle", "circle") in server.behaviour.pairs  # the verifier's text of the answer
        again = judges.get_judge("openai:judge-model", toy, cache, url=server.url)  # a restarted run
        assert again.judge(PAIRS) == labels[:4] and sum(server.behaviour.pairs.values()) == 4
        stats = judge.stats()
        # + the check and the probe; the repeated pair within the call is no cache hit
        assert stats["judge/requests"] == 6 and stats["judge/cache_hits"] == 0 and stats["judge/errors"] == 0
        assert stats["judge/mean_latency_s"] > 0 and stats["judge/requests_per_s"] > 0
    with open(cache) as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 4 and {r["judge"] for r in records} == {"openai:judge-model"}


def test_an_answer_off_the_ladder_is_a_judge_error_and_guided_choice_falls_back(toy, tmp_path):
    behaviour = fake.Behaviour(lambda t, a: "maybe" if a == "circle" else "specific")
    behaviour.reads, behaviour.refuse_unknown = (), 400  # a hosted API: no choice field; "Specific." in free text
    with fake.Server(behaviour) as server:
        judge = judges.get_judge("openai:judge-model", toy, str(tmp_path / "c.jsonl"), url=server.url)
        assert judge.judge(PAIRS[:2]) == ["specific", judges.JUDGE_ERROR]
        assert judge.constraint == "" and judge.errors == 1
        assert judge.judge(PAIRS[1:2]) == [judges.JUDGE_ERROR]  # never cached: asked again
        assert behaviour.pairs[("red striped circle", "circle")] == 2


def test_requests_run_concurrently(toy):
    """A slow server: 16 requests at concurrency 8 take about 2 request times, not 16."""
    behaviour = fake.Behaviour()
    behaviour.delay = 0.1
    pairs = [("red striped circle", f"answer {i}") for i in range(16)]
    with fake.Server(behaviour) as server:
        timings = {}
        for concurrency in (1, 8):
            judge = judges.get_judge("openai:judge-model", toy, url=server.url, concurrency=concurrency)
            t0 = time.perf_counter()
            judge.judge(pairs)
            timings[concurrency] = time.perf_counter() - t0
    assert timings[1] > 16 * 0.1 and timings[8] < 0.5 * timings[1], timings


def test_retries_then_success(toy):
    behaviour = fake.Behaviour()
    with fake.Server(behaviour) as server:
        judge = quick(judges.get_judge("openai:judge-model", toy, url=server.url, concurrency=1))
        behaviour.fail_next, behaviour.drop_next, behaviour.malformed_next = 2, 1, 1
        assert judge.judge(PAIRS[:1]) == ["specific"]
        assert judge.stats()["judge/retries"] == 4  # two 500s, a dropped connection, a reply that is not JSON


def test_failures_are_one_clear_message(toy):
    with fake.Server() as server:
        port_url = server.url
    t0 = time.perf_counter()
    with pytest.raises(SystemExit, match="cannot reach the server") as e:
        judges.get_judge("openai:judge-model", toy, url=port_url)  # nobody listens there now
    assert port_url in str(e.value) and time.perf_counter() - t0 < 10
    behaviour = fake.Behaviour()
    with fake.Server(behaviour) as server:
        with pytest.raises(SystemExit, match="does not serve 'other-model'; it serves \\['judge-model'\\]"):
            judges.get_judge("openai:other-model", toy, url=server.url)
        behaviour.key = "secret"
        with pytest.raises(SystemExit, match="401 unauthorized; set OPENAI_API_KEY"):
            judges.get_judge("openai:judge-model", toy, url=server.url)
        os.environ["OPENAI_API_KEY"], os.environ["OPENAI_BASE_URL"] = "secret", server.url
        try:
            judge = judges.get_judge("openai:judge-model", toy)  # both from the environment
            assert judge.judge(PAIRS[:1]) == ["specific"]
        finally:
            del os.environ["OPENAI_API_KEY"], os.environ["OPENAI_BASE_URL"]
        behaviour.key, behaviour.fail_always = None, True
        judge = quick(judges.OpenAIJudge("judge-model", url=server.url, check=False))
        with pytest.raises(judges.ServerError, match="no answer after 6 tries"):
            judge.judge(PAIRS[:1])
    with pytest.raises(SystemExit, match="no server address"):
        judges.get_judge("openai:judge-model", toy)


def _judge_in_a_process(url, cache, pairs, queue):
    toy = data.load_dataset("toy", "test")
    judge = judges.get_judge("openai:judge-model", toy, cache, url=url)
    queue.put(judge.judge(pairs))


def test_two_processes_share_one_cache(toy, tmp_path):
    """Two ranks judge their own pairs into the run's one cache file; a restart finds every pair there."""
    cache = str(tmp_path / "judge_cache.jsonl")
    pairs = [("red striped circle", f"answer {i}") for i in range(12)]
    behaviour = fake.Behaviour(lambda t, a: "wrong" if int(a.split()[-1]) % 2 else "generic")
    with fake.Server(behaviour) as server:
        ctx = multiprocessing.get_context("spawn")
        queue = ctx.Queue()
        procs = [ctx.Process(target=_judge_in_a_process, args=(server.url, cache, pairs[r::2], queue))
                 for r in range(2)]
        for p in procs:
            p.start()
        results = [queue.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        assert sorted(len(r) for r in results) == [6, 6]
        fresh = judges.get_judge("openai:judge-model", toy, cache, url=server.url)
        assert fresh.judge(pairs) == ["wrong" if i % 2 else "generic" for i in range(12)]
        assert sum(behaviour.pairs.values()) == 12 and fresh.judged == 0 and fresh.bad_cache_lines == 0


def test_eval_with_the_server_judge_equals_the_in_process_judge(tiny, toy, tmp_path):
    """The same answers, labelled by the rules judge in-process or by a server that answers what it would."""
    import dataclasses
    import eval as ev
    model, proc = tiny
    ds = dataclasses.replace(toy, examples=toy.examples[:12])
    local = ev.evaluate(model, proc, ds, "speciarl", judge=judges.get_judge("rules", ds), max_new_tokens=32,
                        progress=False, out_dir=str(tmp_path / "local"))
    with fake.Server(fake.Behaviour(rules_labels(toy))) as server:
        remote_judge = judges.get_judge("openai:judge-model", ds, str(tmp_path / "cache.jsonl"), url=server.url)
        remote = ev.evaluate(model, proc, ds, "speciarl", judge=remote_judge, max_new_tokens=32, progress=False,
                             out_dir=str(tmp_path / "remote"))
        assert sum(server.behaviour.pairs.values()) >= 1
    assert remote == local
    with open(tmp_path / "remote" / "metrics.json") as f:
        assert json.load(f)["settings"]["judge_stats"]["judge/requests"] >= 1
    # the command line: --judge openai:<model> --judge-url, the cache in --out
    with fake.Server(fake.Behaviour(rules_labels(toy))) as server:
        out = str(tmp_path / "cli")
        res = ev.main(["--model", "tiny", "--data", "toy", "--protocol", "speciarl", "--limit", "8", "--no-progress",
                       "--max-new-tokens", "32", "--judge", "openai:judge-model", "--judge-url", server.url,
                       "--judge-concurrency", "4", "--out", out])
        assert res["results"]["all"]["n"] == 8 and sum(server.behaviour.pairs.values()) >= 1
    with open(os.path.join(out, "judge_cache.jsonl")) as f:
        assert all(json.loads(line)["judge"] == "openai:judge-model" for line in f)


def test_speciarl_stops_cleanly_when_the_server_goes_away_and_resumes(tmp_path, monkeypatch, toy):
    """The server answers 40 pairs, then only 500s: the run stops with one message and a checkpoint, the cache
    keeps every label; the same command against a healthy server resumes and finishes, judging no pair twice."""
    import speciarl
    monkeypatch.setattr(judges.OpenAIServer, "BACKOFF", 0.01)
    rules = rules_labels(toy)
    behaviour = fake.Behaviour()

    def label_of(truth, answer):
        if sum(behaviour.pairs.values()) >= 40:
            behaviour.fail_always = True  # gone: every later request fails
        return rules(truth, answer)
    behaviour.label_of = label_of
    out = str(tmp_path / "run")
    with fake.Server(behaviour) as server:
        argv = ["--data", "toy", "--max-steps", "4", "--eval-every", "0", "--save-every", "10", "--out", out,
                "--judge", "openai:judge-model", "--judge-url", server.url, "--judge-concurrency", "4"]
        with pytest.raises(SystemExit, match="no answer after 6 tries.*Checkpoint saved after step [0-9]") as e:
            speciarl.main(argv)
        stopped_at = int(str(e.value).split("Checkpoint saved after step ")[1].split(",")[0])
        assert stopped_at < 4 and os.path.exists(os.path.join(out, "latest"))
        with open(os.path.join(out, "judge_cache.jsonl")) as f:
            cached = [json.loads(line) for line in f]
        assert len(cached) == 40  # every label that arrived was written at once
        behaviour.fail_always = False
        behaviour.label_of = rules
        speciarl.main(argv)
    assert max(behaviour.pairs.values()) == 1  # nothing judged twice
    with open(os.path.join(out, "metrics.jsonl")) as f:
        steps = [r["step"] for r in map(json.loads, f) if "reward" in r]
    assert steps[-1] == 4 and os.path.exists(os.path.join(out, "final", "config.json"))
    with open(os.path.join(out, "metrics.jsonl")) as f:
        last = [r for r in map(json.loads, f) if "reward" in r][-1]
    assert last["judge/requests"] >= 1 and "judge/cache_hit_rate" in last and "judge/mean_latency_s" in last


@pytest.mark.parametrize("reasoning_field", [None, "reasoning_content"])
def test_fine_r1_teacher_behind_a_server_writes_the_rationales(tmp_path, reasoning_field):
    """Stage cot with --teacher openai:<model>: every seen toy class gets a rationale that passes the filter; the
    teacher saw each image inline (a data URL of the file's bytes) with the class and its look-alikes. A server that
    splits the reasoning out (vLLM's reasoning parsers, transformers serve for Qwen) gets it joined back as <think>."""
    import fine_r1
    behaviour = fake.Behaviour(model="teacher-model")
    behaviour.reasoning_field = reasoning_field
    with fake.Server(behaviour) as server:
        args = fine_r1.parse_args(["--data", "toy", "--cot-source", "teacher", "--teacher", "openai:teacher-model",
                                   "--teacher-url", server.url, "--cot-per-class", "1", "--cot-images-per-class", "2",
                                   "--cot-batch", "2", "--cot-samples", "2", "--out", str(tmp_path)])
        path = fine_r1.run_cot(args, common.Dist(), str(tmp_path))
    records = common.read_jsonl(path)
    seen = fine_r1.load_split(args, "train", "base").split_class_names
    assert [r["class_name"] for r in records] == seen
    for r in records:
        kept, checks = fine_r1.check_rationale(r["response"], r["class_name"])
        assert kept is not None, checks
    shown = {fake.decode_image(url) for url in behaviour.images}
    assert len(behaviour.images) == len(seen) * 2  # 2 images offered per class, one request each (n = 2)
    for r in records:
        with open(r["image"], "rb") as f:
            assert f.read() in shown
    assert all(url.startswith("data:image/png;base64,") for url in behaviour.images)


# ----- the servers people run (issue: vLLM 0.12+, reasoning split out, no /v1, every failure one line) -----

LADDER = [judges.JUDGE_LABEL_TEXT[lab] for lab in judges.JUDGE_LABELS]


def judge_requests(behaviour):
    return [r for r in behaviour.asked if "Correct class" in r["messages"][-1]["content"]]


@pytest.mark.parametrize("reads,refuse,field", [
    (("structured_outputs",), 0, "structured_outputs"),  # vLLM 0.12+: guided_choice is no longer read
    (("guided_choice",), 0, "guided_choice"),  # vLLM before 0.10.2: structured_outputs is ignored
    ((), 422, ""),  # transformers serve: unknown fields refused with 422; a free-text answer is read
])
def test_the_choice_goes_in_the_field_the_server_reads(toy, reads, refuse, field):
    behaviour = fake.Behaviour(rules_labels(toy))
    behaviour.reads, behaviour.refuse_unknown, behaviour.chatty = reads, refuse, True
    with fake.Server(behaviour) as server:
        judge = judges.get_judge("openai:judge-model", toy, url=server.url)
        assert judge.constraint == field
        assert judge.judge(PAIRS) == ["specific", "less_specific", "wrong", "abstain"] and judge.errors == 0
    sent = judge_requests(behaviour)
    assert len(sent) == 4 and "max_tokens" not in sent[0]  # the paper's client sends no budget
    expected = {"structured_outputs": {"choice": LADDER}, "guided_choice": LADDER, "": None}[field]
    assert all(r.get(field) == expected for r in sent) if field else all(set(r) <= fake.STANDARD for r in sent)
    other = {"structured_outputs": "guided_choice", "guided_choice": "structured_outputs"}.get(field)
    assert other is None or not any(other in r for r in sent)
    if refuse:  # the thinking switch refused once, then not sent
        assert "chat_template_kwargs" not in sent[0]
    else:  # the paper's judge does not think
        assert sent[0]["chat_template_kwargs"] == {"enable_thinking": False}


def test_a_thinking_judge_that_answers_at_length_needs_its_budget(toy):
    """A judge reasoning before its label (split out as `reasoning` by the server, or left in the text): read past
    the reasoning, by the last line; a budget too small cuts it to a judge error, none (the default) does not."""
    for field in ("reasoning", None):
        behaviour = fake.Behaviour(rules_labels(toy))
        behaviour.reads, behaviour.chatty, behaviour.reasoning_field = (), True, field
        with fake.Server(behaviour) as server:
            judge = judges.get_judge("openai:judge-model", toy, url=server.url, thinking=True)
            assert judge.judge(PAIRS[1:2]) == ["less_specific"]
            assert judge_requests(behaviour)[0]["chat_template_kwargs"] == {"enable_thinking": True}
            short = judges.get_judge("openai:judge-model", toy, url=server.url, max_tokens=16)
            assert short.judge(PAIRS[1:2]) == [judges.JUDGE_ERROR]
            assert judge_requests(behaviour)[-1]["max_tokens"] == 16
    assert judges.label_from_text("<think>specific or generic?</think>\n\nGeneric.") == "generic"
    assert judges.label_from_text("<think>specific or generic? Let me") is None  # cut inside the reasoning


def test_an_address_without_v1(toy, capsys):
    with fake.Server(fake.Behaviour(rules_labels(toy))) as server:
        root = server.url[:-len("/v1")]
        judge = judges.get_judge("openai:judge-model", toy, url=root)
        assert judge.server.url == server.url and judge.judge(PAIRS[:1]) == ["specific"]
        assert f"--judge-url {root}: no API there, using {server.url}" in capsys.readouterr().out
        with pytest.raises(SystemExit, match="HTTP 404.*pass the API's base address, e.g. --teacher-url http://"):
            judges.OpenAIServer(root + "/api", "judge-model", what="--teacher-url").check()


def test_retries_as_the_openai_client(toy, monkeypatch):
    """408 and 409 are retried; the wait a reply asks for (retry-after-ms, Retry-After in seconds or as a date) is
    taken when it is at most 60 s, else the backoff; x-should-retry: false is not retried."""
    waits = []  # the judge's own sleeps only (the fake server's threads sleep too)
    monkeypatch.setattr(judges, "time", types.SimpleNamespace(**{**vars(time), "sleep": waits.append}))
    behaviour = fake.Behaviour()
    with fake.Server(behaviour) as server:
        judge = judges.get_judge("openai:judge-model", toy, url=server.url, concurrency=1)
        for code, headers, wait in [(408, {"retry-after-ms": "250"}, 0.25), (409, {"Retry-After": "2"}, 2.0),
                                    (429, {"Retry-After": "120"}, None)]:
            behaviour.fail_next, behaviour.fail_code, behaviour.fail_headers = 1, code, headers
            waits.clear()
            assert judge.judge([("red striped circle", f"answer {code}")]) == ["wrong"]
            assert len(waits) == 1 and (waits[0] == wait if wait else 0.375 <= waits[0] <= 0.5), (code, waits)
        behaviour.fail_next, behaviour.fail_code, behaviour.fail_headers = 1, 503, {"x-should-retry": "false"}
        with pytest.raises(SystemExit, match="HTTP 503"):
            judge.judge([("red striped circle", "answer 503")])
    later = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 < judges.retry_after({"retry-after": later}) <= 30 and judges.retry_after({}) is None


def test_fine_r1_teacher_server_failures_are_one_line_and_resume(tmp_path, monkeypatch):
    """The teacher's server refuses a request (400: a prompt too long) after 3 answers, then dies (500s) after 2 more:
    each stops the stage with one line naming the URL and the error, the finished classes are kept, and the same
    command resumes with the classes not done."""
    import fine_r1
    monkeypatch.setattr(judges.OpenAIServer, "BACKOFF", 0.01)
    behaviour = fake.Behaviour(model="teacher-model")
    behaviour.fail_after, behaviour.fail_code = 3, 400  # 2 requests per class: the second class fails
    with fake.Server(behaviour) as server:
        args = fine_r1.parse_args(["--data", "toy", "--teacher", "openai:teacher-model", "--teacher-url", server.url,
                                   "--cot-per-class", "1", "--cot-images-per-class", "2", "--cot-batch", "2",
                                   "--cot-samples", "2", "--out", str(tmp_path)])
        assert args.cot_source == "teacher"  # --teacher given: auto means the teacher, also on toy
        for code, message in [(400, "HTTP 400"), (500, "no answer after 6 tries")]:
            behaviour.fail_after, behaviour.fail_code = len(behaviour.asked) + 3 - (code == 500), code
            with pytest.raises(SystemExit) as e:
                fine_r1.run_cot(args, common.Dist(), str(tmp_path))
            assert f"stage cot: --teacher-url {server.url}" in str(e.value) and message in str(e.value)
            assert "\n" not in str(e.value) and "rerun the same command to resume" in str(e.value)
        parts = [r for p in tmp_path.glob("cot.part*.jsonl") for r in common.read_jsonl(str(p))]
        assert len(parts) == 2  # the first class of each run
        behaviour.fail_after = None
        asked_before = len(behaviour.asked)
        path = fine_r1.run_cot(args, common.Dist(), str(tmp_path))
    seen = fine_r1.load_split(args, "train", "base").split_class_names
    assert [r["class_name"] for r in common.read_jsonl(path)] == seen
    assert len(behaviour.asked) - asked_before == 2 * (len(seen) - 2)  # the finished classes were not asked again


def test_speciarl_resumes_an_evaluation_its_judge_server_cut_short(tmp_path, monkeypatch, toy):
    """The evaluation judge's server dies in the middle of the step-2 evaluation: a checkpoint at step 2 and one
    line; the same command does that evaluation first, then finishes. (At step 0 the server labels nothing, so that
    step 2 has pairs to ask: judge errors are never cached; --max-judge-errors 1 lets them pass.)"""
    import speciarl
    monkeypatch.setattr(judges.OpenAIServer, "BACKOFF", 0.01)
    rules = rules_labels(toy)
    behaviour = fake.Behaviour(lambda truth, answer: "maybe")
    real_eval = speciarl.run_eval

    def eval_then_die(*a, step, **k):
        if step == 2 and not os.path.exists(os.path.join(out, "ckpt_0000002")):
            behaviour.fail_after, behaviour.label_of = len(behaviour.asked) + 1, rules  # one answer, then gone
        return real_eval(*a, step=step, **k)
    monkeypatch.setattr(speciarl, "run_eval", eval_then_die)
    out = str(tmp_path / "run")
    with fake.Server(behaviour) as server:
        argv = ["--data", "toy", "--max-steps", "2", "--eval-every", "2", "--eval-limit", "8", "--eval-batch", "4",
                "--save-every", "0", "--max-judge-errors", "1", "--out", out, "--eval-judge", "openai:judge-model",
                "--eval-judge-url", server.url]
        with pytest.raises(SystemExit, match="evaluation at step 2: --judge-url .* no answer after 6 tries.*"
                                             "Checkpoint saved after step 2") as e:
            speciarl.main(argv)
        assert "\n" not in str(e.value)
        behaviour.fail_after = None  # healthy again
        speciarl.main(argv)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        evals = [(r["step"], r["eval/judge_errors"]) for r in map(json.loads, f) if "eval/hm" in r]
    assert [step for step, _ in evals] == [0, 2] and evals[0][1] > 0 and evals[1][1] == 0
    assert os.path.exists(os.path.join(out, "final", "config.json"))


def test_judge_errors_are_shown_and_too_many_stop_the_run(tmp_path, toy, capsys):
    """A judge that labels some answers off the ladder: its errors on eval.py's table and final line and on
    speciarl's step and eval lines; above --max-judge-errors a run stops with one line (eval.py after writing its
    results; speciarl before the update, with a checkpoint)."""
    import eval as ev
    import speciarl
    behaviour = fake.Behaviour(lambda truth, answer: "maybe" if len(answer) % 2 else "wrong")
    with fake.Server(behaviour) as server:
        out = str(tmp_path / "eval")
        flags = ["--model", "tiny", "--data", "toy", "--protocol", "speciarl", "--limit", "8", "--no-progress",
                 "--max-new-tokens", "32", "--judge", "openai:judge-model", "--judge-url", server.url, "--out", out]
        res = ev.main(flags + ["--max-judge-errors", "1"])["results"]["all"]
        printed = capsys.readouterr().out
        assert res["judge_errors"] > 0 and f"| judge_errors | {res['judge_errors']} |" in printed
        assert f"{res['judge_errors']} judge errors" in printed.splitlines()[-1]
        share = res["judge_errors"] / (res["n"] + res["judge_errors"])
        with pytest.raises(SystemExit, match=f"judged answers got no label from the judge .*above --max-judge-errors "
                                             f"{share / 2}.*all results written to {out}") as e:
            ev.main(flags + ["--max-judge-errors", str(share / 2)])
        assert "\n" not in str(e.value) and os.path.exists(os.path.join(out, "metrics.json"))
        run = str(tmp_path / "run")
        argv = ["--data", "toy", "--max-steps", "1", "--eval-every", "1", "--eval-limit", "4", "--eval-batch", "4",
                "--out", run, "--judge", "openai:judge-model", "--judge-url", server.url]
        speciarl.main(argv + ["--max-judge-errors", "1"])
        lines = capsys.readouterr().out.splitlines()
        step_line = next(line for line in lines if line.startswith("speciarl step 1/1"))
        assert float(step_line.split("judge_error_rate ")[1].split()[0]) > 0
        eval_lines = [line for line in lines if line.startswith("eval at step")]
        assert eval_lines and all("judge_errors" in line for line in eval_lines)
        with pytest.raises(SystemExit, match="judged answers got no label .*Checkpoint saved after step 0") as e:
            speciarl.main(argv[:-6] + ["--eval-every", "0", "--out", str(tmp_path / "stopped"), "--judge",
                                       "openai:judge-model", "--judge-url", server.url])
        assert "\n" not in str(e.value)


def test_a_stop_message_starts_its_own_line(tmp_path, toy, capsys, monkeypatch):
    """The judge's server dies during eval.py with the progress bar on (as on a terminal): the bar's line is cleared,
    so the message that follows is not glued to it."""
    import eval as ev
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)  # bars are drawn on a terminal only
    monkeypatch.setattr(judges.OpenAIServer, "BACKOFF", 0.01)
    behaviour = fake.Behaviour(rules_labels(toy))
    with fake.Server(behaviour) as server:
        behaviour.fail_after = len(behaviour.asked) + 1  # after the probe, one answer and gone
        with pytest.raises(SystemExit, match="no answer after .*rerun the same command to continue"):
            ev.main(["--model", "tiny", "--data", "toy", "--protocol", "speciarl", "--limit", "8", "--micro-batch",
                     "2", "--max-new-tokens", "32", "--judge", "openai:judge-model", "--judge-url", server.url,
                     "--out", str(tmp_path / "eval")])
    err = capsys.readouterr().err
    assert "eval speciarl toy" in err and err.split("\r")[-1].strip() == ""
