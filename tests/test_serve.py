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
    s = Server(checkpoint, "batch_size=4", "max_waiting=256")
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
        ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens", "greater than or equal to 1"),
        ({"prompt": "x", "max_tokens": 5000}, 400, "max_tokens", "max_tokens must be <= 1024"),
        ({"prompt": "x", "n": 0}, 400, "n", "greater than or equal to 1"),
        ({"prompt": []}, 400, "prompt", "give at least one prompt"),
        ({"max_tokens": 3}, 400, "prompt", "Field required"),
        ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4 stop sequences"),
        ({"prompt": "x", "logprobs": 2}, 400, "logprobs", "not supported by this server"),
        ({"prompt": "x", "logit_bias": {"1": 2}}, 400, None, "logit_bias is not supported"),
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
def test_a_prompt_longer_than_the_context_keeps_its_tail_with_a_warning(server):
    reply = server.post(prompt=" word" * 100, max_tokens=5, temperature=0)  # 100 tokens, block_size 64
    assert reply.status_code == 200 and reply.json()["usage"]["prompt_tokens"] == 59
    time.sleep(0.2)
    assert "the prompt has 100 tokens, more than the model's context of 64; keeping its last 59" in "".join(
        server.output
    )


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
    body = {"prompt": "Hello", "max_tokens": 1000, "temperature": 1.0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as reply:
        lines = reply.iter_lines()
        assert next(lines).startswith("data: ")
        assert httpx.get(server.url + "/health").json()["running"] == 1
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
