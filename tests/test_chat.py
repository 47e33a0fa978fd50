"""Chat end to end: the one template (gpt2.chat) in its two notations against transformers' `apply_chat_template`;
a tiny model fine-tuned on the shipped chat rows records it in its checkpoint and exports it (HF, GGUF); the
server's /v1/chat/completions through the official `openai` client (streamed and not), equal to the greedy reply
of the same prompt; `sample.py mode=chat` with its history and Ctrl-C; a model without a template refused."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from conftest import ROOT, TINY, save_checkpoint, trainer

from gpt2.chat import CHAT_TEMPLATE, chat_segments, merge_segments, render
from gpt2.tokenizer import GPT2Tokenizer

os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"
EOT = 50256
CONVERSATIONS = [
    [{"role": "user", "content": "Name one metal."}, {"role": "assistant", "content": "Iron."}],
    [
        {"role": "system", "content": "Be brief. "},
        {"role": "user", "content": "Hi  there\n"},
        {"role": "assistant", "content": "\nHello!  "},
        {"role": "assistant", "content": "x"},
        {"role": "user", "content": "ü 42?"},
        {"role": "assistant", "content": " 1,000 ... ok"},
    ],
    [{"role": "system", "content": "s"}, {"role": "assistant", "content": "I start."}],
    [{"role": "user", "content": "a\n\n"}, {"role": "assistant", "content": "'s done"}],
]


def training_tokens(messages: list[dict]) -> list[int]:
    """A chat's tokens as data preparation writes them."""
    tok = GPT2Tokenizer()
    return [
        t
        for s in merge_segments(chat_segments(messages, "messages", "row"))
        for t in tok.encode(s.text) + ([EOT] if s.eot else [])
    ]


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from gpt2.export import write_gpt2_tokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    write_gpt2_tokenizer(folder, 64, CHAT_TEMPLATE)
    return AutoTokenizer.from_pretrained(folder)


def hf_ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_training_tokens_prompts_and_apply_chat_template_agree(messages, hf_tokenizer):
    tok = GPT2Tokenizer()
    trained = training_tokens(messages)
    assert trained == hf_ids(hf_tokenizer, messages, add_generation_prompt=False)
    assert tok.decode(trained) == render(CHAT_TEMPLATE, messages).removesuffix("Assistant:")
    last_user = max(i for i, m in enumerate(messages) if m["role"] != "assistant") + 1
    prompt = tok.encode_rendered(render(CHAT_TEMPLATE, messages[:last_user]))  # what the server feeds the model
    assert prompt == hf_ids(hf_tokenizer, messages[:last_user], add_generation_prompt=True)
    assert trained[: len(prompt)] == prompt  # the reply continues the prompt token for token


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory) -> Path:
    """A tiny model fine-tuned on the shipped chat rows (gpt2/assets/style/sft.jsonl)."""
    from gpt2.config import DataConfig
    from gpt2.data.prepare import prepare
    from gpt2.resources import ASSETS_DIR

    root = tmp_path_factory.mktemp("chat")
    source = str(ASSETS_DIR / "style" / "sft.jsonl")
    data = prepare(DataConfig(name="chat", builder="instructions", source=source), data_root=root)
    run = root / "run"
    overrides = (*TINY, "model.block_size=64", "train.max_iters=30", "train.eval_interval=30", "optim.lr=3e-3")
    trainer(f"data.name={data}", f"out_dir={run}", *overrides).fit()
    return run


def test_a_chat_run_records_its_template_and_exports_it(chat_run, tmp_path):
    import gguf
    from transformers import AutoTokenizer

    from gpt2.checkpoint import load
    from gpt2.config import ExportConfig
    from gpt2.export import run as export

    assert load(chat_run)["chat_template"] == CHAT_TEMPLATE
    export(ExportConfig(checkpoint=str(chat_run), out_dir=str(tmp_path / "hf")))
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_ids(hf, CONVERSATIONS[1], add_generation_prompt=False) == training_tokens(CONVERSATIONS[1])
    export(ExportConfig(checkpoint=str(chat_run), out_dir=str(tmp_path / "gguf"), format="gguf"))
    field = gguf.GGUFReader(tmp_path / "gguf" / "model.gguf").fields["tokenizer.chat_template"]
    assert bytes(field.parts[field.data[0]]).decode() == CHAT_TEMPLATE
    from gpt2.loading import load_hf

    assert load_hf(str(tmp_path / "hf")).chat_template == CHAT_TEMPLATE  # the export reads back with it


def greedy_reply(run: Path, messages: list[dict], max_new_tokens: int) -> str:
    from gpt2.sampling import Sampler

    sampler = Sampler.from_checkpoint(run, device="cpu", dtype="float32")
    ids = sampler.encode_chat(messages)
    text = "".join(p for _, p in sampler.stream_rows([ids], temperature=0, max_new_tokens=max_new_tokens))
    return text.removeprefix(" ")


class ChatServer:
    def __init__(self, checkpoint: Path) -> None:
        command = [sys.executable, "-m", "gpt2.serve", f"checkpoint={checkpoint}", "port=0", "device=cpu"]
        self.proc = subprocess.Popen(
            [*command, "dtype=float32"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT
        )
        first = self.proc.stdout.readline()
        self.url = first.split(" on ")[1].split(" ")[0]
        for _ in range(100):
            try:
                httpx.get(self.url + "/health", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0)

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.communicate(timeout=30)[0]


@pytest.mark.e2e
def test_chat_completions_with_the_openai_client(chat_run, tmp_path):
    messages = [{"role": "system", "content": "Answer."}, {"role": "user", "content": "Name one metal."}]
    expected = greedy_reply(chat_run, messages, 12)
    server = ChatServer(chat_run)
    try:
        reply = server.client.chat.completions.create(
            model="run", messages=messages, max_tokens=12, temperature=0, n=2, logprobs=True, top_logprobs=2
        )
        assert [c.message.content for c in reply.choices] == [expected, expected]
        assert reply.choices[0].message.role == "assistant" and reply.object == "chat.completion"
        content = reply.choices[0].logprobs.content
        assert len(content) == reply.usage.completion_tokens // 2 and all(len(t.top_logprobs) == 2 for t in content)
        assert all(t.logprob == t.top_logprobs[0].logprob for t in content)  # greedy: each token the best
        stream = server.client.chat.completions.create(
            model="run", messages=messages, max_tokens=12, temperature=0, stream=True
        )
        chunks = list(stream)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        tokenized = httpx.post(server.url + "/tokenize", json={"messages": messages}).json()["tokens"]
        assert tokenized == GPT2Tokenizer().encode_rendered(render(CHAT_TEMPLATE, messages))
        section = (ROOT / "README.md").read_text().split("## Serving")[1].split("\n## ")[0]
        example = [code for code in re.findall(r"```python\n(.*?)```", section, flags=re.S) if "chat." in code][0]
        scope: dict = {}
        exec(example.replace("http://127.0.0.1:8000", server.url).replace("mychat", "run"), scope)  # as written
        assert scope["reply"].choices[0].message.content
        bad = httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages.0.role"
    finally:
        output = server.stop()
    assert "Traceback" not in output


@pytest.mark.e2e
def test_a_model_without_a_chat_template_is_refused(tmp_path):
    from fastapi.testclient import TestClient

    from gpt2.sampling import Sampler
    from gpt2.serve.api import create_app
    from gpt2.serve.scheduler import Scheduler

    checkpoint = save_checkpoint(tmp_path / "base", GPT2Tokenizer(), block_size=32)
    app = create_app(Scheduler(Sampler.from_checkpoint(checkpoint, device="cpu"), rows=1, max_waiting=2), "base", None)
    reply = TestClient(app).post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "messages"
    assert reply.json()["error"]["message"].startswith("this model has no chat template")
    chat = subprocess.run(
        [sys.executable, "sample.py", f"checkpoint={checkpoint}", "mode=chat", "device=cpu"],
        input="hi\n",
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert chat.returncode != 0 and "no chat template" in chat.stderr and "Traceback" not in chat.stderr


@pytest.mark.e2e
@pytest.mark.slow
def test_sample_py_chat_keeps_the_history_and_ctrl_c_stops_only_the_reply(chat_run):
    first = [{"role": "user", "content": "Name one metal."}]
    reply = greedy_reply(chat_run, first, 12)
    second = [*first, {"role": "assistant", "content": reply}, {"role": "user", "content": "Name one fruit."}]
    # fp32, as greedy_reply: where bf16 is the CPU's default dtype its greedy replies may differ at near ties
    command = [sys.executable, "sample.py", f"checkpoint={chat_run}", "mode=chat", "device=cpu", "dtype=float32"]
    command.append("temperature=0")
    done = subprocess.run(
        [*command, "max_new_tokens=12"],
        input="Name one metal.\nName one fruit.\n",
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("> ")[1:3] == [reply + "\n", greedy_reply(chat_run, second, 12) + "\n"]

    proc = subprocess.Popen(
        [*command, "max_new_tokens=1000000", "ignore_eot=true"],
        # Ctrl-C as a terminal gives it, even when this test runs where SIGINT is ignored (a background job's
        # children inherit that, and Python then never raises KeyboardInterrupt)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    proc.stdin.write("Name one metal.\n")
    proc.stdin.flush()
    proc.stdout.read(12)  # the prompt and the reply's first characters: it is generating
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate("/exit\n", timeout=60)
    assert proc.returncode == 0, err
    assert "[stopped]" in out and "Traceback" not in err


def test_chat_mode_keys_are_checked():
    from gpt2.config import SampleConfig
    from gpt2.errors import UserError

    with pytest.raises(UserError, match="mode='talk' is not valid; choose generate or chat"):
        SampleConfig(init_from="gpt2", mode="talk")
    with pytest.raises(UserError, match="mode=chat reads the conversation from the terminal"):
        SampleConfig(init_from="gpt2", mode="chat", prompt="hi")


def test_the_template_renders_a_chat_and_its_generation_prompt():
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    assert render(CHAT_TEMPLATE, messages) == "S\n\nUser: Q\nAssistant:"
    answered = [*messages, {"role": "assistant", "content": "A"}]
    assert render(CHAT_TEMPLATE, answered) == "S\n\nUser: Q\nAssistant: A<|endoftext|>Assistant:"
    assert json.loads(json.dumps(CHAT_TEMPLATE)) == CHAT_TEMPLATE


@pytest.mark.e2e
@pytest.mark.slow
def test_the_playground_chat_tab_keeps_the_history_in_headless_chromium(chat_run, tmp_path):
    browser_path = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser_path is None:
        if os.environ.get("CI"):
            pytest.fail("CI needs Chromium for this test (.ci/run installs it)")
        pytest.skip("no Chromium on this machine (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    first = [{"role": "user", "content": "Name one metal."}]
    reply = greedy_reply(chat_run, first, 12)
    second = [*first, {"role": "assistant", "content": reply}, {"role": "user", "content": "Name one fruit."}]
    server = ChatServer(chat_run)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(server.url + "/")
            page.click("#tab-chat")
            page.fill("#max_tokens", "12")
            page.fill("#temperature", "0")
            for message in ("Name one metal.", "Name one fruit."):
                page.fill("#message", message)
                page.click("#send")
                page.wait_for_selector("#chat-log[data-done=true]", timeout=30_000)
            page.screenshot(path=str(tmp_path / "chat.png"))
            replies = page.locator("#chat-log .assistant").all_text_contents()
            assert replies == [reply, greedy_reply(chat_run, second, 12)]
            assert page.locator("#status").text_content() == ""
            browser.close()
    finally:
        server.stop()
