"""The CPU-checkable parts of the GPU scripts (scripts/vllm_e2e.py, scripts/vllm_bench.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (`make install` adds its CPU build)")

import torch  # noqa: E402
from vllm.engine.arg_utils import EngineArgs  # noqa: E402

from bitbybit_vllm.config import BITS_ENV  # noqa: E402
from kernels.qmodel import load_quantized  # noqa: E402

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


e2e = load_script("vllm_e2e")
bench = load_script("vllm_bench")


def test_sixteen_heldout_prompts_two_per_book():
    if not e2e.HELDOUT.is_file():
        pytest.skip(f"{e2e.HELDOUT} is absent (it is present in CI)")
    prompts = e2e.heldout_prompts()
    assert len(set(prompts)) == 16
    assert all(e2e.MIN_SENTENCE_CHARS <= len(p) <= e2e.MAX_PROMPT_CHARS for p in prompts)
    assert "The Cratylus has always been a source of perplexity to the student of Plato." in prompts


def test_first_sentence_skips_abbreviations():
    text = "The Rev. Septimus Harding was a clergyman of the town of Barchester. He had a daughter."
    assert e2e.first_sentence(text) == "The Rev. Septimus Harding was a clergyman of the town of Barchester."


def test_first_divergence():
    assert e2e.first_divergence([1, 2, 3, 4], [1, 2, 3]) is None
    assert e2e.first_divergence([1, 9, 3], [1, 2, 3]) == 1
    assert e2e.first_divergence([1], [1, 2]) == 1


@pytest.mark.parametrize("act_bits", [None, 2])
def test_reference_tokens_are_greedy_generation(stories_rtn_ckpt, act_bits):
    """The e2e reference loop (KV cache, EOS ignored) equals transformers' greedy generate, W2A16 and W2A2."""
    ckpt = str(stories_rtn_ckpt)
    ids = [[1, 403, 407, 261, 372], [1, 320, 263]]
    got = e2e.greedy_tokens(e2e.reference_model(ckpt, 2, act_bits, torch.float32, "cpu"), ids, 12)
    model, _, _ = load_quantized(ckpt, bits=2, act_bits=act_bits)
    for prompt, tokens in zip(ids, got, strict=True):
        out = model.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False)
        assert out[0, len(prompt):].tolist() == tokens


def test_bench_model_dir_is_a_bitbybit_llama_2_7b(tmp_path, monkeypatch, vllm_cpu):
    monkeypatch.setenv(BITS_ENV, "4")
    model = bench.write_model_dir(tmp_path, quantized=True)
    config = EngineArgs(model=str(model), load_format="dummy", skip_tokenizer_init=True).create_engine_config()
    assert config.model_config.quantization == "bitbybit" and config.quant_config.bits == 4
    assert config.model_config.get_hidden_size() == 4096
    assert "quantization_config" not in json.loads((bench.write_model_dir(tmp_path, False) / "config.json").read_text())


def test_heldout_windows_are_evenly_spaced_bos_windows(stories_rtn_ckpt, tmp_path):
    from kernels.qmodel import load_tokenizer

    tokenizer = load_tokenizer(str(stories_rtn_ckpt))
    text = tmp_path / "text.txt"
    text.write_text("Once upon a time there was a little girl who liked to play in the park. " * 40)
    ids = tokenizer(text.read_text(), add_special_tokens=False).input_ids
    windows = e2e.heldout_windows(tokenizer, text, 4, 32)
    step = len(ids) // 4
    assert [w[1:] for w in windows] == [ids[i * step:i * step + 31] for i in range(4)]
    assert all(len(w) == 32 and w[0] == tokenizer.bos_token_id for w in windows)
    with pytest.raises(ValueError, match="fewer than 100 windows"):
        e2e.heldout_windows(tokenizer, text, 100, 32)


def test_window_likelihoods_of_reference_and_served_model(stories_rtn_ckpt):
    """The reference scores a window as qat.eval does; vLLM's prompt_logprobs are read for the window's own tokens."""
    from types import SimpleNamespace

    window = [1, 403, 407, 261, 372, 320, 263]
    nll = e2e.window_nll(e2e.reference_model(str(stories_rtn_ckpt), 2, None, torch.float32, "cpu"), [window])[0]
    model, _, _ = load_quantized(str(stories_rtn_ckpt), bits=2)
    logp = model(input_ids=torch.tensor([window])).logits[0, :-1].log_softmax(-1)
    assert nll == pytest.approx(-float(logp.gather(1, torch.tensor(window[1:])[:, None]).sum()), rel=1e-5)

    entries = [None] + [{str(t): {"logprob": float(logp[i, t]), "rank": 3}, "7": {"logprob": -0.1, "rank": 1}}
                        for i, t in enumerate(window[1:])]
    response = SimpleNamespace(choices=[SimpleNamespace(model_extra={"prompt_logprobs": entries})])
    client = SimpleNamespace(completions=SimpleNamespace(create=lambda **kw: response))
    assert e2e.vllm_window_nll(client, window) == pytest.approx(nll, rel=1e-5)
