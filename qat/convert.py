"""Import a llama2.c model (legacy ``.bin``) and its ``tokenizer.bin`` / ``tok512.bin`` into a HF directory.

    python -m qat.convert MODEL.bin TOKENIZER.bin OUT_DIR

The result is a ``LlamaForCausalLM`` directory (config.json, model.safetensors) with a working
transformers tokenizer (tokenizer.json): the llama2.c vocabulary becomes a byte-fallback BPE whose
merges are ordered by the pieces' scores, which is how llama2.c (and SentencePiece BPE) encode.

llama2.c applies RoPE to interleaved pairs (x[2i], x[2i+1]); HF Llama rotates halves, so the rows
of wq/wk are permuted per head, as transformers' own Llama conversion script does.

End of text: llama2.c's training data separates texts with BOS (id 1) and never holds EOS
(``</s>``, id 2), so a model ends a story by predicting BOS, where llama2.c's sampler stops.
config.json keeps the vocabulary's EOS (2, the tokenizer's ``eos_token``); generation_config.json
lists ``eos_token_id: [2, 1]`` so that ``generate`` and the servers stop where llama2.c stops
(with EOS alone, generation runs on into a new story).
"""

from __future__ import annotations

import argparse
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

HEADER = struct.Struct("<7i")
VERSION1_MAGIC = 0x616B3432  # "ak42": llama2.c's newer export format
SPACE = "\u2581"  # SentencePiece's visible space
BOS_ID, EOS_ID = 1, 2
SPECIAL_NAMES = {0: "<unk>", BOS_ID: "<s>", EOS_ID: "</s>"}
FIRST_BYTE_TOKEN = 3  # llama2.c vocabularies hold <0x00>..<0xFF> at ids 3..258


@dataclass
class Llama2cHeader:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool


def read_header(raw: bytes) -> Llama2cHeader:
    """Parse the 7-int32 legacy header; a negative vocab size means an untied classifier."""
    if len(raw) < HEADER.size:
        raise ValueError("file too short to be a llama2.c checkpoint")
    if struct.unpack_from("<I", raw)[0] == VERSION1_MAGIC:
        raise ValueError("this is a llama2.c version-1 export; re-export it with llama2.c's --version 0 (legacy) format")
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = HEADER.unpack_from(raw)
    if min(dim, hidden, layers, heads, kv_heads, seq_len) <= 0 or dim % heads:
        raise ValueError(f"implausible llama2.c header {dim, hidden, layers, heads, kv_heads, vocab, seq_len}: "
                         "is this a llama2.c legacy .bin file?")
    return Llama2cHeader(dim, hidden, layers, heads, kv_heads, abs(vocab), seq_len, vocab > 0)


def permute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Interleaved-pair RoPE rows -> HF's rotate-half order, per head."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def read_llama2c_model(path: str | Path) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """The HF config and state dict of a llama2.c legacy checkpoint."""
    raw = Path(path).read_bytes()
    h = read_header(raw)
    head_dim = h.dim // h.n_heads
    kv_dim = head_dim * h.n_kv_heads
    floats = torch.frombuffer(bytearray(raw[HEADER.size:]), dtype=torch.float32)
    pos = 0

    def take(*shape: int) -> torch.Tensor:
        nonlocal pos
        n = 1
        for s in shape:
            n *= s
        if pos + n > floats.numel():
            raise ValueError(f"{path} is truncated: header promises more weights than the file holds")
        t = floats[pos:pos + n].reshape(shape).clone()
        pos += n
        return t

    L = h.n_layers
    emb = take(h.vocab_size, h.dim)
    rms_att, wq, wk, wv = take(L, h.dim), take(L, h.dim, h.dim), take(L, kv_dim, h.dim), take(L, kv_dim, h.dim)
    wo, rms_ffn = take(L, h.dim, h.dim), take(L, h.dim)
    w1, w2, w3 = take(L, h.hidden_dim, h.dim), take(L, h.dim, h.hidden_dim), take(L, h.hidden_dim, h.dim)
    rms_final = take(h.dim)
    take(h.seq_len, head_dim // 2)  # freq_cis_real: HF recomputes RoPE
    take(h.seq_len, head_dim // 2)  # freq_cis_imag
    classifier = emb if h.shared_classifier else take(h.vocab_size, h.dim)
    if pos != floats.numel():
        raise ValueError(f"{path}: {floats.numel() - pos} unexpected trailing floats; not a legacy llama2.c checkpoint")

    config = LlamaConfig(
        hidden_size=h.dim, intermediate_size=h.hidden_dim, num_hidden_layers=L, num_attention_heads=h.n_heads,
        num_key_value_heads=h.n_kv_heads, head_dim=head_dim, vocab_size=h.vocab_size,
        max_position_embeddings=h.seq_len, rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu",
        tie_word_embeddings=h.shared_classifier, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
    )
    sd = {"model.embed_tokens.weight": emb, "model.norm.weight": rms_final}
    if not h.shared_classifier:
        sd["lm_head.weight"] = classifier
    for i in range(L):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = rms_att[i]
        sd[p + "post_attention_layernorm.weight"] = rms_ffn[i]
        sd[p + "self_attn.q_proj.weight"] = permute_rope(wq[i], h.n_heads)
        sd[p + "self_attn.k_proj.weight"] = permute_rope(wk[i], h.n_kv_heads)
        sd[p + "self_attn.v_proj.weight"] = wv[i]
        sd[p + "self_attn.o_proj.weight"] = wo[i]
        sd[p + "mlp.gate_proj.weight"] = w1[i]
        sd[p + "mlp.down_proj.weight"] = w2[i]
        sd[p + "mlp.up_proj.weight"] = w3[i]
    return config, sd


def read_llama2c_vocab(path: str | Path, vocab_size: int) -> tuple[list[str], list[float]]:
    """Pieces and scores of a llama2.c ``tokenizer.bin``, in SentencePiece spelling (spaces as '▁')."""
    raw = Path(path).read_bytes()
    pos, pieces, scores = 4, [], []  # int32 max_token_length first
    for i in range(vocab_size):
        if pos + 8 > len(raw):
            raise ValueError(f"{path} holds fewer than the model's {vocab_size} tokens; wrong tokenizer for this model?")
        score, n = struct.unpack_from("<fi", raw, pos)
        piece = raw[pos + 8:pos + 8 + n].decode("utf-8")
        pos += 8 + n
        pieces.append(SPECIAL_NAMES.get(i, piece.replace(" ", SPACE)))
        scores.append(score)
    if pos != len(raw):
        raise ValueError(f"{path} holds more than the model's {vocab_size} tokens; wrong tokenizer for this model?")
    for b in range(256):
        if pieces[FIRST_BYTE_TOKEN + b] != f"<0x{b:02X}>":
            raise ValueError(f"{path}: token {FIRST_BYTE_TOKEN + b} is {pieces[FIRST_BYTE_TOKEN + b]!r}, expected a "
                             "byte-fallback token; only llama2.c SentencePiece vocabularies are supported")
    return pieces, scores


def bpe_merges(pieces: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Merges that reproduce score-ordered BPE: each mergeable piece's splits into two vocabulary pieces,
    pieces taken by descending score (ties by id), so HF's lowest-rank-first equals highest-score-first."""
    first_merge = FIRST_BYTE_TOKEN + 256
    ids = {p: i for i, p in enumerate(pieces) if i >= first_merge or len(p) == 1}
    order = sorted(range(first_merge, len(pieces)), key=lambda i: (-scores[i], i))
    merges = []
    for i in order:
        p = pieces[i]
        splits = [(p[:k], p[k:]) for k in range(1, len(p)) if p[:k] in ids and p[k:] in ids]
        merges.extend(sorted(splits, key=lambda s: (ids[s[0]], ids[s[1]])))
    return merges


def build_tokenizer(pieces: list[str], scores: list[float]) -> PreTrainedTokenizerFast:
    """A transformers tokenizer equivalent to llama2.c's encoder (dummy prefix space, byte fallback, BOS added)."""
    vocab = {p: i for i, p in enumerate(pieces)}
    tok = Tokenizer(BPE(vocab=vocab, merges=bpe_merges(pieces, scores), unk_token="<unk>", fuse_unk=True,
                        byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", BOS_ID)])
    tok.add_special_tokens(list(SPECIAL_NAMES.values()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   clean_up_tokenization_spaces=False, add_bos_token=True, add_eos_token=False)


def convert(model_bin: str | Path, tokenizer_bin: str | Path, out_dir: str | Path) -> Path:
    """Write a HF LlamaForCausalLM directory with tokenizer for a llama2.c model; returns ``out_dir``."""
    for p in (model_bin, tokenizer_bin):
        if not Path(p).is_file():
            raise FileNotFoundError(f"{p} not found")
    config, sd = read_llama2c_model(model_bin)
    pieces, scores = read_llama2c_vocab(tokenizer_bin, config.vocab_size)
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.generation_config.eos_token_id = [EOS_ID, BOS_ID]  # texts end with BOS in llama2.c (module docstring)
    out = Path(out_dir)
    model.save_pretrained(out)
    build_tokenizer(pieces, scores).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m qat.convert", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Import a llama2.c model (legacy .bin) and its tokenizer.bin / tok512.bin into a HF\n"
                    "LlamaForCausalLM directory (config.json, model.safetensors, tokenizer.json) that\n"
                    "python -m qat.run --model can read. Runs on the CPU, no network.",
        epilog="example:\n"
               "  python -m qat.convert stories260K.bin tok512.bin runs/stories260K-hf\n"
               "  python -m qat.run --model runs/stories260K-hf --recipe recipes/stories260k.toml\n")
    ap.add_argument("model_bin", metavar="MODEL.bin", help="llama2.c legacy checkpoint, e.g. stories260K.bin")
    ap.add_argument("tokenizer_bin", metavar="TOKENIZER.bin", help="llama2.c vocabulary: tokenizer.bin or tok512.bin")
    ap.add_argument("out_dir", metavar="OUT_DIR", help="HF model directory to write")
    args = ap.parse_args(argv)
    print(f"wrote {convert(args.model_bin, args.tokenizer_bin, args.out_dir)}")


if __name__ == "__main__":
    main()
