"""qat.eval: perplexity windows, and the export -> load -> eval round trip on stories260K."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from qat.data import split_text, text_part
from qat.eval import main, perplexity


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_non_overlapping_windows_match_the_model_loss(tiny_llama_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    ids = torch.randint(3, 200, (70,), generator=torch.Generator().manual_seed(1))
    got = perplexity(model, ids, ctx=32, stride=32)
    nll, n = 0.0, 0
    with torch.no_grad():
        for start in range(0, 70, 32):
            w = ids[start:start + 32].unsqueeze(0)
            loss = model(input_ids=w, labels=w).loss.item()  # mean over the window's len-1 predictions
            nll += loss * (w.shape[1] - 1)
            n += w.shape[1] - 1
    assert got.tokens == n == 67
    assert math.isclose(got.ppl, math.exp(nll / n), rel_tol=1e-5)


def test_strided_windows_score_every_token_once(tiny_llama_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    ids = torch.randint(3, 200, (90,), generator=torch.Generator().manual_seed(2))
    assert perplexity(model, ids, ctx=32, stride=8).tokens == 89


def test_heldout_part_never_overlaps_the_training_part() -> None:
    text = "\n\n".join(f"paragraph {i} " * 5 for i in range(100))
    train, heldout = split_text(text, 0.1)
    assert train + heldout == text and train.endswith("\n\n") and heldout.startswith("paragraph ")
    assert 0.08 < len(heldout) / len(text) < 0.12
    assert text_part(text, "heldout", 0.1) == heldout and text_part(text, "train", 0.1) == train


def test_round_trip_8_bit_within_1_percent_of_full_precision(stories_rtn_ckpt: Path, stories_hf: Path,
                                                           shared_data: Path, tmp_path: Path) -> None:
    """stories260K exported (with split channels), loaded through the reference ops, evaluated: W8 ~ FP."""
    data = shared_data / "tinystories-val" / "tinystories_val.txt"
    main([str(stories_rtn_ckpt), "--bits", "8,2", "--data", str(data), "--data-part", "heldout", "--ctx", "512",
          "--max-tokens", "8192", "--fp", str(stories_hf), "--threads", "1", "--out", str(tmp_path)])
    table = json.loads(next(tmp_path.glob("*.json")).read_text())
    ppl = {r["w_bits"]: r["ppl"] for r in table["rows"]}  # 16: the FP row
    assert table["ctx"] == 512 and table["stride"] == 512 and table["tokens_scored"] > 8000
    assert abs(ppl[8] / ppl[16] - 1) < 0.01
    assert ppl[2] > ppl[8]
    assert (tmp_path / next(tmp_path.glob("*.json")).name.replace(".json", ".md")).is_file()


def test_checkpoint_is_about_8_bits_per_weight(stories_rtn_ckpt: Path) -> None:
    """Quantized layers cost 8 bits per stored weight plus group scales and zeros, no float copies.

    8 bits + 16/32 (E4M3 scale and zero per group of 32) + 32/K (a fp32 row scale): 0.5 bits at
    stories260K's K = 64, 0.008 at K = 4096.
    """
    from safetensors.torch import load_file

    tensors = load_file(str(stories_rtn_ckpt / "model.safetensors"))
    codes = [t for k, t in tensors.items() if k.endswith(".codes")]
    extra = [t for k, t in tensors.items() if k.endswith((".scales", ".zeros", ".row_scale", ".split_index"))]
    weights = sum(t.numel() for t in codes)
    bits = 8 * sum(t.numel() * t.element_size() for t in codes + extra) / weights
    assert 8.5 < bits < 9.0
    assert not any(k.endswith("_proj.weight") for k in tensors)


def test_compact_export_evaluates_like_the_full_checkpoint_at_its_bits(stories_rtn_ckpt: Path, stories_rtn_w2_ckpt: Path,
                                                                      shared_data: Path, tmp_path: Path) -> None:
    """The same run exported with ``--export-bits 2``: qat.eval (default: the stored precision) gives the full
    checkpoint's W2 perplexity exactly; another precision is refused naming the stored one."""
    data = shared_data / "tinystories-val" / "tinystories_val.txt"
    common = ["--data", str(data), "--data-part", "heldout", "--ctx", "512", "--max-tokens", "2048", "--no-fp",
              "--threads", "1"]
    ppl = {}
    for name, ckpt, bits in (("full", stories_rtn_ckpt, ["--bits", "2"]), ("w2", stories_rtn_w2_ckpt, [])):
        main([str(ckpt), *bits, *common, "--out", str(tmp_path / name)])
        rows = json.loads(next((tmp_path / name).glob("*.json")).read_text())["rows"]
        ppl[name] = [(r["w_bits"], r["ppl"]) for r in rows]
    assert ppl["w2"] == ppl["full"] and ppl["w2"][0][0] == 2
    with pytest.raises(SystemExit, match="error: this checkpoint is a compact 2-bit export.*asked for 8"):
        main([str(stories_rtn_w2_ckpt), "--bits", "8", *common, "--out", str(tmp_path / "w8")])


def test_compact_export_stores_a_quarter_of_the_codes(stories_rtn_ckpt: Path, stories_rtn_w2_ckpt: Path) -> None:
    """``--export-bits 2``: the codes take exactly 2/8 of the master codes' bytes; scales, zeros, row
    scales, split indices and the float tensors are the full checkpoint's, byte for byte."""
    from safetensors.torch import load_file

    full, w2 = (load_file(str(d / "model.safetensors")) for d in (stories_rtn_ckpt, stories_rtn_w2_ckpt))
    codes = {k.removesuffix(".codes") for k in full if k.endswith(".codes")}
    assert codes and codes == {k.removesuffix(".packed") for k in w2 if k.endswith(".packed")}
    assert sum(w2[f"{p}.packed"].numel() * 4 for p in codes) * 4 == sum(full[f"{p}.codes"].numel() for p in codes)
    rest = {k for k in full if not k.endswith(".codes")}
    assert rest == {k for k in w2 if not k.endswith(".packed")}
    assert all(torch.equal(full[k].view(torch.uint8), w2[k].view(torch.uint8)) for k in rest
               if full[k].dtype == torch.float8_e4m3fn)
    assert all(torch.equal(full[k], w2[k]) for k in rest if full[k].dtype != torch.float8_e4m3fn)
