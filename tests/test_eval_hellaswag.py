"""HellaSwag: real completion-style scoring on hand-written examples in the dataset's jsonl schema, matching a
one-row-at-a-time reference; atomic download into the cache; one-line errors for bad files and tokenizers."""

from __future__ import annotations

import functools
import http.server
import json
import threading

import pytest
import torch
from conftest import model_entries

from gpt2 import checkpoint
from gpt2.errors import UserError
from gpt2.eval import hellaswag
from gpt2.model import GPT, GPTConfig
from gpt2.tokenizer import CharTokenizer, GPT2Tokenizer

# (ctx, endings, label): hand-written, in the spirit of ActivityNet/WikiHow contexts.
EXAMPLES = [
    (
        "A man is standing in a kitchen holding a knife. He",
        [
            "slices the tomato on the board.",
            "jumps into a swimming pool.",
            "plays the violin loudly.",
            "drives a red truck away.",
        ],
        0,
    ),
    (
        "A woman kneels by a bicycle with a flat tire. She",
        [
            "eats a sandwich quickly.",
            "removes the wheel and patches the tube.",
            "sings to the audience.",
            "paints the fence blue.",
        ],
        1,
    ),
    (
        "Two kids are building a sandcastle on the beach. They",
        [
            "file their taxes online.",
            "repair the car engine.",
            "dig a moat around the castle with a shovel.",
            "bake bread in an oven.",
        ],
        2,
    ),
    (
        "A dog runs across the park after a ball. The dog",
        [
            "writes a letter to the mayor.",
            "knits a wool sweater.",
            "solves a crossword puzzle.",
            "catches the ball and brings it back.",
        ],
        3,
    ),
    # The right ending is long: its summed loss is the largest, its mean loss the smallest (acc != acc_norm).
    (
        "A chef is plating food in a busy restaurant. The chef",
        [
            "arranges the fish carefully on the warm plate "
            "and adds sauce, herbs and lemon before the waiter takes it out.",
            "sleeps.",
            "leaves.",
            "yawns.",
        ],
        0,
    ),
]


def write_jsonl(path, examples=EXAMPLES) -> None:
    """The real file's schema: ind, activity_label, ctx_a, ctx_b, ctx, split, split_type, label, endings, source_id."""
    with open(path, "w") as f:
        for i, (ctx, endings, label) in enumerate(examples):
            a, _, b = ctx.rpartition(". ")
            f.write(
                json.dumps(
                    {
                        "ind": i,
                        "activity_label": "Test",
                        "ctx_a": a + ".",
                        "ctx_b": b,
                        "ctx": ctx,
                        "split": "val",
                        "split_type": "indomain",
                        "label": label,
                        "endings": endings,
                        "source_id": f"test~{i}",
                    }
                )
                + "\n"
            )


def unigram_model(favoured: set[int], disfavoured: set[int], vocab_size: int = 50257) -> GPT:
    """A real GPT whose blocks add nothing and whose final LayerNorm outputs a constant: its next-token
    distribution is one unigram table, the logits of `favoured` tokens raised by 3 and `disfavoured` lowered."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=64, vocab_size=vocab_size))
    with torch.no_grad():
        for block in model.transformer.h:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                proj.weight.zero_()
                proj.bias.zero_()
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(torch.eye(8)[0])  # every position's hidden state is e_0
        wte = model.transformer.wte.weight
        wte[:, 0] = 0.0
        wte[sorted(favoured), 0] = 3.0
        wte[sorted(disfavoured), 0] = -3.0
    return model.eval()


@pytest.fixture(scope="module")
def tok() -> GPT2Tokenizer:
    return GPT2Tokenizer()


@pytest.fixture(scope="module")
def examples(tmp_path_factory) -> list[hellaswag.Example]:
    path = tmp_path_factory.mktemp("hs") / "hellaswag_val.jsonl"
    write_jsonl(path)
    return hellaswag.read_examples(path)


@pytest.fixture(scope="module")
def model(tok, examples) -> GPT:
    right = {t for ex in examples for t in tok.encode(" " + ex.endings[ex.label])}
    wrong = {t for ex in examples for i, e in enumerate(ex.endings) if i != ex.label for t in tok.encode(" " + e)}
    return unigram_model(right, wrong - right)


@torch.no_grad()
def reference_losses(model: GPT, tok, ex: hellaswag.Example) -> tuple[list[float], list[float]]:
    """One forward pass per ending, the context masked with -1 targets: (summed, mean) ending loss."""
    ctx = tok.encode(ex.ctx)
    sums, means = [], []
    for ending in ex.endings:
        end = tok.encode(" " + ending)
        row = torch.tensor(ctx + end)
        y = row[1:].clone()
        y[: len(ctx) - 1] = -1
        _, loss = model(row[:-1][None], y[None])
        means.append(loss.item())
        sums.append(loss.item() * len(end))
    return sums, means


def test_examples_are_read_from_the_real_schema(examples):
    assert len(examples) == 5
    assert examples[1].label == 1 and examples[1].ctx.startswith("A woman") and len(examples[1].endings) == 4


def test_a_model_that_prefers_the_right_endings_scores_1(model, tok, examples):
    result = hellaswag.evaluate(model, tok, examples, "cpu", torch.float32, batch_size=2)
    assert result["acc_norm"] == 1.0 and result["n"] == 5 and result["correct_norm"] == 5
    # acc (summed loss) favours short endings: it must miss the last example, whose right ending is long.
    picks = [min(range(4), key=reference_losses(model, tok, ex)[0].__getitem__) for ex in examples]
    assert picks[-1] != examples[-1].label
    assert result["correct"] == sum(p == ex.label for p, ex in zip(picks, examples)) < 5


def test_batched_padded_scoring_equals_one_row_at_a_time(tok, examples):
    torch.manual_seed(1)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=64, vocab_size=tok.vocab_size)).eval()
    correct = correct_norm = 0
    for ex in examples:
        sums, means = reference_losses(model, tok, ex)
        rows = hellaswag._rows(ex, tok, max_len=65)
        got_sum, got_mean = hellaswag.ending_losses(model, rows, torch.device("cpu"), torch.float32)
        torch.testing.assert_close(got_sum, torch.tensor(sums), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_mean, torch.tensor(means), rtol=1e-5, atol=1e-5)
        correct += int(min(range(4), key=sums.__getitem__) == ex.label)
        correct_norm += int(min(range(4), key=means.__getitem__) == ex.label)
    result = hellaswag.evaluate(model, tok, examples, "cpu", torch.float32, batch_size=3)
    assert (result["correct"], result["correct_norm"]) == (correct, correct_norm)


def test_ranks_score_disjoint_examples_that_sum_to_the_whole(model, tok, examples):
    whole = hellaswag.evaluate(model, tok, examples, "cpu", torch.float32)
    parts = [hellaswag.evaluate(model, tok, examples, "cpu", torch.float32, rank=r, world_size=2) for r in (0, 1)]
    assert [p["n"] for p in parts] == [3, 2]
    for key in ("correct", "correct_norm", "n"):
        assert sum(p[key] for p in parts) == whole[key]
    assert hellaswag.all_reduce(whole, "cpu") == whole  # no process group: unchanged


def test_every_rank_runs_the_same_number_of_forward_passes(model, tok, examples):
    calls = []
    hook = model.register_forward_hook(lambda *args: calls.append(1))
    try:
        counts = []
        for rank in range(4):  # 5 examples over 4 ranks, batch 1: ranks get 2, 1, 1, 1 examples
            calls.clear()
            hellaswag.evaluate(model, tok, examples, "cpu", torch.float32, rank=rank, world_size=4, batch_size=1)
            counts.append(len(calls))
    finally:
        hook.remove()
    assert counts == [2, 2, 2, 2]  # FSDP's forward is a collective: no rank may skip one


def test_long_contexts_are_cut_from_the_left(tok):
    ex = hellaswag.Example(ctx="word " * 200, endings=["yes it is.", "no."], label=0)
    rows = hellaswag._rows(ex, tok, max_len=33)
    assert all(len(r) == 33 for r, _ in rows)
    assert [r[-n:] for r, n in rows] == [tok.encode(" yes it is."), tok.encode(" no.")]


def test_cli_on_a_local_file(model, tok, tmp_path, capsys):
    from gpt2.eval.__main__ import main

    write_jsonl(tmp_path / "hs.jsonl")
    checkpoint.save(tmp_path / "run" / "ckpt.pt", {**model_entries(model), "tokenizer": tok.to_dict(), "config": {}})
    result = main(
        [
            "hellaswag",
            f"checkpoint={tmp_path / 'run'}",
            f"hellaswag.path={tmp_path / 'hs.jsonl'}",
            "limit=4",
            "device=cpu",
            "dtype=float32",
        ]
    )
    expected = hellaswag.evaluate(model, tok, hellaswag.read_examples(tmp_path / "hs.jsonl", limit=4))
    assert result == expected and result["n"] == 4 and result["acc_norm"] == 1.0
    assert "acc_norm 1.0000" in capsys.readouterr().out


def _serve(directory):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_download_once_into_the_cache(tmp_path):
    (tmp_path / "www").mkdir()
    write_jsonl(tmp_path / "www" / "hellaswag_val.jsonl")
    server = _serve(tmp_path / "www")
    url = f"http://127.0.0.1:{server.server_address[1]}/hellaswag_val.jsonl"
    try:
        got = hellaswag.load_examples(limit=3, cache_dir=tmp_path / "cache", url=url)
    finally:
        server.shutdown()
        server.server_close()
    assert len(got) == 3 and got[2].label == 2
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["hellaswag_val.jsonl"]  # no temp left
    again = hellaswag.load_examples(cache_dir=tmp_path / "cache", url=url)  # server gone: the cache is used
    assert len(again) == 5


def test_download_failure_says_where_to_put_the_file(tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match=f"put it at {cache / 'hellaswag_val.jsonl'}, or pass path="):
        hellaswag.load_examples(cache_dir=cache, url="http://127.0.0.1:9/hellaswag_val.jsonl")
    assert not any(cache.iterdir())  # nothing half-written


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"ctx": "a", "endings": ["b", "c"], "label": 0', "not valid JSON"),
        ('{"ctx": "a", "label": 0}', "missing endings"),
        ('{"ctx": "a", "endings": ["b", "c"], "label": 5}', "label must be an integer index"),
        ('{"ctx": "a", "endings": "b", "label": 0}', "endings must be a list"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_malformed_lines_name_the_file_and_line(tmp_path, line, message):
    path = tmp_path / "hs.jsonl"
    write_jsonl(path, EXAMPLES[:2])
    with open(path, "a") as f:
        f.write("\n" + line + "\n")
    with pytest.raises(UserError, match=f"{path}:4: {message}"):
        hellaswag.read_examples(path)


def test_cli_errors_are_one_line(tmp_path, capsys):
    from gpt2.eval.__main__ import main

    chars = CharTokenizer.from_text("abc .\n")
    torch.manual_seed(0)
    char_model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=16, vocab_size=chars.vocab_size))
    checkpoint.save(
        tmp_path / "char" / "ckpt.pt", {**model_entries(char_model), "tokenizer": chars.to_dict(), "config": {}}
    )
    write_jsonl(tmp_path / "hs.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    cases = [
        ([f"checkpoint={tmp_path / 'char'}", f"path={tmp_path / 'hs.jsonl'}"], "needs a model with the gpt2 tokenizer"),
        ([f"checkpoint={tmp_path / 'char'}", f"path={tmp_path / 'nope.jsonl'}"], "does not exist"),
        ([f"checkpoint={tmp_path / 'char'}", f"path={tmp_path / 'empty.jsonl'}"], "holds no examples"),
        ([f"checkpoint={tmp_path / 'char'}", "limit=0"], "limit must be >= 1"),
        ([f"path={tmp_path / 'hs.jsonl'}"], "no model to evaluate"),
        (["init_from=gpt2", "hellaswag.pth=x"], "unknown key 'pth'"),
    ]
    for args, message in cases:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            main(["hellaswag", *args, "device=cpu"])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and err.count("\n") == 1, (args, err)


def _rank_worker(rank: int, world_size: int, init_file: str, jsonl: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        tok = GPT2Tokenizer()
        examples = hellaswag.read_examples(jsonl)
        right = {t for ex in examples for t in tok.encode(" " + ex.endings[ex.label])}
        model = unigram_model(right, set())
        result = hellaswag.all_reduce(
            hellaswag.evaluate(model, tok, examples, "cpu", torch.float32, rank, world_size, batch_size=2), "cpu"
        )
        result["metrics"] = hellaswag.training_metrics(
            model, tok, examples, "cpu", torch.float32, rank, world_size, batch_size=3
        )
        if rank == 0:
            with open(out, "w") as f:
                json.dump(result, f)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # ~17 s: two spawned processes import torch
def test_two_gloo_ranks_all_reduce_to_the_single_process_result(tmp_path, tok, examples):
    import torch.multiprocessing as mp

    write_jsonl(tmp_path / "hs.jsonl")
    mp.spawn(
        _rank_worker,
        args=(2, str(tmp_path / "init"), str(tmp_path / "hs.jsonl"), str(tmp_path / "r.json")),
        nprocs=2,
        join=True,
    )
    right = {t for ex in examples for t in tok.encode(" " + ex.endings[ex.label])}
    expected = hellaswag.evaluate(unigram_model(right, set()), tok, examples, "cpu", torch.float32)
    got = json.loads((tmp_path / "r.json").read_text())
    assert got.pop("metrics") == {"hellaswag_acc": expected["acc"], "hellaswag_acc_norm": expected["acc_norm"]}
    assert got == expected and expected["n"] == 5


def _downloading_rank(rank: int, local_ranks: list[int], init_file: str, jsonl: str, out: str) -> None:
    """A rank whose node is its local rank's: it caches HellaSwag in out/node<rank - local rank>/, downloading
    through a stand-in that copies `jsonl` and counts."""
    import os
    import shutil
    from pathlib import Path
    from types import SimpleNamespace

    from gpt2.config import EvalConfig
    from gpt2.distributed import DistInfo

    os.environ["XDG_CACHE_HOME"] = f"{out}/node{rank - local_ranks[rank]}"
    downloads = []

    def download(url: str, dest: Path) -> Path:
        downloads.append(url)
        dest.parent.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy(jsonl, dest))

    hellaswag.download = download
    world_size = len(local_ranks)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        info = DistInfo(rank=rank, world_size=world_size, local_rank=local_ranks[rank])
        examples = hellaswag.examples_for_training(EvalConfig(hellaswag_interval=1), SimpleNamespace(name="gpt2"), info)
        with open(f"{out}/r.{rank}", "w") as f:
            json.dump({"downloads": len(downloads), "examples": len(examples)}, f)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # ~15 s: twice three spawned processes
@pytest.mark.parametrize(
    "local_ranks, downloads", [([0, 1, 2], [1, 0, 0]), ([0, 0, 1], [1, 1, 0])], ids=["one-node", "two-node-caches"]
)
def test_hellaswag_for_training_is_downloaded_once_per_cache(tmp_path, local_ranks, downloads):
    """Rank 0 downloads first; then the first rank of each other node, if its (node-local) cache still lacks the
    file; no two ranks of a node download it (two-node-caches: ranks 1 and 2 are the second node)."""
    import torch.multiprocessing as mp

    write_jsonl(tmp_path / "hs.jsonl")
    args = (local_ranks, str(tmp_path / "init"), str(tmp_path / "hs.jsonl"), str(tmp_path))
    mp.spawn(_downloading_rank, args=args, nprocs=len(local_ranks), join=True)
    results = [json.loads((tmp_path / f"r.{rank}").read_text()) for rank in range(len(local_ranks))]
    assert results == [{"downloads": n, "examples": 5} for n in downloads]
