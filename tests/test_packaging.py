"""A new user's install paths: `make install` picks the right PyTorch build, and a wheel (not an editable
install) carries everything the console scripts need to run from any directory with no network."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import ROOT

FAKE_PYTHON = """#!/bin/sh
# A stand-in interpreter: records pip calls, answers whether torch imports, makes a venv of itself.
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then mkdir -p "$3/bin" && cp "$0" "$3/bin/python" && exit 0; fi
if [ "$1" = "-c" ]; then [ -n "$HAS_TORCH" ] && exit 0 || exit 1; fi
echo "$*" >> "$PIP_LOG"
"""


@pytest.mark.e2e
@pytest.mark.parametrize("machine", ["no gpu", "nvidia gpu", "torch already there"])
def test_make_install_picks_the_pytorch_build_for_the_machine(tmp_path, machine):
    fake = tmp_path / "python3"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    tools = tmp_path / "tools"  # PATH: only what the recipe runs, plus nvidia-smi on a GPU machine
    tools.mkdir()
    for tool in ("touch", "mkdir", "cp"):
        (tools / tool).symlink_to(shutil.which(tool))
    if machine == "nvidia gpu":
        (tools / "nvidia-smi").symlink_to(shutil.which("true"))
    env = {"PATH": str(tools), "PIP_LOG": str(tmp_path / "pip.log"), "HOME": str(tmp_path)}
    if machine == "torch already there":
        env["HAS_TORCH"] = "1"
    r = subprocess.run(
        [shutil.which("make"), "-C", str(ROOT), "install", f"VENV={tmp_path / 'venv'}", f"PYTHON={fake}"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    calls = (tmp_path / "pip.log").read_text().splitlines()
    torch_install = {
        "no gpu": ["-m pip install -q torch --index-url https://download.pytorch.org/whl/cpu"],
        "nvidia gpu": ["-m pip install -q torch"],
        "torch already there": [],
    }[machine]
    assert calls == ["-m pip install -q --upgrade pip", *torch_install, "-m pip install -q -e .[dev]"]
    assert (tmp_path / "venv" / ".installed").exists()


def offline_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """No network for the process (proxies at a dead port, offline hubs), no tiktoken cache, no ../shared."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TIKTOKEN", "PYTHONPATH"))}
    dead = "http://127.0.0.1:9"
    env.update(
        http_proxy=dead,
        https_proxy=dead,
        HTTP_PROXY=dead,
        HTTPS_PROXY=dead,
        ALL_PROXY=dead,
        no_proxy="",
        NO_PROXY="",
        TIKTOKEN_CACHE_DIR=str(tmp_path / "empty-tiktoken-cache"),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HOME=str(tmp_path / "home"),
        **extra,
    )
    return env


@pytest.mark.e2e
@pytest.mark.slow
def test_wheel_install_runs_the_console_scripts_from_anywhere_offline(tmp_path):
    src = tmp_path / "src"  # the tree as a fresh clone has it (build outputs stay out of the checkout)
    tracked = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    for rel in tracked:
        if (ROOT / rel).is_symlink() or (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel, follow_symlinks=False)
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", str(src), "-w", str(wheels)],
        check=True,
        cwd=tmp_path,
        env=offline_env(tmp_path),
    )
    wheel = next(wheels.glob("gpt2-*.whl"))
    subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
        check=True,
        cwd=tmp_path,
        env=offline_env(tmp_path),
    )

    work = tmp_path / "elsewhere"  # not the checkout: nothing but the wheel to find configs and assets in
    work.mkdir()
    env = offline_env(tmp_path, PYTHONPATH=str(site))

    def script(name: str, *args: str) -> subprocess.CompletedProcess:
        r = subprocess.run(
            [str(site / "bin" / name), *args], cwd=work, env=env, capture_output=True, text=True, timeout=300
        )
        assert r.returncode == 0, f"{name} {' '.join(args)}:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
        return r

    where = subprocess.run(
        [sys.executable, "-c", "import gpt2; print(gpt2.__file__)"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert where.startswith(str(site))
    assert "train:" in script("gpt2-train", "--cfg", "job").stdout
    script("gpt2-prepare", "data=shakespeare")  # GPT-2 BPE from the wheel's own vocabulary files
    script("gpt2-prepare", "data=shakespeare_char")
    script(
        "gpt2-train",
        "experiment=shakespeare_char_cpu",
        "train.max_iters=20",
        "train.eval_interval=10",
        "train.eval_iters=2",
    )
    r = script(
        "gpt2-sample",
        "checkpoint=out/shakespeare_char_cpu",
        "prompt=ROMEO, my lord:",
        "max_new_tokens=20",
        "stream=false",
    )
    assert r.stdout.startswith("ROMEO, my lord:")
    assert (work / "data" / "shakespeare" / "meta.json").exists()
    script("gpt2-export", "checkpoint=out/shakespeare_char_cpu", "out_dir=exported")
    assert (work / "exported" / "model.safetensors").exists()
    serve = subprocess.Popen(
        [str(site / "bin" / "gpt2-serve"), "checkpoint=out/shakespeare_char_cpu", "port=0"],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = re.search(r"http://[\d.]+:\d+", serve.stdout.readline()).group(0)
        with httpx.Client(trust_env=False) as client:  # the environment's proxies are dead on purpose
            for _ in range(100):
                try:
                    page = client.get(url + "/")
                    break
                except httpx.TransportError:
                    time.sleep(0.1)
            assert "gpt2 playground" in page.text  # the page ships in the wheel
            reply = client.post(url + "/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 5}, timeout=60)
            assert reply.status_code == 200 and reply.json()["choices"][0]["finish_reason"] == "length"
    finally:
        serve.terminate()
        serve.wait(timeout=30)


def test_the_torch_floor_covers_the_apis_the_code_calls():
    import re

    import torch
    from packaging.version import Version

    floor = re.search(r'"torch>=([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    introduced = {
        "optim.Muon": "2.9",
        "nn.utils.get_total_norm": "2.6",
        "nn.utils.clip_grads_with_norm_": "2.6",
        "distributed.fsdp.fully_shard": "2.6",
    }
    for api, version in introduced.items():
        obj = torch
        for part in api.split("."):
            obj = getattr(obj, part) if hasattr(obj, part) else __import__(f"{obj.__name__}.{part}", fromlist=["x"])
        assert Version(floor) >= Version(version), f"torch.{api} needs torch>={version}, pyproject allows {floor}"
