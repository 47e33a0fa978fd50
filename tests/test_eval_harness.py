"""`python -m gpt2.eval harness`: lm-evaluation-harness tasks on one of our checkpoints. A local multiple-choice
task's accuracy equals the one computed from the model's own log-likelihoods; a task whose dataset is not cached
offline is one line naming it; bad keys are one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, env, save_checkpoint

from gpt2.tokenizer import GPT2Tokenizer

ROWS = [
    {"question": "The capital of France is", "choices": [" Paris", " London", " a city of lights"], "answer": 0},
    {"question": "One plus one is", "choices": [" two", " three"], "answer": 0},
    {"question": "Once upon a time", "choices": [" there", " in a land far away"], "answer": 1},
    {"question": "Water is", "choices": [" wet", " dry", " blue and cold"], "answer": 2},
]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (folder / "mc.yaml").write_text(
        f"task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'rows.jsonl'}\n"
        'test_split: test\noutput_type: multiple_choice\ndoc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n'
    )
    return folder


def accuracy_from_log_likelihoods(model) -> float:
    tok = GPT2Tokenizer()
    right = 0
    for row in ROWS:
        scores = []
        for choice in row["choices"]:
            context, continuation = tok.encode(row["question"]), tok.encode(choice)
            ids = torch.tensor([context + continuation])
            with torch.no_grad():
                logprobs = torch.log_softmax(model(ids[:, :-1])[0][0].float(), dim=-1)
            targets = ids[0, len(context) :]
            scores.append(float(logprobs[len(context) - 1 :].gather(1, targets[:, None]).sum()))
        right += max(range(len(scores)), key=scores.__getitem__) == row["answer"]
    return right / len(ROWS)


@pytest.mark.e2e
@pytest.mark.slow
def test_a_local_task_scores_as_the_models_own_log_likelihoods(task_dir, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    from gpt2.eval.__main__ import main
    from gpt2.loading import load_checkpoint

    run = save_checkpoint(tmp_path / "run", GPT2Tokenizer(), block_size=64)
    result = main(["harness", f"checkpoint={run}", "tasks=tiny_mc", f"include_path={task_dir}", "device=cpu"])
    assert result["results"]["tiny_mc"]["acc,none"] == accuracy_from_log_likelihoods(load_checkpoint(run).model)
    assert "tiny_mc" in capsys.readouterr().out
    written = json.loads((run / "harness_tiny_mc.json").read_text())
    assert written["results"]["tiny_mc"]["acc,none"] == result["results"]["tiny_mc"]["acc,none"]


@pytest.mark.e2e
@pytest.mark.parametrize(
    "args, message",
    [
        pytest.param(
            ["tasks=arc_easy", "limit=2"],
            "is not in the Hugging Face datasets cache and cannot be downloaded here",
            marks=pytest.mark.slow,
        ),
        pytest.param(["tasks=no_such_task"], "unknown harness task(s): no_such_task", marks=pytest.mark.slow),
        ([], "give the tasks to run: tasks=hellaswag,arc_easy"),
        (["tasks=arc_easy", "dtype=int8"], "dtype='int8' is not valid"),
    ],
)
def test_bad_harness_commands_are_one_line(tmp_path, args, message):
    pytest.importorskip("lm_eval")
    run = save_checkpoint(tmp_path / "run", GPT2Tokenizer(), block_size=64)
    command = [sys.executable, "-m", "gpt2.eval", "harness", f"checkpoint={run}", "device=cpu", *args]
    offline = env(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=offline, timeout=300)
    assert out.returncode != 0 and message in out.stderr and "Traceback" not in out.stderr, out.stderr
