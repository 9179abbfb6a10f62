"""A small OpenAI-compatible chat server for judge tests, with seeded faults.

POST /v1/chat/completions answers the judge prompts sensibly (compare: the answer that sorts first;
score: a score from the answer's length; rank: answers in sorted order; anything else: an echo) and,
at the configured rates, instead returns a 429, a 500, a reply slower than the client's timeout, or
text no parser accepts. The fault of a request is drawn from (seed, prompt, how many times this
prompt has arrived before), so a run is reproducible whatever order concurrent requests arrive in.
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

GARBAGE = "Hmm, hard to tell from here."


def judge_reply(prompt: str) -> str:
    """What a perfectly consistent judge says to one of the packaged judge prompts."""
    if "Answer A:" in prompt:
        a = re.search(r"^Answer A: (.*)$", prompt, re.M).group(1)
        b = re.search(r"^Answer B: (.*)$", prompt, re.M).group(1)
        return "A" if a <= b else "B"
    if '"Score: N"' in prompt:
        answer = re.search(r"^Answer: (.*)$", prompt, re.M).group(1)
        return f"Score: {len(answer) % 5 + 1}"
    answers = re.findall(r"^Answer (\d+): (.*)$", prompt, re.M)
    if answers:
        return ", ".join(number for number, text in sorted(answers, key=lambda x: x[1]))
    return f"Echo: {prompt[:40]}"


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a slow reply still sleeping must not hold up shutdown
    request_queue_size = 128  # the default backlog of 5 resets concurrent connections


class FakeJudgeServer:
    def __init__(self, seed: int = 0, rate_limit: float = 0.0, server_error: float = 0.0, slow: float = 0.0,
                 garbage: float = 0.0, slow_s: float = 2.5, model: str = "judge-model-2024-05-13",
                 reject_auth: bool = False):
        self.seed = seed
        self.rates = [("429", rate_limit), ("500", server_error), ("slow", slow), ("garbage", garbage)]
        self.slow_s = slow_s  # past the judge tests' client timeout (1 s), with a margin for a loaded machine
        self.model = model
        self.reject_auth = reject_auth  # answer 401, echoing the Authorization header like some servers do
        self.lock = threading.Lock()
        self.requests = 0
        self.hits: Counter = Counter()  # prompt -> requests received
        self.answered: Counter = Counter()  # prompt -> prompt answered in time (200, ok or garbage)
        self.faults: Counter = Counter()  # fault kind -> count
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.handle(self, body)

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> "FakeJudgeServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def hits_for(self, text: str) -> int:
        """Requests whose prompt contains `text` (e.g. a question)."""
        with self.lock:
            return sum(n for prompt, n in self.hits.items() if text in prompt)

    def _fault(self, prompt: str, attempt: int) -> str:
        draw = random.Random(f"{self.seed}|{attempt}|{prompt}").random()
        for kind, rate in self.rates:
            if draw < rate:
                return kind
            draw -= rate
        return "ok"

    def handle(self, handler: BaseHTTPRequestHandler, body: dict) -> None:
        prompt = body["messages"][-1]["content"]
        with self.lock:
            self.requests += 1
            self.bodies.append(body)
            self.headers.append(dict(handler.headers))
            attempt = self.hits[prompt]
            self.hits[prompt] += 1
        if self.reject_auth:
            message = f"Incorrect API key provided: {handler.headers.get('Authorization', '')}"
            return self._send(handler, 401, {"error": {"message": message, "type": "invalid_request_error"}})
        fault = self._fault(prompt, attempt)
        with self.lock:
            self.faults[fault] += 1
            if fault in ("ok", "garbage"):
                self.answered[prompt] += 1
        if fault == "429":
            return self._send(handler, 429, {"error": {"message": "Rate limit reached", "type": "rate_limit_error"}},
                              {"Retry-After": "0"})
        if fault == "500":
            return self._send(handler, 500, {"error": {"message": "The server had an error", "type": "server_error"}})
        if fault == "slow":
            time.sleep(self.slow_s)
        text = GARBAGE if fault == "garbage" else judge_reply(prompt)
        self._send(handler, 200, {
            "id": f"chatcmpl-{attempt}", "object": "chat.completion", "created": int(time.time()), "model": self.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        })

    @staticmethod
    def _send(handler, status: int, payload: dict, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode()
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                handler.send_header(k, v)
            handler.end_headers()
            handler.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up on a slow reply
