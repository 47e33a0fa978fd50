"""Data preparation: built-in counts, custom corpora of every file type, splits, shards, atomicity, the CLI."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, SHAKESPEARE
from hydra import compose, initialize_config_dir

from gpt2.data import open_dataset, sources
from gpt2.data import prepare as prepare_mod
from gpt2.data.dataset import BUILTIN
from gpt2.data.prepare import run
from gpt2.errors import UserError
from gpt2.resources import CONFIG_DIR

EOT = 50256


def prepare(data_root, *overrides: str):
    """Compose configs/prepare.yaml with `overrides` (as the CLI does) and run it."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("prepare", overrides=[f"data_root={data_root}", *overrides])
    return run(cfg)


def all_tokens(ds, split: str) -> np.ndarray:
    return np.concatenate([np.asarray(ds.tokens(s)) for s in ds.shards(split)]).astype(np.int64)


def gpt2_enc():
    from gpt2.tokenizer import gpt2_encoding

    return gpt2_encoding()


def test_shakespeare_char_counts_match_nanogpt(tmp_path):
    ds = open_dataset(str(prepare(tmp_path, "data=shakespeare_char")))
    assert (ds.num_tokens("train"), ds.num_tokens("val")) == (1_003_854, 111_540)
    assert ds.vocab_size == 65 and ds.meta["tokenizer"]["name"] == "char"
    text = SHAKESPEARE.read_text()
    assert ds.tokenizer.decode(all_tokens(ds, "train").tolist()) == text[:1_003_854]
    assert ds.tokenizer.decode(all_tokens(ds, "val").tolist()) == text[1_003_854:]


def test_shakespeare_gpt2_counts_match_nanogpt_plus_one_eot_per_split(tmp_path):
    ds = open_dataset(str(prepare(tmp_path, "data=shakespeare")))
    train, val = all_tokens(ds, "train"), all_tokens(ds, "val")
    assert (len(train), len(val)) == (301_966 + 1, 36_059 + 1)
    assert train[-1] == EOT and val[-1] == EOT
    text = SHAKESPEARE.read_text()
    n = int(len(text) * 0.9)
    assert train[:-1].tolist() == gpt2_enc().encode_ordinary(text[:n])
    assert val[:-1].tolist() == gpt2_enc().encode_ordinary(text[n:])


def make_corpus(root):
    """A folder of every kind of file: rows (.jsonl/.json/.parquet), text of any extension (or none), and files
    to skip (binary, not UTF-8, empty, hidden); returns the documents in preparation order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir()
    (root / "sub").mkdir()
    docs = {}
    docs["a.txt"] = ["First text file.\nTwo lines."]
    (root / "a.txt").write_text(docs["a.txt"][0])
    docs["b.jsonl"] = ["jsonl one", "jsonl <|endoftext|> two", "jsonl three"]
    (root / "b.jsonl").write_text(
        "".join(json.dumps({"text": t, "id": i}) + "\n\n" for i, t in enumerate(docs["b.jsonl"]))
    )
    docs["c.json"] = ["json list item", "json string item"]
    (root / "c.json").write_text(json.dumps([{"text": docs["c.json"][0]}, docs["c.json"][1]]))
    docs["d.parquet"] = ["parquet row one", "parquet row two"]
    pq.write_table(pa.table({"text": docs["d.parquet"], "n": [1, 2]}), root / "d.parquet")
    docs["f.csv"] = ["a,csv,document\n"]
    (root / "f.csv").write_text(docs["f.csv"][0])
    docs["sub/e.md"] = ["# Markdown\n\nin a subfolder"]
    (root / "sub" / "e.md").write_text(docs["sub/e.md"][0])
    docs["sub/g.py"] = ["def f():\n    return 'python'\n"]
    (root / "sub" / "g.py").write_text(docs["sub/g.py"][0])
    docs["LICENSE"] = ["no extension at all"]
    (root / "LICENSE").write_text(docs["LICENSE"][0])
    (root / "img.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (root / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    (root / "empty.txt").write_text("  \n")
    (root / ".git").mkdir()
    (root / ".git" / "config").write_text("[core]\n")
    return [t for name in sorted(docs) for t in docs[name]]


def test_custom_folder_of_every_type_prepares_and_loads(tmp_path, capsys):
    from gpt2.data import TokenLoader

    docs = make_corpus(tmp_path / "corpus")
    prepare(tmp_path, "data=text", "data.name=mine", f"data.source={tmp_path / 'corpus'}", "data.val_fraction=0")
    out = capsys.readouterr().out
    assert "skipped 3 files: 1 empty (empty.txt), 1 binary (img.png), 1 not UTF-8 (latin1.txt)" in out, out
    ds = open_dataset("mine", data_root=tmp_path)
    enc = gpt2_enc()
    # Every document once, in order (files sorted by path), each ending with EOT; "<|endoftext|>" inside a
    # document is text, never a separator.
    assert all_tokens(ds, "train").tolist() == [t for d in docs for t in enc.encode_ordinary(d) + [EOT]]
    assert ds.meta["splits"]["train"]["documents"] == len(docs) == 12 and ds.num_tokens("val") == 0
    x, y, _ = TokenLoader(ds, "train", batch_size=2, block_size=4).next_batch()
    assert x.shape == y.shape == (2, 4) and x.dtype == y.dtype == __import__("torch").int64
    with pytest.raises(UserError, match="val split of .* is empty.*data.val_fraction > 0"):
        TokenLoader(ds, "val", batch_size=2, block_size=4)


def test_few_documents_are_each_split_by_characters(tmp_path):
    corpus = tmp_path / "books"
    corpus.mkdir()
    books = [f"Book {i}.\n" + "It was a dark and stormy night. " * (50 + 30 * i) for i in range(3)]
    for i, book in enumerate(books):
        (corpus / f"book{i}.txt").write_text(book)
    ds = open_dataset(str(prepare(tmp_path, "data=text", "data.name=books", f"data.source={corpus}")))
    enc = gpt2_enc()
    cuts = [int(len(b) * 0.9) for b in books]
    assert all_tokens(ds, "train").tolist() == [
        t for b, c in zip(books, cuts) for t in enc.encode_ordinary(b[:c]) + [EOT]
    ]
    assert all_tokens(ds, "val").tolist() == [
        t for b, c in zip(books, cuts) for t in enc.encode_ordinary(b[c:]) + [EOT]
    ]


def test_glob_val_source_and_seeded_split(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(200):
        (corpus / f"doc{i:02d}.txt").write_text(f"document number {i}")
    (corpus / "held.jsonl").write_text(json.dumps({"body": "held out"}) + "\n")

    def val_docs(name, *extra):
        ds = open_dataset(str(prepare(tmp_path, "data=text", f"data.name={name}", *extra)))
        return gpt2_enc().decode(all_tokens(ds, "val").tolist()).split("<|endoftext|>")[:-1], ds

    a, ds = val_docs("a", f"data.source={corpus}/doc*.txt", "data.seed=1")
    monkeypatch.setattr(prepare_mod, "BATCH_PIECES", 7)  # many batches in flight: the same output
    b, ds_b = val_docs("b", f"data.source={corpus}/doc*.txt", "data.seed=1")
    np.testing.assert_array_equal(all_tokens(ds, "train"), all_tokens(ds_b, "train"))
    c, _ = val_docs("c", f"data.source={corpus}/doc*.txt", "data.seed=2")
    assert len(a) == 20 and a == b and a != c  # 10% of 200 whole documents, the same for a seed
    assert ds.meta["splits"]["train"]["documents"] == 180
    v, ds = val_docs(
        "v", f"data.source={corpus}/doc*.txt", f"data.val_source={corpus}/held.jsonl", "data.text_field=body"
    )
    assert v == ["held out"] and ds.meta["splits"]["train"]["documents"] == 200


def test_small_shards_and_small_pieces_give_the_same_tokens(tmp_path, monkeypatch):
    ref = open_dataset(str(prepare(tmp_path, "data=shakespeare")))
    # Many shards, and the text file read in ~1k-character pieces cut at safe newlines.
    monkeypatch.setattr(sources, "PIECE_CHARS", 1000)
    ds = open_dataset(
        str(prepare(tmp_path, "data=text", "data.name=small", "data.shard_tokens=10000", f"data.source={SHAKESPEARE}"))
    )
    assert len(ds.shards("train")) == 31 and len(ds.shards("val")) == 4
    assert all(s.tokens == 10000 for s in ds.shards("train")[:-1])
    assert [s.path.name for s in ds.shards("val")] == [f"val_{i:06d}.bin" for i in range(4)]
    for split in ("train", "val"):
        np.testing.assert_array_equal(all_tokens(ds, split), all_tokens(ref, split))


def test_safe_cut_only_between_non_space_characters():
    assert sources._safe_cut("ab\ncd\n\nef") == len("ab\n")
    assert sources._safe_cut("ab \ncd") == 0 and sources._safe_cut("ab\n cd") == 0
    assert sources._safe_cut("x\ny z\nw") == len("x\ny z\n")


def test_local_hf_dataset_and_hf_stream_first_shard_is_val(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    hub = tmp_path / "hub_ds"
    hub.mkdir()
    texts = [f"row {i} " + "word " * (i % 7) for i in range(600)]
    pq.write_table(pa.table({"text": texts}), hub / "train.parquet")
    ds = open_dataset(str(prepare(tmp_path, "data=text", "data.name=hf", f"data.source=hf:{hub}")))
    assert ds.meta["splits"]["val"]["documents"] == 60 and ds.meta["splits"]["train"]["documents"] == 540

    ds = open_dataset(
        str(
            prepare(
                tmp_path,
                "data=fineweb_edu",
                "data.name=stream",
                f"data.source=hf:{hub}",
                "data.subset=null",
                "data.shard_tokens=1025",
            )
        )
    )
    stream = np.array([t for text in texts for t in gpt2_enc().encode_ordinary(text) + [EOT]])
    assert ds.num_tokens("val") == 1025 and len(ds.shards("val")) == 1 and len(ds.shards("train")) == 4
    np.testing.assert_array_equal(all_tokens(ds, "val"), stream[:1025])
    np.testing.assert_array_equal(all_tokens(ds, "train"), stream[1025:])


def test_prepared_dataset_is_skipped_unless_overwrite(tmp_path, capsys):
    out = prepare(tmp_path, "data=shakespeare_char")
    stamp = json.loads((out / "meta.json").read_text())["prepared_at"]
    (out / "train_000000.bin").touch()
    prepare(tmp_path, "data=shakespeare_char")
    assert "already prepared" in capsys.readouterr().out
    assert json.loads((out / "meta.json").read_text())["prepared_at"] == stamp
    prepare(tmp_path, "data=shakespeare_char", "overwrite=true", "data.shard_tokens=600000")
    assert sorted(p.name for p in out.glob("*.bin")) == ["train_000000.bin", "train_000001.bin", "val_000000.bin"]


def test_interrupted_preparation_is_detected_and_rebuilt(tmp_path, monkeypatch):
    real_write = prepare_mod.ShardWriter.write

    def write_then_die(self, tokens):
        real_write(self, tokens[: len(tokens) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_mod.ShardWriter, "write", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path, "data=shakespeare_char", "data.shard_tokens=100000")
    out = tmp_path / "shakespeare_char"
    assert not (out / "meta.json").exists() and not list(out.glob("*.bin")) and not (out / ".gpt2-staging").exists()
    with pytest.raises(UserError, match="preparation was interrupted.*python data/prepare.py data=shakespeare_char"):
        open_dataset("shakespeare_char", data_root=tmp_path)
    monkeypatch.undo()
    prepare(tmp_path, "data=shakespeare_char")
    assert open_dataset("shakespeare_char", data_root=tmp_path).num_tokens("train") == 1_003_854
    assert sorted(p.name for p in out.glob("*.bin")) == ["train_000000.bin", "val_000000.bin"]
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train_000000.bin", "val_000000.bin"]


def test_failed_rebuild_keeps_the_previous_dataset(tmp_path, monkeypatch):
    """overwrite=true with a source that fails midway (a corrupt line, Ctrl-C) loses nothing: the new shards are
    staged and only replace the old ones once the whole corpus is done."""
    prepare(tmp_path, "data=shakespeare_char", "data.shard_tokens=300000")
    out = tmp_path / "shakespeare_char"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n' * 20 + "not json\n")
    with pytest.raises(UserError, match="bad.jsonl:21"):
        prepare(tmp_path, "data=shakespeare_char", f"data.source={bad}", "overwrite=true")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert open_dataset("shakespeare_char", data_root=tmp_path).num_tokens("train") == 1_003_854


def test_bad_sources_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="data.source is not set"):
        prepare(tmp_path, "data=text", "data.name=x")
    with pytest.raises(UserError, match="does not exist"):
        prepare(tmp_path, "data=text", f"data.source={tmp_path}/missing")
    (tmp_path / "rows.jsonl").write_text('{"content": "x"}\n')
    with pytest.raises(UserError, match=r"rows.jsonl:1: no 'text' field \(keys: content\).*data.text_field"):
        prepare(tmp_path, "data=text", f"data.source={tmp_path}/rows.jsonl", "data.tokenizer=char")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty has no readable text files; check the path"):
        prepare(tmp_path, "data=text", f"data.source={tmp_path}/empty")
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.raises(UserError, match="latin1.txt has no readable text files"):
        prepare(tmp_path, "data=text", f"data.source={tmp_path}/latin1.txt")
    with pytest.raises(UserError, match="cannot download .*put the file at"):
        sources.fetch_url("http://127.0.0.1:9/input.txt", tmp_path / "dl" / "input.txt")
    assert not (tmp_path / "dl").exists()  # a failed download leaves no empty dataset folder behind


def test_builtin_names_match_the_config_group():
    names = {p.stem for p in (CONFIG_DIR / "data").glob("*.yaml")}
    assert names == set(BUILTIN) | {"text", "llmc", "instructions", "preferences"}


@pytest.mark.e2e
def test_cli_prepares_and_rejects_bad_input_with_one_line(tmp_path):
    cmd = [sys.executable, str(ROOT / "data" / "prepare.py")]
    help = subprocess.run(cmd + ["--help"], capture_output=True, text=True).stdout  # the data group only
    assert "data presets" in help and "llmc" in help and "experiment" not in help and "optim" not in help
    ok = subprocess.run(
        cmd + ["data=shakespeare_char", f"data_root={tmp_path}"], capture_output=True, text=True, cwd=tmp_path
    )
    assert ok.returncode == 0, ok.stderr
    assert "train: 1,003,854 tokens" in ok.stdout
    bad = subprocess.run(
        cmd + ["data=text", f"data_root={tmp_path}", "data.val_fraction=1.5"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == ["error: data.val_fraction must be in [0, 1), got 1.5"]


def test_url_source_is_downloaded_once_then_reused(tmp_path, capsys):
    import functools
    import http.server
    import threading

    www = tmp_path / "www"
    www.mkdir()
    (www / "rows.jsonl").write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(5)))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/rows.jsonl"
    args = ("data=text", "data.name=web", f"data.source={url}", "data.tokenizer=char", "data.val_fraction=0")
    try:
        prepare(tmp_path, *args)
    finally:
        server.shutdown()
        server.server_close()
    assert (tmp_path / "web" / "input.jsonl").read_text() == (www / "rows.jsonl").read_text()
    assert "downloading" in capsys.readouterr().out
    ds = open_dataset(str(prepare(tmp_path, *args, "overwrite=true")))  # server gone: the saved copy is used
    assert "already downloaded" in capsys.readouterr().out
    assert ds.tokenizer.decode(all_tokens(ds, "train").tolist()) == "".join(f"row {i}" for i in range(5))


def test_extensions_limit_what_a_folder_contributes(tmp_path):
    make_corpus(tmp_path / "corpus")
    prepare(
        tmp_path,
        "data=text",
        "data.name=code",
        f"data.source={tmp_path / 'corpus'}",
        "data.val_fraction=0",
        "data.extensions=[py,.MD]",
    )
    ds = open_dataset("code", data_root=tmp_path)
    assert ds.meta["splits"]["train"]["documents"] == 2  # sub/e.md and sub/g.py
    with pytest.raises(UserError, match=r"has no readable text files with extensions \.rst; check the path"):
        prepare(tmp_path, "data=text", "data.name=none", f"data.source={tmp_path / 'corpus'}", "data.extensions=[.rst]")


def llmc_write_datafile(path, tokens):
    """llm.c's dev/data/data_common.py `write_datafile`, as it writes GPT-2 shards."""
    header = np.zeros(256, dtype=np.int32)
    header[0], header[1], header[2] = 20240520, 1, len(tokens)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.array(tokens, dtype=np.uint16).tobytes())


def llmc_folder(root, text="ROMEO:\nBut soft, what light through yonder window breaks?\n" * 50):
    enc = gpt2_enc()
    root.mkdir(parents=True)
    ids = [EOT] + enc.encode_ordinary(text)
    llmc_write_datafile(root / "tiny_val_000000.bin", ids[:100])
    llmc_write_datafile(root / "tiny_train_000001.bin", ids[100:400])
    llmc_write_datafile(root / "tiny_train_000002.bin", ids[400:])
    return ids


def test_llmc_shards_without_meta_are_explained_then_adopted(tmp_path, capsys):
    from gpt2.data import TokenLoader

    ids = llmc_folder(tmp_path / "llmc")
    with pytest.raises(UserError, match=r"holds .bin shards but no meta.json.*data=llmc data.name=.*llmc"):
        open_dataset(str(tmp_path / "llmc"))
    prepare(tmp_path, "data=llmc", "data.name=adopted", f"data.source={tmp_path / 'llmc'}")
    assert "the first train tokens read as GPT-2 text: '\\nBut soft" in capsys.readouterr().out
    ds = open_dataset("adopted", data_root=tmp_path)
    assert all_tokens(ds, "val").tolist() == ids[:100] and all_tokens(ds, "train").tolist() == ids[100:]
    assert ds.tokenizer.name == "gpt2" and [s.path.name for s in ds.shards("train")] == [
        "train_000000.bin",
        "train_000001.bin",
    ]
    x, _, _ = TokenLoader(ds, "train", batch_size=2, block_size=16).next_batch()
    assert x.shape == (2, 16)
    # In place (the folder is data/<name>): only meta.json and links are added; the user's files stay.
    before = sorted(p.name for p in (tmp_path / "llmc").iterdir())
    prepare(tmp_path, "data=llmc", "data.name=llmc", f"data.source={tmp_path / 'llmc'}")
    assert open_dataset("llmc", data_root=tmp_path).num_tokens("train") == len(ids) - 100
    prepare(tmp_path, "data=llmc", "data.name=llmc", f"data.source={tmp_path / 'llmc'}", "overwrite=true")
    assert (
        open_dataset("llmc", data_root=tmp_path).num_tokens("train") == len(ids) - 100
    )  # its own links not re-adopted
    assert set(before) <= {p.name for p in (tmp_path / "llmc").iterdir()}


def test_adopting_shards_that_are_not_gpt2_or_lack_a_split_fails(tmp_path):
    (tmp_path / "big").mkdir()
    llmc_write_datafile(tmp_path / "big" / "x_train.bin", [1, 2, 60000])
    llmc_write_datafile(tmp_path / "big" / "x_val.bin", [1, 2, 3])
    with pytest.raises(UserError, match="holds token id 60000, outside GPT-2's 50257"):
        prepare(tmp_path, "data=llmc", "data.name=big", f"data.source={tmp_path / 'big'}")
    (tmp_path / "big" / "x_val.bin").unlink()
    with pytest.raises(UserError, match="has no val shards"):
        prepare(tmp_path, "data=llmc", "data.name=big", f"data.source={tmp_path / 'big'}")
    assert not (tmp_path / "big" / "meta.json").exists()


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda m: m.pop("tokenizer"), "tokenizer.name"),
        (lambda m: m.update(vocab_size="50257"), "vocab_size"),
        (lambda m: m["splits"].pop("val"), "splits.val.shards"),
        (lambda m: m["splits"]["train"]["shards"][0].pop("max_token"), "splits.train.shards[0].max_token"),
        (lambda m: m.update(tokenizer={"name": "char"}), "tokenizer.chars"),
    ],
)
def test_incomplete_meta_json_names_the_field(tmp_path, edit, field):
    prepare(tmp_path, "data=text", "data.name=m", f"data.source={SHAKESPEARE}", "data.tokenizer=char")
    meta_path = tmp_path / "m" / "meta.json"
    meta = json.loads(meta_path.read_text())
    edit(meta)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(UserError, match=rf"meta.json: field {re.escape(field)} is missing or not .*overwrite=true"):
        open_dataset("m", data_root=tmp_path)


def test_errors_name_the_command_the_user_runs(tmp_path, monkeypatch):
    from gpt2.data.dataset import prepare_command

    monkeypatch.setattr(sys, "argv", ["/venv/bin/gpt2-train"])
    assert prepare_command("shakespeare_char") == "gpt2-prepare data=shakespeare_char"
    with pytest.raises(UserError, match="run: gpt2-prepare data=text data.name=mine"):
        open_dataset("mine", data_root=tmp_path)
    monkeypatch.setattr(sys, "argv", ["train.py"])
    assert prepare_command("mine").startswith("python data/prepare.py data=text data.name=mine")


@pytest.mark.e2e
def test_progress_redirected_to_a_file_is_plain_lines(tmp_path):
    """tqdm's in-place redraw is one multi-kilobyte line in a log file; there it writes plain lines instead."""
    log = tmp_path / "prepare.log"
    with open(log, "w") as f:
        r = subprocess.run(
            [sys.executable, str(ROOT / "data" / "prepare.py"), "data=shakespeare_char", f"data_root={tmp_path}"],
            stdout=f,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    assert r.returncode == 0
    text = log.read_text()
    assert "\r" not in text and max(map(len, text.splitlines())) < 300
    assert any(line.startswith("tokenizing shakespeare_char") and "1.12Mtok" in line for line in text.splitlines())


def test_a_folder_holding_files_it_did_not_write_is_refused_and_left_alone(tmp_path):
    out = tmp_path / "mine"
    (out / ".staging").mkdir(parents=True)
    for name in ("notes.txt", "train_000000.bin", "val_000000.bin", "x.tmp", ".staging/keep.txt"):
        (out / name).write_text(f"the user's {name}")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for extra in ([], ["overwrite=true"]):
        with pytest.raises(
            UserError,
            match=r"holds files this preparation did not write \(\.staging, notes.txt, "
            r"train_000000.bin, val_000000.bin, x.tmp\); nothing was changed",
        ):
            prepare(tmp_path, "data=text", "data.name=mine", f"data.source={SHAKESPEARE}", *extra)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # A dataset folder with its source text in it (input.txt, the offline recipe) is fine.
    (tmp_path / "books").mkdir()
    shutil.copy(SHAKESPEARE, tmp_path / "books" / "input.txt")
    prepare(tmp_path, "data=text", "data.name=books", "data.tokenizer=char")
    assert (tmp_path / "books" / "input.txt").exists() and (tmp_path / "books" / "meta.json").exists()


def test_a_run_killed_while_moving_shards_in_is_rebuilt(tmp_path, monkeypatch):
    """The crash window between moving the shards in and writing meta.json: they are still known as ours."""
    real_write_meta = prepare_mod.write_meta

    def die(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_mod, "write_meta", die)
    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path, "data=shakespeare_char", "data.shard_tokens=600000")
    out = tmp_path / "shakespeare_char"
    assert sorted(p.name for p in out.glob("*.bin")) == ["train_000000.bin", "train_000001.bin", "val_000000.bin"]
    monkeypatch.setattr(prepare_mod, "write_meta", real_write_meta)
    prepare(tmp_path, "data=shakespeare_char")
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train_000000.bin", "val_000000.bin"]


def test_non_utf8_rows_name_the_file_and_byte(tmp_path):
    good = json.dumps({"text": "fine"}).encode() + b"\n"
    (tmp_path / "rows.jsonl").write_bytes(good * 3 + b'{"text": "caf\xe9"}\n')
    with pytest.raises(UserError, match=rf"rows.jsonl is not valid UTF-8 at byte {len(good) * 3 + 13} "):
        prepare(tmp_path, "data=text", "data.name=r", f"data.source={tmp_path / 'rows.jsonl'}")
    (tmp_path / "rows.json").write_bytes(b'[{"text": "caf\xe9"}]')
    with pytest.raises(UserError, match=r"rows.json is not valid UTF-8 at byte 14 "):
        prepare(tmp_path, "data=text", "data.name=j", f"data.source={tmp_path / 'rows.json'}")
