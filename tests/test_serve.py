"""`python -m gpt2.serve` end to end on a tiny GPT-2-tokenizer checkpoint: the official `openai` client
(completions, streaming, n > 1, prompt lists), curl, a load test of concurrent clients with every response
checked, errors (400 naming the field, 404, 503 with Retry-After), a client that leaves mid-stream, SIGTERM
while streaming, a port in use, and the playground page in headless Chromium. Greedy text from the server
equals sample.py's (temperature=0) for the same prompt."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
from conftest import ROOT, save_checkpoint
from omegaconf import OmegaConf

from gpt2.sampling import run as sample_run
from gpt2.tokenizer import GPT2Tokenizer

os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"
PROMPTS = ["Hello", "The quick brown fox jumps over", "A", "Once upon a time, in a land far away, there lived"]


class Server:
    """A `python -m gpt2.serve` subprocess on a free port; its output is collected by a thread."""

    def __init__(self, checkpoint: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gpt2.serve",
                f"checkpoint={checkpoint}",
                "port=0",
                "device=cpu",
                "dtype=float32",
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
        )
        first = self.proc.stdout.readline()
        match = re.search(r"http://[\d.]+:\d+", first)
        assert match, first + self.proc.stdout.read()
        self.url = match.group(0)
        self.output = [first]
        threading.Thread(target=lambda: self.output.extend(self.proc.stdout), daemon=True).start()
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0)
        for _ in range(100):  # uvicorn starts after the line above
            try:
                httpx.get(self.url + "/health", timeout=1)
                return
            except httpx.TransportError:
                time.sleep(0.1)

    def post(self, **body) -> httpx.Response:
        return httpx.post(self.url + "/v1/completions", json=body, timeout=30)

    def stop(self) -> int:
        """SIGTERM; returns the exit status (uvicorn re-raises the signal once it has shut down: -SIGTERM)."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("serve_run"), GPT2Tokenizer(), block_size=64)


@pytest.fixture(scope="module")
def server(checkpoint):
    s = Server(checkpoint, "batch_size=4", "max_waiting=256", "prefill_chunk=5")  # prompts over 5 tokens: chunked
    yield s
    assert s.stop() == -signal.SIGTERM, "".join(s.output)
    assert "Traceback" not in "".join(s.output)


@pytest.fixture(scope="module")
def greedy(checkpoint) -> dict[str, str]:
    """What `sample.py temperature=0 max_new_tokens=20` prints for each prompt (in process)."""
    return {
        p: sample_run(
            OmegaConf.create(
                {
                    "checkpoint": str(checkpoint),
                    "device": "cpu",
                    "prompt": p,
                    "temperature": 0.0,
                    "max_new_tokens": 20,
                    "stream": False,
                }
            )
        )[0]
        for p in PROMPTS
    }


@pytest.mark.e2e
def test_models_and_health(server):
    assert [m.id for m in server.client.models.list().data] == ["serve_run0"]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == "serve_run0"


@pytest.mark.e2e
def test_openai_client_greedy_equals_sample_py(server, greedy):
    reply = server.client.completions.create(model="serve_run0", prompt=PROMPTS, max_tokens=20, temperature=0)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert [c.text for c in reply.choices] == [greedy[p] for p in PROMPTS]
    assert all(c.finish_reason == "length" for c in reply.choices)
    assert reply.usage.completion_tokens == 80 and reply.usage.prompt_tokens == sum(
        len(GPT2Tokenizer().encode(p)) for p in PROMPTS
    )


@pytest.mark.e2e
def test_openai_client_streaming_and_n(server, greedy):
    pieces: dict[int, str] = {}
    chunks = server.client.completions.create(
        model="serve_run0", prompt=PROMPTS[1], max_tokens=20, temperature=0, stream=True, n=2
    )
    reasons = {}
    for chunk in chunks:
        for choice in chunk.choices:
            pieces[choice.index] = pieces.get(choice.index, "") + choice.text
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    assert pieces == {0: greedy[PROMPTS[1]], 1: greedy[PROMPTS[1]]} and reasons == {0: "length", 1: "length"}


@pytest.mark.e2e
def test_seeded_sampling_is_reproducible_and_choices_differ(server):
    def ask(seed: int) -> list[str]:
        reply = server.client.completions.create(
            model="serve_run0", prompt="Hello", max_tokens=12, temperature=1.0, n=3, seed=seed, extra_body={"top_k": 50}
        )
        return [c.text for c in reply.choices]

    first = ask(7)
    assert first == ask(7) and first != ask(8)
    assert len(set(first)) == 3


@pytest.mark.e2e
def test_stop_strings_and_echo(server, greedy):
    full = greedy[PROMPTS[0]]
    stop = full[5:8]
    cut = server.client.completions.create(
        model="serve_run0", prompt=PROMPTS[0], max_tokens=20, temperature=0, stop=[stop], echo=True
    ).choices[0]
    assert cut.text == PROMPTS[0] + full[: full.index(stop)] and cut.finish_reason == "stop"


@pytest.mark.e2e
def test_curl_streams_server_sent_events(server, greedy):
    body = json.dumps(
        {
            "model": "serve_run0",
            "prompt": PROMPTS[2],
            "max_tokens": 20,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    out = subprocess.run(
        [
            "curl",
            "-sN",
            "--noproxy",
            "*",
            server.url + "/v1/completions",
            "-H",
            "Content-Type: application/json",
            "-d",
            body,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    events = [line.removeprefix("data: ") for line in out.stdout.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["text"] for chunk in chunks for c in chunk["choices"]) == greedy[PROMPTS[2]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 20


@pytest.mark.e2e
@pytest.mark.parametrize(
    "body, status, param, message",
    [
        ({"prompt": "x", "temperature": 3}, 400, "temperature", "less than or equal to 2"),
        ({"prompt": "x", "top_p": 0}, 400, "top_p", "top_p: must be in (0, 1], got 0"),
        ({"prompt": "x", "top_k": -1}, 400, "top_k", "top_k: must be >= 0"),
        ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens", "greater than or equal to 0"),
        ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens", "max_tokens=0 scores the prompt without generating"),
        (
            {"prompt": " word" * 50, "max_tokens": 20},
            400,
            "prompt",
            "This model's maximum context length is 64 tokens, however you requested 70 tokens (50 in your prompt; "
            "20 for the completion)",
        ),
        ({"prompt": [[1], [2, 50257]]}, 400, "prompt[1]", "token id 50257 is not in the vocabulary [0, 50257)"),
        ({"prompt": [1, "a"]}, 400, "prompt", "must be a string, a list of strings, a list of token ids or a list"),
        ({"prompt": [[1], []]}, 400, "prompt", "(none empty)"),
        ({"prompt": "x", "seed": 2**64}, 400, "seed", "less than 18446744073709551616"),
        ({"prompt": "x", "presence_penalty": 3}, 400, "presence_penalty", "must be in [-2, 2]"),
        ({"prompt": "x", "n": 0}, 400, "n", "greater than or equal to 1"),
        ({"prompt": []}, 400, "prompt", "give at least one prompt"),
        ({"max_tokens": 3}, 400, "prompt", "Field required"),
        ({"prompt": "x", "logprobs": 6}, 400, "logprobs", "less than or equal to 5"),
        ({"prompt": "x", "logit_bias": {"1": 2}}, 400, "logit_bias", "not supported by this server"),
        ({"prompt": "x", "best_of": 2}, 400, "best_of", "not supported by this server"),
        ({"prompt": "x", "file": "/etc/passwd"}, 400, "file", "unknown field"),
        ({"prompt": "x", "model": "gpt-4"}, 404, "model", "the model 'gpt-4' does not exist"),
        ({"prompt": ["x"] * 3, "n": 100}, 400, "n", "3 prompts x n=100 is 300 sequences, more than this server"),
        ({"prompt": "x" * (9 << 20)}, 413, None, "the request body must be at most 8 MiB"),
    ],
)
def test_bad_requests_get_an_error_naming_the_field_and_the_server_keeps_serving(server, body, status, param, message):
    reply = server.post(**body)
    assert reply.status_code == status
    error = reply.json()["error"]
    assert message in error["message"] and error["param"] == param
    assert server.post(prompt="x", max_tokens=2).status_code == 200


@pytest.mark.e2e
def test_null_sampling_fields_take_openais_defaults(server):
    body = {"max_tokens": None, "temperature": None, "top_p": None, "presence_penalty": None, "seed": None}
    reply = server.post(prompt="Hello", **body)
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] <= 16
    reply = httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert reply.status_code == 400 and "no chat template" in reply.json()["error"]["message"]


@pytest.mark.e2e
def test_a_prompt_over_the_context_is_400_unless_the_request_truncates(server):
    reply = server.post(prompt=" word" * 100, max_tokens=5, temperature=0)  # 100 tokens, block_size 64
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "context_length_exceeded"
    reply = server.post(prompt=" word" * 100, max_tokens=5, temperature=0, truncate=True)
    assert reply.status_code == 200 and reply.json()["usage"] == {
        "prompt_tokens": 59,  # the tail that leaves room for the 5 tokens
        "completion_tokens": 5,
        "total_tokens": 64,
    }
    reply = server.post(prompt="Hello", max_tokens=200, temperature=0, truncate=True, n=2)  # slides past 64
    assert reply.status_code == 200 and reply.json()["usage"] == {
        "prompt_tokens": 1,  # each prompt once, whatever n
        "completion_tokens": 400,
        "total_tokens": 401,
    }


@pytest.mark.e2e
def test_any_number_of_stops_and_a_chunked_body_over_the_cap(server, greedy):
    text = greedy[PROMPTS[1]]
    stops = [f"never{i}" for i in range(20)] + [text[5:8]]
    reply = server.post(prompt=PROMPTS[1], max_tokens=20, temperature=0, stop=stops)
    assert reply.json()["choices"][0]["text"] == text[: text.index(text[5:8])]

    def chunks():  # no Content-Length: the body arrives chunked
        yield b'{"prompt": "'
        for _ in range(9):
            yield b"x" * (1 << 20)
        yield b'"}'

    reply = httpx.post(server.url + "/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert reply.status_code == 413 and "at most 8 MiB" in reply.json()["error"]["message"]


@pytest.mark.e2e
def test_a_body_that_is_not_json_is_400(server):
    reply = httpx.post(server.url + "/v1/completions", content=b"{nope", headers={"Content-Type": "application/json"})
    assert reply.status_code == 400 and reply.json()["error"]["message"] == "the request body is not valid JSON"


@pytest.mark.e2e
def test_the_openai_client_raises_on_a_bad_request(server):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        server.client.completions.create(model="serve_run0", prompt="x", temperature=-1)


@pytest.mark.e2e
def test_load_test_every_response_checked(server, greedy):
    """64 requests over 8 concurrent clients (a 4-row batch: requests join and leave it), each checked."""

    def one(i: int) -> bool:
        prompt = PROMPTS[i % len(PROMPTS)]
        if i % 2:
            reply = server.client.completions.create(model="serve_run0", prompt=prompt, max_tokens=20, temperature=0)
            return reply.choices[0].text == greedy[prompt]
        stream = server.client.completions.create(
            model="serve_run0", prompt=prompt, max_tokens=20, temperature=0, stream=True
        )
        return "".join(c.choices[0].text for c in stream) == greedy[prompt]

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(one, range(64)))
    assert httpx.get(server.url + "/health").json()["running"] == 0


@pytest.mark.e2e
def test_a_client_that_leaves_mid_stream_frees_its_row(server):
    body = {"prompt": "Hello", "max_tokens": 1000, "temperature": 1.0, "stream": True, "truncate": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as reply:
        lines = reply.iter_lines()
        assert next(lines).startswith("data: ")
        assert httpx.get(server.url + "/health").json()["running"] == 1
    for _ in range(50):
        if httpx.get(server.url + "/health").json()["running"] == 0:
            break
        time.sleep(0.1)
    assert httpx.get(server.url + "/health").json()["running"] == 0


@pytest.mark.e2e
def test_a_client_that_leaves_a_request_that_is_not_streamed_frees_its_row(server):
    body = {"prompt": "Hello", "max_tokens": 100000, "temperature": 1.0, "truncate": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=1)
    for _ in range(50):
        if httpx.get(server.url + "/health").json()["running"] == 0:
            break
        time.sleep(0.1)
    assert httpx.get(server.url + "/health").json()["running"] == 0


def test_a_full_queue_answers_503_with_retry_after(checkpoint):
    """In process: a scheduler that is not started never takes rows, so the queue fills deterministically."""
    from fastapi.testclient import TestClient

    from gpt2.sampling import Sampler
    from gpt2.serve.api import create_app
    from gpt2.serve.scheduler import Scheduler

    scheduler = Scheduler(Sampler.from_checkpoint(checkpoint, device="cpu"), rows=1, max_waiting=2)
    client = TestClient(create_app(scheduler, "tiny", max_tokens=16))
    scheduler.waiting.extend([None, None])  # two rows already wait
    reply = client.post("/v1/completions", json={"prompt": "x"})
    assert reply.status_code == 503 and reply.headers["Retry-After"] == "1"
    assert "server busy" in reply.json()["error"]["message"]


def test_a_long_prompt_is_prefilled_in_chunks_between_the_running_streams_steps(checkpoint):
    """In process, the scheduler alone: while a 60-token prompt is prefilled 4 tokens at a time, the running
    stream gets a token after every chunk (with one whole prefill it would get none until the prompt is in)."""
    from gpt2.config import SamplingParams
    from gpt2.sampling import Sampler, TextStream
    from gpt2.serve.scheduler import Job, Row, Scheduler

    sampler = Sampler.from_checkpoint(checkpoint, device="cpu")
    scheduler = Scheduler(sampler, rows=2, max_waiting=2, prefill_chunk=4)
    events = []

    def job(name: str, ids: list[int], max_tokens: int) -> Job:
        job = Job(loop=None)
        job.emit = lambda event: events.append((name, event))  # in the scheduler's thread, in its order
        params, stream = SamplingParams(temperature=0.0), TextStream(sampler.tokenizer, [])
        job.rows.append(Row(job, 0, ids, params, sampler.new_generator(0), stream, max_tokens, logprobs=0))
        return job

    scheduler.start()
    try:
        scheduler.submit(job("running", sampler.tokenizer.encode("Hello"), 50))
        while len(events) < 2:
            time.sleep(0.01)
        submitted = len(events)
        scheduler.submit(job("long", list(range(100, 160)), 1))
        while not any(name == "long" for name, _ in events):
            time.sleep(0.01)
    finally:
        scheduler.stop()
    first_long = next(i for i, (name, _) in enumerate(events) if name == "long")
    assert all(name == "running" for name, _ in events[submitted:first_long])
    assert first_long - submitted >= 60 // 4 - 1  # one step after each chunk but the last
    assert [e.finish_reason for name, e in events if name == "long"] == ["length"]


def test_the_listening_socket_gives_connections_tcp_nodelay():
    """Without TCP_NODELAY every reply on a kept-alive connection (headers and body written apart) waited ~40 ms
    for the client's delayed ACK; asyncio sets it only on accepted sockets that say they are TCP."""
    import asyncio
    import socket

    from gpt2.serve.cli import listen

    sock = listen("127.0.0.1", 0)

    async def accepted_nodelay() -> int:
        accepted = asyncio.get_running_loop().create_future()

        class Accept(asyncio.Protocol):
            def connection_made(self, transport):
                accepted.set_result(
                    transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                )

        server = await asyncio.get_running_loop().create_server(Accept, sock=sock)
        _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
        try:
            return await asyncio.wait_for(accepted, 10)
        finally:
            writer.close()
            server.close()

    assert asyncio.run(accepted_nodelay()) != 0


@pytest.mark.e2e
def test_sigterm_lets_a_streaming_request_finish_then_exits(checkpoint):
    server = Server(checkpoint)
    body = {"prompt": "Hello", "max_tokens": 60, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as reply:
        lines = reply.iter_lines()
        next(lines)
        server.proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"
    assert server.proc.wait(timeout=30) == -signal.SIGTERM  # shut down, then died of the signal, as uvicorn does
    assert "Finished server process" in "".join(server.output)


@pytest.mark.e2e
def test_port_in_use_and_bad_keys_are_one_line_exit_2(server, checkpoint):
    port = server.url.rsplit(":", 1)[1]
    for args, message in (
        ([f"port={port}"], f"cannot listen on 127.0.0.1:{port} (Address already in use)"),
        (["max_waiting=0"], "max_waiting must be >= 1"),
    ):
        r = subprocess.run(
            [sys.executable, "-m", "gpt2.serve", f"checkpoint={checkpoint}", "device=cpu", *args],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.e2e
@pytest.mark.slow
def test_playground_page_streams_a_completion_in_headless_chromium(server, greedy, tmp_path):
    if chromium() is None:
        if os.environ.get("CI"):
            pytest.fail("CI needs Chromium for this test (.ci/run installs it)")
        pytest.skip("no Chromium on this machine (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(server.url + "/")
        assert page.locator("#model").text_content() == "serve_run0"
        page.fill("#prompt", PROMPTS[3])
        page.fill("#max_tokens", "20")
        page.fill("#temperature", "0")
        page.click("#generate")
        page.wait_for_selector("#output[data-done=true]", timeout=30_000)
        page.screenshot(path=str(tmp_path / "playground.png"))
        assert page.locator("#completion").text_content() == greedy[PROMPTS[3]]
        assert page.locator("#status").text_content() == ""
        browser.close()
    assert (tmp_path / "playground.png").stat().st_size > 10_000


@pytest.mark.e2e
def test_readme_serving_examples_run_as_written(server, capsys):
    """The README's curl and openai-client examples, pointed at this server and its model name."""
    section = (ROOT / "README.md").read_text().split("## Serving")[1].split("\n## ")[0]

    def here(code: str) -> str:
        return code.replace("http://127.0.0.1:8000", server.url).replace("shakespeare_char_cpu", "serve_run0")

    curl = re.findall(r"```bash\n(curl .*?)```", section, flags=re.S)[0]
    out = subprocess.run(
        ["bash", "-c", here(curl).replace("curl ", "curl -sN --noproxy '*' ", 1)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and out.stdout.rstrip().endswith("data: [DONE]"), out.stdout + out.stderr
    code = re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]
    scope: dict = {}
    exec(here(code), scope)
    assert len(scope["reply"].choices) == 4 and len(capsys.readouterr().out) > 10


# ---------------------------------------------------------------------------------------------------------- scoring


@pytest.fixture(scope="module")
def reference(checkpoint):
    """The checkpoint's model in fp32, for log-probabilities computed directly."""
    from gpt2.loading import load_checkpoint

    return load_checkpoint(checkpoint).model


def log_softmax_of(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))
    return torch.log_softmax(logits[0].float(), dim=-1)


@pytest.mark.e2e
def test_echo_logprobs_score_token_id_prompts_as_the_model_does(server, reference):
    tok = GPT2Tokenizer()
    prompts = [tok.encode(PROMPTS[1]), tok.encode(PROMPTS[3])]
    reply = server.post(prompt=prompts, max_tokens=1, logprobs=3, echo=True, temperature=0).json()
    assert reply["usage"] == {"prompt_tokens": 19, "completion_tokens": 2, "total_tokens": 21}
    for choice, ids in zip(reply["choices"], prompts):
        logprobs = log_softmax_of(reference, ids)
        scores = choice["logprobs"]
        assert len(scores["tokens"]) == len(ids) + 1 and scores["token_logprobs"][0] is None
        assert scores["top_logprobs"][0] is None
        expected = logprobs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        assert torch.allclose(torch.tensor(scores["token_logprobs"][1 : len(ids)]), expected, atol=1e-4)
        generated = int(logprobs[-1].argmax())  # greedy: the most likely next token, scored by its logits
        assert abs(scores["token_logprobs"][-1] - float(logprobs[-1, generated])) < 1e-4
        top = logprobs[-1].topk(3)
        assert list(scores["top_logprobs"][-1]) == [tok.decode([i]) for i in top.indices.tolist()]
        assert torch.allclose(torch.tensor(list(scores["top_logprobs"][-1].values())), top.values, atol=1e-4)
        assert choice["text"] == tok.decode(ids + [generated])
        pieces = [tok.decode([i]) for i in ids + [generated]]
        assert scores["tokens"] == pieces
        assert scores["text_offset"] == [sum(len(p) for p in pieces[:i]) for i in range(len(pieces))]


@pytest.mark.e2e
def test_max_tokens_0_with_echo_scores_without_generating_and_logprobs_follow_a_completion(server, reference, greedy):
    reply = server.post(prompt=PROMPTS[0], max_tokens=0, echo=True, logprobs=0).json()
    choice = reply["choices"][0]
    assert choice["text"] == PROMPTS[0] and choice["finish_reason"] == "length"
    assert reply["usage"]["completion_tokens"] == 0 and len(choice["logprobs"]["tokens"]) == 1
    reply = server.post(prompt=PROMPTS[1], max_tokens=5, logprobs=1, temperature=0).json()
    choice = reply["choices"][0]
    assert choice["text"] == GPT2Tokenizer().decode(GPT2Tokenizer().encode(greedy[PROMPTS[1]])[:5])
    ids = GPT2Tokenizer().encode(PROMPTS[1] + choice["text"])
    expected = log_softmax_of(reference, ids)[torch.arange(len(ids) - 6, len(ids) - 1), torch.tensor(ids[-5:])]
    assert torch.allclose(torch.tensor(choice["logprobs"]["token_logprobs"]), expected, atol=1e-4)
    assert choice["logprobs"]["text_offset"][0] == len(PROMPTS[1])  # offsets into prompt + completion
    streamed = server.client.completions.create(
        model="serve_run0", prompt=PROMPTS[1], max_tokens=5, logprobs=1, temperature=0, stream=True
    )
    pieces = [c.choices[0].logprobs.token_logprobs for c in streamed if c.choices and c.choices[0].logprobs]
    assert torch.allclose(torch.tensor(sum(pieces, [])), expected, atol=1e-4)


@pytest.mark.e2e
def test_tokenize_detokenize_and_tokenizer_info(server):
    tok = GPT2Tokenizer()
    reply = httpx.post(server.url + "/tokenize", json={"prompt": PROMPTS[3], "add_special_tokens": False}).json()
    assert reply == {"tokens": tok.encode(PROMPTS[3]), "count": 13, "max_model_len": 64}
    assert httpx.post(server.url + "/detokenize", json={"tokens": reply["tokens"]}).json() == {"prompt": PROMPTS[3]}
    info = httpx.get(server.url + "/tokenizer_info").json()
    assert info["eos_token"] == "<|endoftext|>" and info["eos_token_id"] == 50256 and info["chat_template"] is None
    bad = httpx.post(server.url + "/detokenize", json={"tokens": [1, -1]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    bad = httpx.post(server.url + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]})
    assert bad.status_code == 400 and "no chat template" in bad.json()["error"]["message"]


@pytest.mark.e2e
def test_penalties_are_the_samplers(server, checkpoint):
    from gpt2.sampling import Sampler

    sampler = Sampler.from_checkpoint(checkpoint, device="cpu", dtype="float32")
    settings = {"presence_penalty": 0.5, "frequency_penalty": 1.5, "repetition_penalty": 1.3}
    expected = sampler.generate(PROMPTS[1], max_new_tokens=20, temperature=0, **settings)[0]
    reply = server.post(prompt=PROMPTS[1], max_tokens=20, temperature=0, **settings).json()
    assert reply["choices"][0]["text"] == expected
    plain = server.post(prompt=PROMPTS[1], max_tokens=20, temperature=0).json()["choices"][0]["text"]
    assert expected != plain


@pytest.mark.e2e
@pytest.mark.slow
def test_lm_evaluation_harness_through_the_server_equals_its_hf_model_on_the_export(server, checkpoint, tmp_path):
    """lm-evaluation-harness's `local-completions` model with its defaults (token-id prompts, the server's own
    tokenizer through /tokenize) on a local multiple-choice and a local generate_until task: per-choice
    log-likelihoods within 1e-3 of its `hf` model on the HF export, and the same greedy generations."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from gpt2.config import ExportConfig
    from gpt2.export import run as export

    rows = [
        {"question": "The capital of France is", "choices": [" Paris", " London", " a city of lights"], "answer": 0},
        {"question": "One plus one is", "choices": [" two", " three"], "answer": 0},
        {"question": "Once upon a time", "choices": [" there", " in a land far away"], "answer": 1},
    ]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = (
        f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'rows.jsonl'}\n"
        'test_split: test\ndoc_to_text: "{{question}}"\n'
    )
    (tmp_path / "mc.yaml").write_text(
        f"task: tiny_mc\n{common}output_type: multiple_choice\n"
        'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n'
    )
    (tmp_path / "gen.yaml").write_text(
        f"task: tiny_gen\n{common}output_type: generate_until\n"
        'doc_to_target: "{{choices[answer]}}"\ngeneration_kwargs:\n  until: ["\\n\\n", "."]\n'
        "  max_gen_toks: 8\n  do_sample: false\nmetric_list:\n  - metric: exact_match\n"
    )
    export(ExportConfig(checkpoint=str(checkpoint), out_dir=str(tmp_path / "hf")))
    tasks = TaskManager(include_path=str(tmp_path))

    def evaluate(model: str, model_args: str) -> dict:
        results = lm_eval.simple_evaluate(
            model=model, model_args=model_args, tasks=["tiny_mc", "tiny_gen"], task_manager=tasks, log_samples=True
        )
        return {task: [s["resps"] for s in results["samples"][task]] for task in ("tiny_mc", "tiny_gen")}

    served = evaluate("local-completions", f"base_url={server.url}/v1/completions,model=serve_run0,max_length=64")
    hf = evaluate("hf", f"pretrained={tmp_path / 'hf'},device=cpu,dtype=float32,max_length=64")
    assert served["tiny_gen"] == hf["tiny_gen"]
    flat = [(a[0][0], b[0][0]) for doc_a, doc_b in zip(served["tiny_mc"], hf["tiny_mc"]) for a, b in zip(doc_a, doc_b)]
    assert len(flat) == 7 and all(abs(a - b) < 1e-3 for a, b in flat), flat
