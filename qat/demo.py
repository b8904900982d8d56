"""The embedded demo's teacher: a tiny Llama pretrained on the project's own corpus (:mod:`qat.corpus`).

``prepare_demo`` writes ``<run_dir>/corpus.txt`` and, unless already there, builds
``<run_dir>/teacher``: a BPE tokenizer trained on the corpus's training part and a
``LlamaForCausalLM`` (2 layers, hidden size 64, GQA) pretrained for a fixed number of AdamW steps.
Everything is seeded, so the same machine rebuilds the same teacher.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from .convert import SPACE
from .corpus import demo_corpus
from .data import split_text, token_stream
from .rundir import log

VOCAB_SIZE = 320
SEQ_LEN = 128
PRETRAIN_STEPS = 300
PRETRAIN_BATCH = 16
PRETRAIN_LR = 3e-3
HELDOUT_FRACTION = 0.1  # the teacher never sees the held-out text the demo evaluates on
# The QAT recipe of `python -m qat.run` with no arguments (flags still override it).
DEMO_RECIPE = {
    "heldout_fraction": HELDOUT_FRACTION,
    "n_train": 64,
    "n_val": 8,
    "seq_len": SEQ_LEN,
    "batch_size": 8,
    "epochs_per_stage": 2,
    "lr": 1e-3,
    "act_bits": 2,
    "threads": 1,
}


def train_tokenizer(text: str) -> PreTrainedTokenizerFast:
    """A byte-fallback BPE tokenizer (SentencePiece-style spaces) trained on ``text``."""
    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer(BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    trainer = BpeTrainer(vocab_size=VOCAB_SIZE + len(byte_tokens), special_tokens=specials + byte_tokens,
                         show_progress=False)
    tok.train_from_iterator(text.split("\n\n"), trainer)
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   clean_up_tokenization_spaces=False)


def teacher_config(vocab_size: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=SEQ_LEN,
                       rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)


def pretrain(model: LlamaForCausalLM, ids: torch.Tensor, device: torch.device, seed: int = 0) -> float:
    """Next-token training on random windows of ``ids``; returns the last step's loss."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, PRETRAIN_LR, total_steps=PRETRAIN_STEPS, pct_start=0.1)
    model.train()
    bar = tqdm(range(PRETRAIN_STEPS), desc="demo teacher pretraining", leave=False, dynamic_ncols=True)
    for _ in bar:
        starts = torch.randint(0, ids.numel() - SEQ_LEN - 1, (PRETRAIN_BATCH,), generator=gen)
        batch = torch.stack([ids[s:s + SEQ_LEN + 1] for s in starts]).to(device)
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return loss.item()


def demo_paths(run_dir: Path) -> tuple[Path, Path]:
    """``(teacher_dir, corpus_file)`` of the demo in a run directory."""
    return run_dir / "teacher", run_dir / "corpus.txt"


def prepare_demo(run_dir: Path, device: torch.device) -> None:
    """Write the demo corpus and build the teacher in ``run_dir`` if it is not there yet."""
    teacher_dir, corpus_file = demo_paths(run_dir)
    text = demo_corpus()
    corpus_file.write_text(text)
    if (teacher_dir / "model.safetensors").is_file():
        return
    start = time.perf_counter()
    torch.manual_seed(0)
    train_text, _ = split_text(text, HELDOUT_FRACTION)
    tokenizer = train_tokenizer(train_text)
    model = LlamaForCausalLM(teacher_config(len(tokenizer))).to(device)
    loss = pretrain(model, token_stream(tokenizer, train_text), device)
    model.save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    log.info(f"demo teacher: {sum(p.numel() for p in model.parameters())} parameters, pretrained "
             f"{PRETRAIN_STEPS} steps in {time.perf_counter() - start:.0f}s (final loss {loss:.3f}) -> {teacher_dir}")
