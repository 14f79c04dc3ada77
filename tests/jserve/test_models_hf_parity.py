"""Our models against Hugging Face transformers on the same tiny random checkpoints: prefill logits, decode
steps through the paged KV path, a ragged batch of sequences of different lengths, and a chunked prefill.

Reference: transformers' full causal forward (eager attention, no KV cache) on the whole sequence so far.
Tolerance (float32): max |ours - theirs| <= 1e-4 * max |theirs|. bfloat16 checkpoints: both sides run in
bfloat16 with different op orders, so the bound is 2e-2 * max |theirs| plus equal argmax on most rows.
"""

from __future__ import annotations

import numpy as np
import pytest

from jserve.models import PageAllocator, SeqChunk, build_step, load
from jserve.models.paged import pages_needed

VOCAB = 128  # the tiny checkpoints' vocabulary (conftest.VOCAB)

PAGE = 4
KINDS = ["llama", "llama3", "llama-mha", "mistral", "qwen2", "opt", "opt-350m-like"]


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


class Runner:
    """Drives a loaded model step by step over a page pool, tracking each sequence's pages and length."""

    def __init__(self, model, num_pages: int = 64, max_pages_per_seq: int = 12):
        self.model = model
        self.alloc = PageAllocator(num_pages)
        self.caches = model.allocate_kv_caches(num_pages, PAGE)
        self.m = max_pages_per_seq
        self.pages: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}

    def step(self, work: dict[int, list[int]], **bucket) -> np.ndarray:  # {seq: new tokens} -> [S, vocab]
        chunks = []
        for sid, toks in work.items():
            start = self.lens.get(sid, 0)
            pages = self.pages.setdefault(sid, [])
            need = pages_needed(start + len(toks), PAGE) - len(pages)
            if need > 0:
                pages.extend(self.alloc.allocate(need))
            chunks.append(SeqChunk(toks, start, list(pages)))
            self.lens[sid] = start + len(toks)
        s = build_step(chunks, PAGE, pages_per_seq=self.m, **bucket)
        logits, self.caches = self.model.step(s.input_ids, s.positions, self.caches, s.metadata)
        return np.asarray(logits)


def _prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, VOCAB, n).tolist() for n in lengths]


@pytest.mark.parametrize("kind", KINDS)
def test_prefill_and_decode_match_transformers_float32(hf_checkpoints, kind):
    ckpt = hf_checkpoints(kind)
    model = load(ckpt.path)
    assert model.config.dtype == "float32"
    r = Runner(model)
    (prompt,) = _prompts(1, [11])
    ours = r.step({0: prompt}, num_tokens=16)  # padded prefill
    seq = list(prompt)
    ref = ckpt.logits(seq)[-1]
    assert rel_err(ours[0], ref) < 1e-4, kind
    for _ in range(5):  # decode steps, each fed the reference's greedy token
        tok = int(np.argmax(ref))
        seq.append(tok)
        ours = r.step({0: [tok]})
        ref = ckpt.logits(seq)[-1]
        assert rel_err(ours[0], ref) < 1e-4, (kind, len(seq))


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_ragged_batch_and_chunked_prefill_match_transformers(hf_checkpoints, kind):
    """Three sequences of different lengths prefilled in one step (with padding tokens and a padded sequence
    slot), then batched decode steps, then a prefill chunk appended to a sequence with cached context."""
    ckpt = hf_checkpoints(kind)
    model = load(ckpt.path)
    r = Runner(model)
    prompts = _prompts(2, [3, 9, 6])
    ours = r.step({i: p for i, p in enumerate(prompts)}, num_tokens=32, num_seqs=4)
    seqs = [list(p) for p in prompts]
    for i in range(3):
        assert rel_err(ours[i], ckpt.logits(seqs[i])[-1]) < 1e-4
    assert np.all(np.isfinite(ours[3]))  # padded slot: defined, ignored
    for _ in range(3):
        toks = [int(np.argmax(ckpt.logits(s)[-1])) for s in seqs]
        for s, t in zip(seqs, toks):
            s.append(t)
        ours = r.step({i: [t] for i, t in enumerate(toks)})
        for i in range(3):
            assert rel_err(ours[i], ckpt.logits(seqs[i])[-1]) < 1e-4
    # chunked prefill: 5 more prompt tokens for sequence 1 alongside a decode of sequence 0
    extra = _prompts(3, [5])[0]
    tok0 = int(np.argmax(ckpt.logits(seqs[0])[-1]))
    ours = r.step({0: [tok0], 1: extra})
    seqs[0].append(tok0)
    seqs[1].extend(extra)
    assert rel_err(ours[0], ckpt.logits(seqs[0])[-1]) < 1e-4
    assert rel_err(ours[1], ckpt.logits(seqs[1])[-1]) < 1e-4


@pytest.mark.parametrize("kind", ["llama3", "qwen2", "opt"])
def test_bfloat16_checkpoints_match_transformers_loosely(hf_checkpoints, kind):
    ckpt = hf_checkpoints(kind, dtype="bfloat16")
    model = load(ckpt.path)
    assert model.config.dtype == "bfloat16"
    import jax

    assert {str(x.dtype) for x in jax.tree.leaves(model.state)} == {"bfloat16"}
    r = Runner(model)
    (prompt,) = _prompts(4, [10])
    seq = list(prompt)
    ours = r.step({0: prompt})
    for _ in range(4):
        ref = ckpt.logits(seq)[-1]
        assert rel_err(ours[0], ref) < 2e-2, kind
        tok = int(np.argmax(ref))
        seq.append(tok)
        ours = r.step({0: [tok]})


def test_sharded_safetensors_checkpoint_loads_identically(hf_checkpoints):
    sharded = hf_checkpoints("llama", sharded=True)
    files = sorted(p.name for p in sharded.path.glob("*.safetensors"))
    assert len(files) > 1 and (sharded.path / "model.safetensors.index.json").is_file()
    model = load(sharded.path)
    r = Runner(model)
    (prompt,) = _prompts(5, [7])
    assert rel_err(r.step({0: prompt})[0], sharded.logits(prompt)[-1]) < 1e-4


def test_load_as_bfloat16_casts_a_float32_checkpoint(hf_checkpoints):
    ckpt = hf_checkpoints("llama")
    model = load(ckpt.path, dtype="bfloat16")
    import jax

    assert {str(x.dtype) for x in jax.tree.leaves(model.state)} == {"bfloat16"}
    (prompt,) = _prompts(6, [8])
    assert rel_err(Runner(model).step({0: prompt})[0], ckpt.logits(prompt)[-1]) < 4e-2


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_pallas_kernels_in_interpret_mode_match_transformers(hf_checkpoints, kind):
    """The same model through the Pallas kernels (interpret mode on CPU) instead of the XLA reference."""
    ckpt = hf_checkpoints(kind)
    model = load(ckpt.path, backend="interpret")
    r = Runner(model)
    prompts = _prompts(7, [6, 3])
    ours = r.step({0: prompts[0], 1: prompts[1]}, num_tokens=16)
    seqs = [list(p) for p in prompts]
    for i in range(2):
        assert rel_err(ours[i], ckpt.logits(seqs[i])[-1]) < 1e-4
    toks = [int(np.argmax(ckpt.logits(s)[-1])) for s in seqs]
    ours = r.step({i: [t] for i, t in enumerate(toks)})
    for i in range(2):
        seqs[i].append(toks[i])
        assert rel_err(ours[i], ckpt.logits(seqs[i])[-1]) < 1e-4


def test_hf_directory_tokenizer_is_attached(hf_checkpoints, tmp_path):
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers

    d = tmp_path / "with-tokenizer"
    shutil.copytree(hf_checkpoints("llama").path, d)
    assert load(d).tokenizer is None
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text('{"bos_token": "<s>", "eos_token": "</s>"}')
    tok = load(d).tokenizer
    assert tok.encode("hello world") == [3, 4] and (tok.bos_token_id, tok.eos_token_id) == (1, 2)
