"""Tiny Llama-architecture GGUF files written by the tests themselves (the ``gguf`` package).

:func:`write_tiny_llama_gguf` builds a seeded random 2-block Llama, stores its matrices as
Q8_0 blocks (norms in F32) in llama.cpp's layout, with a byte-level tokenizer of 256 byte
tokens plus an end-of-text token, and returns the model whose weights are the Q8_0 values
dequantized: what transformers must reproduce when it loads the file.
"""

from __future__ import annotations

from pathlib import Path

import torch

#: 256 byte tokens + <|endoftext|>; every text tokenizes within it.
VOCAB = 257
EOS = "<|endoftext|>"


def tiny_llama_config():
    """A 2-block Llama whose row lengths are multiples of Q8_0's block of 32."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=256, tie_word_embeddings=True,
                       bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)


def _llama_cpp_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order: each head's rotary halves interleaved (transformers undoes it)."""
    rows = weight.shape[0]
    return (weight.reshape(heads, 2, rows // heads // 2, -1).transpose(1, 2)
            .reshape(weight.shape))


def _byte_tokens() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spelling = bytes_to_unicode()
    return [spelling[b] for b in range(256)] + [EOS]


def write_tiny_llama_gguf(path: Path, seed: int = 0):
    """Write a tiny Llama GGUF to ``path``; return the reference model (eval mode).

    The reference's 2-D weights are replaced by their Q8_0 round trip, so loading the file
    must give the same logits up to float32 rounding.
    """
    import gguf
    import numpy as np
    from transformers import LlamaForCausalLM

    config = tiny_llama_config()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    q8 = gguf.GGMLQuantizationType.Q8_0
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(VOCAB)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(_byte_tokens())
    writer.add_token_types([gguf.TokenType.NORMAL] * 256 + [gguf.TokenType.CONTROL])
    writer.add_token_scores([0.0] * VOCAB)  # no merges: transformers derives none from these
    writer.add_bos_token_id(VOCAB - 1)
    writer.add_eos_token_id(VOCAB - 1)

    def matrix(name: str, param: torch.nn.Parameter, heads: int | None = None) -> None:
        data = param.detach().float().numpy()
        blocks = gguf.quants.quantize(data, q8)
        back = torch.from_numpy(gguf.quants.dequantize(blocks, q8).copy()).reshape(param.shape)
        with torch.no_grad():
            param.copy_(back)  # the reference holds what the file holds
        if heads is not None:
            blocks = gguf.quants.quantize(_llama_cpp_permute(back, heads).numpy(), q8)
        writer.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=q8)

    def vector(name: str, param: torch.nn.Parameter) -> None:
        writer.add_tensor(name, param.detach().float().numpy().astype(np.float32))

    matrix("token_embd.weight", model.model.embed_tokens.weight)
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        vector(f"blk.{i}.attn_norm.weight", layer.input_layernorm.weight)
        matrix(f"blk.{i}.attn_q.weight", attn.q_proj.weight, config.num_attention_heads)
        matrix(f"blk.{i}.attn_k.weight", attn.k_proj.weight, config.num_key_value_heads)
        matrix(f"blk.{i}.attn_v.weight", attn.v_proj.weight)
        matrix(f"blk.{i}.attn_output.weight", attn.o_proj.weight)
        vector(f"blk.{i}.ffn_norm.weight", layer.post_attention_layernorm.weight)
        matrix(f"blk.{i}.ffn_gate.weight", mlp.gate_proj.weight)
        matrix(f"blk.{i}.ffn_up.weight", mlp.up_proj.weight)
        matrix(f"blk.{i}.ffn_down.weight", mlp.down_proj.weight)
    vector("output_norm.weight", model.model.norm.weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    model.tie_weights()
    return model
