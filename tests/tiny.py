"""Tiny randomly initialised models built from configs in-process (no downloads), one per adapter family."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

TINY = dict(hidden=32, heads=4, layers=2, ffn=48)


def tiny_bert(num_labels: int = 2, seed: int = 0, layers: int = 2):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=64, num_labels=num_labels)
    return transformers.BertForSequenceClassification(cfg).eval()


def tiny_distilbert(num_labels: int = 2, seed: int = 0, layers: int = 2):
    torch.manual_seed(seed)
    cfg = transformers.DistilBertConfig(vocab_size=120, dim=32, n_layers=layers, n_heads=4, hidden_dim=48,
                                        max_position_embeddings=64, num_labels=num_labels)
    return transformers.DistilBertForSequenceClassification(cfg).eval()


def tiny_llama(seed: int = 0, layers: int = 2):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=120, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64,
                                   tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg).eval()


def _tiny_decoder(config_cls: str, model_cls: str, seed: int, layers: int, **extra):
    torch.manual_seed(seed)
    cfg = getattr(transformers, config_cls)(
        vocab_size=120, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, max_position_embeddings=64, tie_word_embeddings=True, **extra)
    return getattr(transformers, model_cls)(cfg).eval()


def tiny_mistral(seed: int = 0, layers: int = 2):
    return _tiny_decoder("MistralConfig", "MistralForCausalLM", seed, layers, head_dim=8)


def tiny_qwen2(seed: int = 0, layers: int = 2):  # biases on q/k/v
    return _tiny_decoder("Qwen2Config", "Qwen2ForCausalLM", seed, layers)


def tiny_qwen3(seed: int = 0, layers: int = 2):  # q/k norms; head_dim decoupled from hidden / heads
    return _tiny_decoder("Qwen3Config", "Qwen3ForCausalLM", seed, layers, head_dim=12)


def tiny_gemma3(seed: int = 0, layers: int = 2):  # post-sublayer norms, q/k norms, sliding-window layers
    return _tiny_decoder("Gemma3TextConfig", "Gemma3ForCausalLM", seed, layers, head_dim=16, sliding_window=4,
                         query_pre_attn_scalar=16)


def tiny_mamba(seed: int = 0, layers: int = 2):  # no heads or neurons: weight sparsity only
    """Every Linear's input width (in_proj 32, x_proj 64, dt_proj 4, out_proj 64) is a multiple of 4, for 2:4."""
    torch.manual_seed(seed)
    cfg = transformers.MambaConfig(vocab_size=64, hidden_size=32, state_size=4, num_hidden_layers=layers, expand=2,
                                   conv_kernel=4, time_step_rank=4, tie_word_embeddings=True)
    return transformers.MambaForCausalLM(cfg).eval()


FACTORIES = {"bert": tiny_bert, "distilbert": tiny_distilbert, "llama": tiny_llama, "mistral": tiny_mistral,
             "qwen2": tiny_qwen2, "qwen3": tiny_qwen3, "gemma3": tiny_gemma3}
DECODERS = ("llama", "mistral", "qwen2", "qwen3", "gemma3")
SPARSITY_ONLY_FACTORIES = {"mamba": tiny_mamba}  # families without heads and neurons: not in FACTORIES' suites


def tiny_inputs(batch: int = 3, seq: int = 10, seed: int = 1, vocab: int = 120):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for b in range(1, batch):  # mixed lengths: later rows are right-padded
        mask[b, seq - 2 * b:] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask}


WORDS = ("the a film movie story plot actor acting is was not very really too so good great fun funny smart "
         "moving bad dull boring slow silly awful and but with of it this that").split()


def tiny_tokenizer(directory: Path):
    """A BertTokenizerFast over a vocabulary written here (no downloads), ids < 120 like the tiny models."""
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "!", *WORDS]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # `vocab=` (a path): transformers 5 ignores `vocab_file=` here, and every word then becomes [UNK].
    return BertTokenizerFast(vocab=str(directory / "vocab.txt"), do_lower_case=True)
