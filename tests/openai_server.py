"""A small OpenAI-compatible server for the tests (127.0.0.1, a free port): GET /v1/models and POST
/v1/chat/completions, answering the judge's six-label prompt from a function of (truth, answer) and the teacher's
rationale prompt with a four-part rationale of the class it names. It plays the servers people run: the choice fields
it reads (vLLM 0.10.2-0.11 both, 0.12+ `structured_outputs` only, earlier `guided_choice` only; unread fields are
ignored, as vLLM does, or refused with 400 / 422, as OpenAI's API / transformers serve do), reasoning split out of
the text, a judge that answers at length. It can be told to fail: the next N requests answer 500 (with Retry-After
headers), every request after the first N answered fails (a server that died), every request waits, drops the
connection or answers text that is not JSON, a key is required. It counts what it was asked, per (truth, answer)
pair."""
import base64
import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

JUDGE_RE = re.compile(r'Correct class: "(.*)"\nAnswer: "(.*)"')
STANDARD = {"model", "messages", "temperature", "top_p", "max_tokens", "n"}  # the fields every server reads
TEACHER_RE = re.compile(r'of the category "(.*?)"\. Categories that look similar: (.*?)\.\n')


class Behaviour:
    def __init__(self, label_of=None, model="judge-model"):
        self.label_of = label_of or (lambda truth, answer: "specific" if truth == answer else "wrong")
        self.model = model
        self.fail_next = 0  # answer 500 to this many requests
        self.fail_always = False  # answer 500 to every request (a server that went away behind a proxy)
        self.delay = 0.0  # seconds each request waits
        self.drop_next = 0  # close the connection without a reply, this many times
        self.malformed_next = 0  # answer text that is not JSON, this many times
        self.key = None  # required bearer key
        self.reads = ("structured_outputs", "guided_choice")  # the choice fields it honours (vLLM 0.10.2-0.11)
        self.refuse_unknown = 0  # status for a field it does not read (0: ignored, as vLLM; 400 OpenAI; 422 serve)
        self.reasoning_field = None  # "reasoning_content" / "reasoning": <think>...</think> split out of the text
        self.chatty = False  # an unconstrained judge reasons at length before its label
        self.fail_after = None  # every request after this many answered chat requests answers 500 (died)
        self.fail_code, self.fail_headers = 500, {}  # what a failing request answers
        self.asked = []  # the bodies of the chat requests
        self.pairs = Counter()  # (truth, answer) -> times asked
        self.images = []  # data URLs the teacher was shown
        self.requests = 0
        self.lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    behaviour: Behaviour = None

    def log_message(self, *args):  # quiet
        pass

    def _reply(self, code: int, payload, raw: bytes | None = None, headers: dict | None = None):
        body = raw if raw is not None else json.dumps(payload).encode()
        self.send_response(code)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _gate(self) -> bool:
        """The failure modes; True when the request was answered (or dropped) here."""
        b = self.behaviour
        with b.lock:  # one failure per request: 500s first, then dropped connections
            b.requests += 1
            died = b.fail_after is not None and len(b.asked) >= b.fail_after
            fail = b.fail_always or b.fail_next > 0 or died
            drop = not fail and b.drop_next > 0
            b.fail_next -= b.fail_next > 0 and not b.fail_always
            b.drop_next -= drop
        if b.delay:
            time.sleep(b.delay)
        if b.key and self.headers.get("Authorization") != f"Bearer {b.key}":
            self._reply(401, {"error": {"message": "invalid api key"}})
            return True
        if drop:
            self.connection.close()
            self.close_connection = True
            return True
        if fail:
            self._reply(b.fail_code, {"error": {"message": "internal error"}}, headers=b.fail_headers)
            return True
        if not self.path.startswith("/v1/"):
            self._reply(404, {"detail": "Not Found"})
            return True
        return False

    def do_GET(self):
        if self._gate():
            return
        if self.path.rstrip("/").endswith("/models"):
            self._reply(200, {"object": "list", "data": [{"id": self.behaviour.model, "object": "model"}]})
        else:
            self._reply(404, {"error": {"message": "not found"}})

    def do_POST(self):
        length = int(self.headers.get("Content-Length", 0))
        request = json.loads(self.rfile.read(length))
        if self._gate():
            return
        b = self.behaviour
        if request.get("model") != b.model:
            self._reply(404, {"error": {"message": f"The model `{request.get('model')}` does not exist."}})
            return
        unknown = sorted(set(request) - STANDARD - set(b.reads))
        if b.refuse_unknown and unknown:
            self._reply(b.refuse_unknown, {"detail": [{"type": "extra_forbidden", "loc": ["body", unknown[0]]}]})
            return
        with b.lock:
            b.asked.append(request)
            if b.malformed_next > 0:
                b.malformed_next -= 1
                self._reply(200, None, raw=b"<html>bad gateway</html>")
                return
        content = request["messages"][-1]["content"]
        if isinstance(content, list):  # the teacher: an image and a text
            text = next(part["text"] for part in content if part["type"] == "text")
            with b.lock:
                b.images += [part["image_url"]["url"] for part in content if part["type"] == "image_url"]
        else:
            text = content
        read = [request[f] for f in b.reads if f in request]
        choices = (read[0]["choice"] if isinstance(read[0], dict) else read[0]) if read else None
        judged = JUDGE_RE.search(text)
        if judged:
            truth, answer = judged.groups()
            with b.lock:
                b.pairs[(truth, answer)] += 1
            label = b.label_of(truth, answer).replace("_", " ")
            if choices:
                texts = [label]
            elif b.chatty:  # names every label while reasoning, then its own on the last line
                texts = ["<think>\nwrong, abstain, generic, less specific, specific or more specific? Weighing the "
                         "two names word by word.\n</think>\n\nThe answer is close to the class; of the "
                         f"categories (generic, specific, ...) the one that fits:\nCategory: {label}"]
            else:
                texts = [label.capitalize() + "."]
        elif TEACHER_RE.search(text):
            truth, similar = TEACHER_RE.search(text).groups()
            texts = [rationale(truth, similar.split(", ")) for _ in range(request.get("n", 1))]
        else:  # the judge's probe: "Reply with one word."
            texts = [choices[0] if choices else "Hello."]
        if request.get("max_tokens"):  # a word is a token here; the budget cuts the text
            texts = [" ".join(t.split(" ")[:request["max_tokens"]]) for t in texts]
        messages = []
        for t in texts:
            think = re.match(r"(?s)<think>(.*?)</think>(.*)", t) if b.reasoning_field else None
            messages.append({"role": "assistant", "content": think.group(2), b.reasoning_field: think.group(1)}
                            if think else {"role": "assistant", "content": t})
        self._reply(200, {"id": "x", "object": "chat.completion", "model": b.model,
                          "choices": [{"index": i, "message": m, "finish_reason": "stop"}
                                      for i, m in enumerate(messages)]})


def rationale(truth: str, similar: list[str]) -> str:
    """A four-part rationale in the paper's layout: numbered features, the candidate line with the list below it,
    a comparison, the prediction."""
    return ("<think>Visual features:\n1. colour and pattern as shown.\n2. the outline of the shape.\n\n"
            f"The analysis of candidate subcategories: \n1. {truth}\n" +
            "".join(f"{i}. {s}\n" for i, s in enumerate(similar, 2)) +
            f"\nThe shape and colour match {truth} and differ from the others.\n"
            f"The prediction is: {truth}</think>\n\n<answer>{truth}</answer>")


def decode_image(data_url: str) -> bytes:
    return base64.b64decode(data_url.split(",", 1)[1])


class Server:
    """with Server(behaviour) as s: s.url is http://127.0.0.1:PORT/v1."""

    def __init__(self, behaviour: Behaviour | None = None, port: int = 0):
        self.behaviour = behaviour or Behaviour()
        handler = type("BoundHandler", (Handler,), {"behaviour": self.behaviour})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
