"""The sampler's engine and text layer on tiny CPU models: equivalences (cached vs uncached, batched vs single,
top_k=1 vs greedy), invariants (seeds, EOT, stop strings, sliding window) and unit tests of the logit filters."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_gpt

from gpt2.model import GPT
from gpt2.sampling import (
    Batch,
    Sampler,
    SamplingParams,
    TextStream,
    apply_repetition_penalty,
    apply_temperature,
    generate,
    sample_next_token,
    top_k_filter,
    top_p_filter,
    use_decode_linears,
    window_size,
)
from gpt2.tokenizer import CharTokenizer

GREEDY = SamplingParams(temperature=0.0)
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\nAll:\nSpeak, speak.\n"


def tiny_model(block_size: int = 32, vocab_size: int = 65, seed: int = 0) -> GPT:
    """`tiny_gpt` with a larger init than GPT-2's 0.02, so that a random model's greedy path is not one repeated
    token."""
    model = tiny_gpt(vocab_size, block_size, seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5)
    return model.eval()


def run(model: GPT, idx: torch.Tensor, n: int, params: SamplingParams = GREEDY, **kw) -> torch.Tensor:
    """All steps of `generate` as (B, steps)."""
    return torch.stack(list(generate(model, idx, n, params, **kw)), dim=1)


@torch.no_grad()
def uncached_greedy(model: GPT, idx: torch.Tensor, n: int) -> torch.Tensor:
    """Reference: the full forward of GPT.forward over the same context window policy as `generate`, no cache."""
    block_size, keep = model.config.block_size, window_size(model.config.block_size)
    context, out = idx, []
    for _ in range(n):
        token = model(context)[0][:, -1].argmax(-1, keepdim=True)  # (B, 1)
        out.append(token)
        # generate() slides when the cache is full: the next pass sees the last `keep` tokens, new one included
        context = (
            torch.cat([context, token], 1)
            if context.size(1) < block_size
            else torch.cat([context[:, block_size - keep + 1 :], token], 1)
        )
    return torch.cat(out, 1)


# ---------------------------------------------------------------------------------------------------------
# Pure functions over logits.


def test_temperature_scales_logits():
    logits = torch.tensor([[2.0, -1.0]])
    assert torch.equal(apply_temperature(logits, 0.5), torch.tensor([[4.0, -2.0]]))
    assert apply_temperature(logits, 1.0) is logits


def test_top_k_filter_keeps_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    out = top_k_filter(logits, 2)
    assert torch.isinf(out).tolist() == [[True, False, True, False, True]]
    assert torch.equal(top_k_filter(logits, 0), logits) and torch.equal(top_k_filter(logits, 9), logits)
    assert torch.equal(logits, torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]]))  # input untouched


@pytest.mark.parametrize(
    "p, kept",
    [
        (0.3, {0}),  # the top token alone has 0.5 >= 0.3
        (0.5, {0}),  # exactly reaching p is enough
        (0.7, {0, 1}),  # 0.5 < 0.7 <= 0.8
        (0.8, {0, 1}),
        (0.81, {0, 1, 2}),  # 0.8 < 0.81 <= 0.95
        (1.0, {0, 1, 2, 3}),
    ],
)
def test_top_p_keeps_smallest_set_reaching_p(p, kept):
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    order = torch.tensor([2, 0, 3, 1])  # shuffled so vocabulary order differs from rank order
    logits = torch.empty(4)
    logits[order] = probs.log()
    out = top_p_filter(logits[None], p)[0]
    assert {int(order[i]) for i in range(4) if torch.isfinite(out[order[i]])} == {int(order[i]) for i in kept}


def test_repetition_penalty_matches_ctrl_and_transformers():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert torch.equal(out, torch.tensor([[1.0, -4.0, 1.0, -1.0]]))
    transformers = pytest.importorskip("transformers")
    processor = transformers.RepetitionPenaltyLogitsProcessor(penalty=2.0)
    assert torch.equal(processor(torch.tensor([[0, 1]]), logits.clone()), out)


def test_sample_next_token_greedy_seeded_and_restricted():
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_next_token(logits, temperature=0.0), logits.argmax(-1))
    draw = lambda seed, **kw: sample_next_token(  # noqa: E731
        logits, temperature=1.0, generator=torch.Generator().manual_seed(seed), **kw
    )
    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(torch.stack([draw(s) for s in range(5)]), torch.stack([draw(s) for s in range(5, 10)]))
    top2 = logits.topk(2).indices
    for seed in range(20):
        token = draw(seed, top_k=2)
        assert (top2 == token[:, None]).any(-1).all()
    assert torch.equal(draw(3, top_k=1), logits.argmax(-1))
    assert torch.equal(draw(3, top_p=1e-6), logits.argmax(-1))


def test_sample_next_token_follows_the_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0]]).log_softmax(-1).expand(20000, 3)
    counts = torch.bincount(sample_next_token(logits, generator=torch.Generator().manual_seed(0)), minlength=3)
    torch.testing.assert_close(counts / 20000, logits[0].exp(), atol=0.015, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# The engine.


def test_cached_equals_uncached_greedy_including_sliding_window():
    model = tiny_model(block_size=16)
    idx = torch.randint(0, 65, (2, 5), generator=torch.Generator().manual_seed(1))
    n = 40  # slides twice past block_size=16
    cached = run(model, idx, n)
    assert cached.shape == (2, n)
    assert torch.equal(cached, uncached_greedy(model, idx, n))
    assert len(set(cached[0].tolist())) > 3  # a real path, not one repeated token


def test_passes_over_a_kv_cache_never_use_cudnn_attention(monkeypatch):
    """cuDNN's attention builds a plan per key length: eager decoding on an H200 ran 10x slower with it. Prefill,
    decode steps and window slides run with it disabled; a static cache's decode steps (fixed shapes) and a
    training forward leave the backends as they were."""
    import torch.nn.functional as F

    enabled = []
    sdpa = F.scaled_dot_product_attention

    def recording(*args, **kwargs):
        enabled.append(torch.backends.cuda.cudnn_sdp_enabled())
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    model = tiny_model(block_size=16)
    run(model, torch.zeros(1, 4, dtype=torch.long), 30)  # prefill, decode, and slides past block_size 16
    assert len(enabled) > 30 * model.config.n_layer and not any(enabled)
    enabled.clear()
    run(model, torch.zeros(1, 4, dtype=torch.long), 8, static=True)  # one prefill, then 7 fixed-shape steps
    L = model.config.n_layer
    assert enabled == [False] * L + [True] * 7 * L
    enabled.clear()
    model(torch.zeros(1, 4, dtype=torch.long))
    assert enabled and all(enabled)


def test_prompt_filling_the_context_slides_immediately():
    model = tiny_model(block_size=16)
    idx = torch.randint(0, 65, (1, 16), generator=torch.Generator().manual_seed(2))
    assert torch.equal(run(model, idx, 10), uncached_greedy(model, idx, 10))


def test_batch_equals_single_runs_greedy():
    model = tiny_model()
    idx = torch.randint(0, 65, (4, 6), generator=torch.Generator().manual_seed(3))
    batched = run(model, idx, 20)
    singles = torch.cat([run(model, idx[i : i + 1], 20) for i in range(4)])
    assert torch.equal(batched, singles)


def test_prompts_of_different_lengths_each_get_what_they_get_alone():
    """Per-row positions: a ragged batch (one prompt filling the context, so that its row slides while the
    others do not) gives each prompt the greedy tokens it gets alone, and the uncached reference's."""
    model = tiny_model(block_size=16)
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, 65, (n,), generator=g).tolist() for n in (3, 16, 1, 9)]
    batched = run(model, prompts, 25)
    for row, prompt in enumerate(prompts):
        alone = run(model, torch.tensor([prompt]), 25)
        assert torch.equal(batched[row], alone[0]), row
        assert torch.equal(alone, uncached_greedy(model, torch.tensor([prompt]), 25))


def test_static_cache_gives_the_same_tokens():
    model = tiny_model(block_size=16)
    prompts = [[1, 2, 3], [4] * 10]
    assert torch.equal(run(model, prompts, 30, static=True), run(model, prompts, 30))


def test_a_row_that_starts_in_a_running_batch_gets_what_it_gets_alone():
    """What a server does: requests join a running batch in a free row and leave it; the others go on."""
    model = tiny_model(block_size=16)
    batch = Batch(model, rows=3, max_len=16)
    tokens = {0: [5, 6, 7], 2: [9]}  # row 1 stays free; row 2 joins after 4 steps, row 0 leaves after 8

    def greedy(logits):
        return logits.argmax(-1)

    with torch.inference_mode():
        nxt = {0: greedy(batch.start(0, torch.tensor(tokens[0])))}
        for step in range(20):
            if step == 4:
                nxt[2] = greedy(batch.start(2, torch.tensor(tokens[2])))
            if step == 8:
                batch.free(0)
            for row, t in nxt.items():
                if batch.active[row]:
                    tokens[row].append(int(t))
            token = torch.tensor([int(nxt.get(row, 0)) for row in range(3)])
            logits = batch.step(token)
            nxt = {row: greedy(logits[row]) for row in nxt if batch.active[row]}
    assert not batch.active[0] and not batch.active[1]
    for row, prompt_len in ((0, 3), (2, 1)):
        alone = run(model, torch.tensor([tokens[row][:prompt_len]]), len(tokens[row]) - prompt_len)
        assert alone[0].tolist() == tokens[row][prompt_len:], row


@pytest.mark.parametrize("static", [False, True])
def test_a_prompt_prefilled_in_chunks_between_steps_gets_what_it_gets_alone(static):
    """A server's long prompt: row 1 prefills in three chunks while row 0 (and then row 2, behind it) decode;
    the steps in between must neither disturb the held row's cache nor be disturbed by it."""
    model = tiny_model(block_size=32)
    batch = Batch(model, rows=3, max_len=32, static=static)
    prompt = [int(t) for t in torch.randint(0, 65, (11,), generator=torch.Generator().manual_seed(3))]
    tokens = {0: [5, 6, 7], 1: list(prompt), 2: [8, 9]}

    def greedy(logits):
        return int(logits.argmax(-1))

    with torch.inference_mode():
        nxt = {0: greedy(batch.start(0, torch.tensor(tokens[0]))), 2: greedy(batch.start(2, torch.tensor([8, 9])))}
        chunks = {0: (prompt[:4], batch.start), 3: (prompt[4:9], batch.extend), 5: (prompt[9:], batch.extend)}
        for step in range(12):
            if step in chunks:
                ids, prefill = chunks[step]
                logits = prefill(1, torch.tensor(ids), complete=step == 5)
                if step == 5:
                    nxt[1] = greedy(logits)
            assert batch.held[1] == (step < 5)
            for row, t in nxt.items():
                tokens[row].append(t)
            logits = batch.step(torch.tensor([nxt.get(row, 0) for row in range(3)]))
            nxt = {row: greedy(logits[row]) for row in nxt}
    for row, prompt_len in ((0, 3), (1, len(prompt)), (2, 2)):
        alone = run(model, torch.tensor([tokens[row][:prompt_len]]), len(tokens[row]) - prompt_len)
        assert alone[0].tolist() == tokens[row][prompt_len:], row


def test_top_k_1_equals_greedy():
    model = tiny_model()
    idx = torch.randint(0, 65, (2, 4), generator=torch.Generator().manual_seed(4))
    sampled = run(model, idx, 20, SamplingParams(temperature=1.3, top_k=1), generator=torch.Generator().manual_seed(5))
    assert torch.equal(sampled, run(model, idx, 20))


def test_same_seed_same_tokens_different_seed_different():
    model = tiny_model()
    idx = torch.zeros(3, 1, dtype=torch.long)
    params = SamplingParams(temperature=1.0, top_k=20, top_p=0.9)
    draw = lambda seed: run(model, idx, 20, params, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(8))


def test_repetition_penalty_changes_greedy_path():
    model = tiny_model()
    idx = torch.randint(0, 65, (1, 4), generator=torch.Generator().manual_seed(6))
    plain = run(model, idx, 30)
    penalised = run(model, idx, 30, SamplingParams(temperature=0.0, repetition_penalty=1e3))
    # With a huge penalty a token already in the context wins only if every unseen logit is below it.
    assert len(set(penalised[0].tolist())) > len(set(plain[0].tolist()))


def test_eot_finishes_rows_and_generation_ends_when_all_are_done():
    model = tiny_model()
    idx = torch.randint(0, 65, (3, 4), generator=torch.Generator().manual_seed(8))
    free = run(model, idx, 30)
    eot = int(free[0, 2])  # row 0 emits it at step 2; other rows at their first occurrence, if any
    first = [row.tolist().index(eot) if eot in row.tolist() else None for row in free]
    stopped = run(model, idx, 30, eot_id=eot)
    for row, f in enumerate(first):
        if f is None:
            assert torch.equal(stopped[row], free[row, : stopped.size(1)])
        else:
            assert torch.equal(stopped[row, : f + 1], free[row, : f + 1])  # EOT itself is yielded
            assert (stopped[row, f + 1 :] == -1).all()
    if all(f is not None for f in first):
        assert stopped.size(1) == max(first) + 1  # ends once every row has finished


def test_prompt_longer_than_context_keeps_its_tail_with_warning():
    tok = CharTokenizer.from_text(TEXT)
    sampler = Sampler(tiny_model(block_size=32, vocab_size=tok.vocab_size), tok, device="cpu", dtype="float32")
    with pytest.warns(UserWarning, match="more than the model's context"):
        ids = sampler.encode_prompt(TEXT, max_new_tokens=10)
    assert ids == tok.encode(TEXT)[-22:]  # block_size - max_new_tokens
    with pytest.warns(UserWarning):
        assert len(sampler.encode_prompt(TEXT, max_new_tokens=30)) == 16  # never less than half the context
    with pytest.warns(UserWarning):
        texts = sampler.generate(TEXT, max_new_tokens=50, temperature=0.0)  # slides past the context too
    assert len(texts[0]) == 50


# ---------------------------------------------------------------------------------------------------------
# Text: stop strings, UTF-8, and the Sampler API.


def feed(stream: TextStream, tokenizer, text: str) -> list[str]:
    return [stream.push(t) for t in tokenizer.encode(text)]


def test_text_stream_cuts_at_stop_string_and_holds_back_prefixes():
    tok = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz ")
    stream = TextStream(tok, stop=["world", "xyz"])
    pieces = feed(stream, tok, "hello wor")
    assert "".join(pieces) == "hello "  # "wor" may still become "world"
    assert stream.push(tok.encode("l")[0]) == "" and not stream.stopped
    assert stream.push(tok.encode("d")[0]) == "" and stream.stopped
    assert stream.text == "hello "
    assert stream.push(tok.encode("a")[0]) == ""  # nothing after a stop

    stream = TextStream(tok, stop=["xyz"])
    pieces = feed(stream, tok, "abxyq")
    assert pieces == ["a", "b", "", "", "xyq"]  # released once "xyz" is ruled out
    assert stream.finish() == "" and stream.text == "abxyq"

    stream = TextStream(tok, stop=["xyz"])
    assert "".join(feed(stream, tok, "abxy")) == "ab" and stream.finish() == "xy"  # flushed at the end


def test_text_stream_never_shows_partial_utf8():
    from gpt2.tokenizer import GPT2Tokenizer

    tok = GPT2Tokenizer()
    text = "naïve 🦄 café"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some token splits a character
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in ids] + [stream.finish()]
    assert all("\ufffd" not in p for p in pieces) and "".join(pieces) == text


def test_sampler_generate_stream_stop_and_batches():
    tok = CharTokenizer.from_text(TEXT)
    sampler = Sampler(tiny_model(vocab_size=tok.vocab_size), tok, device="cpu", dtype="float32")
    kw = dict(max_new_tokens=40, temperature=1.0, top_k=0, seed=3)
    texts = sampler.generate("All:", num_samples=5, batch_size=2, **kw)
    assert len(texts) == 5 and all(len(t) == 40 for t in texts)
    assert texts == sampler.generate("All:", num_samples=5, batch_size=2, **kw)  # seeded
    assert "".join(sampler.stream("All:", **kw)) == sampler.generate("All:", **kw)[0]

    greedy = sampler.generate("All:", max_new_tokens=40, temperature=0.0)[0]
    stop = greedy[10:12]
    cut = sampler.generate("All:", max_new_tokens=40, temperature=0.0, stop=[stop])[0]
    assert cut == greedy[: greedy.index(stop)]
    assert "".join(sampler.stream("All:", max_new_tokens=40, temperature=0.0, stop=[stop])) == cut


def test_empty_prompt_starts_from_newline_for_char_and_eot_for_gpt2():
    tok = CharTokenizer.from_text(TEXT)
    sampler = Sampler(tiny_model(vocab_size=tok.vocab_size), tok, device="cpu", dtype="float32")
    assert sampler.encode_prompt("", 10) == tok.encode("\n")

    class EOTTokenizer(CharTokenizer):
        eot_id = 3

    sampler.tokenizer = EOTTokenizer(tok.chars)
    assert sampler.encode_prompt("", 10) == [3]


@pytest.mark.parametrize("bias", [True, False])
def test_row_block_linears_split_few_rows_by_thread_and_keep_values_tie_and_logits(monkeypatch, bias):
    """Where prepacking does not pay, every Linear (the tied LM head too) becomes a RowBlockLinear: products of
    few rows by a large enough weight run as one batched product over blocks of the stored weight's rows, one
    block per thread (the largest divisor of the split size that is at most the thread count): blocks of
    outputs for nn.Linear's (out, in) storage, blocks of inputs summed for the (in, out) storage an fp32 model
    gets to decode one row; with nn.Linear's logits and greedy tokens and nothing else changed. More rows,
    smaller weights, gradients, one thread or another dtype take nn.Linear's own path."""
    from torch.profiler import profile

    from gpt2.sampling import engine

    monkeypatch.setattr(engine, "prepacking_pays", lambda: False)  # the kind CPUs without native bf16 get
    monkeypatch.setattr(engine.RowBlockLinear, "MIN_WEIGHT", 32 * 32)  # every weight of this tiny model splits
    reference = tiny_model() if bias else tiny_gpt(65, 32, bias=False).eval()  # outputs of 96, 32, 128 (MLP, head)
    with torch.no_grad():
        for p in reference.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(p.numel()))  # biases (and LN) that count
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    model = copy.deepcopy(reference)

    def batched_products(idx: torch.Tensor) -> int:
        """How many more batched products `model` runs than `reference` (whose attention may have some)."""
        counts, logits = [], []
        for m in (model, reference):
            with torch.no_grad(), profile() as prof:
                logits.append(m(idx)[0])
            counts.append(sum(e.count for e in prof.key_averages() if e.key in ("aten::bmm", "aten::baddbmm")))
        torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=1e-5)
        return counts[0] - counts[1]

    threads = torch.get_num_threads()
    try:
        for rows in (1, 8, 1):
            use_decode_linears(model, rows)
            transposed = rows == 1  # stored (in, out)
            fc = model.transformer.h[0].mlp.c_fc
            assert type(fc) is engine.RowBlockLinear and type(model.lm_head) is engine.RowBlockLinear
            assert fc.weight.is_contiguous() != transposed and fc.weight.t().is_contiguous() == transposed
            assert model.lm_head.weight is model.transformer.wte.weight
            after = model.state_dict()
            assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                few = torch.randint(0, 65, (2, 10), generator=torch.Generator().manual_seed(n))  # 20 rows
                many = torch.randint(0, 65, (3, 32), generator=torch.Generator().manual_seed(n))  # 96: MKL's
                assert batched_products(few) == (2 * 4 + 1 if n > 1 else 0)  # 4 Linears per layer and the head
                assert batched_products(many) == 0
                monkeypatch.setattr(engine.RowBlockLinear, "MIN_WEIGHT", 96 * 32 + 1)  # the MLP's and the head's
                assert batched_products(few) == (2 * 2 + 1 if n > 1 else 0)
                monkeypatch.setattr(engine.RowBlockLinear, "MIN_WEIGHT", 32 * 32)
                assert torch.equal(run(model, few[:rows], 20), uncached_greedy(reference, few[:rows], 20))
    finally:
        torch.set_num_threads(threads)
    model.requires_grad_(True)
    model(few, few)[1].backward()  # training: nn.Linear's forward, gradients and all
    assert model.transformer.h[0].mlp.c_fc.weight.grad is not None
    reference_half = copy.deepcopy(reference).to(torch.bfloat16)
    half = use_decode_linears(copy.deepcopy(reference_half), rows=1)  # bf16: PyTorch's kernel, (out, in)
    assert half.transformer.h[0].mlp.c_fc.weight.is_contiguous() and half.lm_head.weight.is_contiguous()
    with torch.no_grad():
        assert torch.equal(half(few)[0], reference_half(few)[0])


@pytest.mark.slow
def test_compiled_decode_step_matches_eager_and_compiles_once():
    from torch._dynamo.utils import counters

    tok = CharTokenizer.from_text(TEXT)
    kw = dict(max_new_tokens=30, temperature=0.0)
    eager = Sampler(tiny_model(vocab_size=tok.vocab_size), tok, device="cpu", dtype="float32")
    compiled = Sampler(tiny_model(vocab_size=tok.vocab_size), tok, device="cpu", dtype="float32", compile=True)
    assert compiled.decode is not eager.decode
    torch._dynamo.reset()
    counters.clear()
    assert compiled.generate("All:", num_samples=2, **kw) == eager.generate("All:", num_samples=2, **kw)
    # 29 decode steps, one compilation: the static cache's shapes do not change from token to token.
    assert counters["frames"]["total"] == 1 and counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepacked_linears_give_the_same_logits_and_leave_training_to_nn_linear(monkeypatch, dtype):
    """Where oneDNN's prepacked products pay (forced here, so any CPU runs it), the Linears decode from a packed
    copy of their weight: the same logits and greedy tokens as plain nn.Linear, the same state dict, and
    a forward that needs gradients takes nn.Linear's own path (the packed copy has none)."""
    from gpt2.sampling import engine

    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("oneDNN has no bf16 linear on this CPU (AVX2 only): prepacking is never used on it")
    monkeypatch.setattr(engine, "prepacking_pays", lambda: True)
    reference = tiny_model().to(dtype)
    model = use_decode_linears(copy.deepcopy(reference))
    assert isinstance(model.transformer.h[0].mlp.c_fc, engine.PackedLinear)
    assert isinstance(model.lm_head, engine.PackedLinear) and model.lm_head.weight is model.transformer.wte.weight
    assert model.state_dict().keys() == reference.state_dict().keys()
    idx = torch.randint(0, 65, (2, 10), generator=torch.Generator().manual_seed(9))
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], reference(idx)[0], **tolerance)
    if dtype == torch.float32:
        assert torch.equal(run(model, idx, 20), run(reference, idx, 20))
    packed = model.transformer.h[0].mlp.c_fc.packed
    use_decode_linears(model, rows=8)  # packed weights serve any number of rows: nothing is packed again
    assert model.transformer.h[0].mlp.c_fc.packed is packed
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], reference(idx)[0], **tolerance)
    model.requires_grad_(True)
    model(idx, idx)[1].backward()
    reference(idx, idx)[1].backward()
    weight = model.transformer.h[0].mlp.c_fc.weight
    torch.testing.assert_close(weight.grad, reference.transformer.h[0].mlp.c_fc.weight.grad, **tolerance)
