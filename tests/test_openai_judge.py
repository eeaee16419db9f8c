"""The verifier and the teacher behind an OpenAI-compatible server (tests/openai_server.py on 127.0.0.1): labels and
the cache, concurrency, retries, the failure messages, eval.py with the server judge against the in-process one,
ranks sharing one cache, speciarl stopping cleanly when the server goes away and resuming, fine_r1's teacher."""
import json
import multiprocessing
import os
import time

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
    judge.server.backoff = 0.01  # retries without the real backoff
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
    behaviour.delay = 0.25
    pairs = [("red striped circle", f"answer {i}") for i in range(16)]
    with fake.Server(behaviour) as server:
        timings = {}
        for concurrency in (1, 8):
            judge = judges.get_judge("openai:judge-model", toy, url=server.url, concurrency=concurrency)
            t0 = time.perf_counter()
            judge.judge(pairs)
            timings[concurrency] = time.perf_counter() - t0
    assert timings[1] > 16 * 0.25 and timings[8] < 0.5 * timings[1], timings


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
        judge = quick(judges.OpenAIJudge("judge-model", toy, url=server.url, check=False))
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


def test_fine_r1_teacher_behind_a_server_writes_the_rationales(tmp_path):
    """Stage cot with --teacher openai:<model>: every seen toy class gets a rationale that passes the filter; the
    teacher saw each image inline (a data URL of the file's bytes) with the class and its look-alikes."""
    import fine_r1
    behaviour = fake.Behaviour(model="teacher-model")
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
