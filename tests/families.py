"""Tiny random-init models of the Hugging Face families the resolver must know (test data, no weights)."""

import transformers as T

#: name -> (config class, model class, config arguments); vocabulary 64 is added by :func:`build`.
FAMILIES = {
 "llama": (T.LlamaConfig, T.LlamaForCausalLM, dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)),
 "mistral": (T.MistralConfig, T.MistralForCausalLM, dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)),
 "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)),
 "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8)),
 "gemma": (T.GemmaConfig, T.GemmaForCausalLM, dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8)),
 "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM, dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8)),
 "phi": (T.PhiConfig, T.PhiForCausalLM, dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)),
 "phi3": (T.Phi3Config, T.Phi3ForCausalLM, dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)),
 "gpt2": (T.GPT2Config, T.GPT2LMHeadModel, dict(n_embd=32, n_layer=2, n_head=4)),
 "gpt_neox": (T.GPTNeoXConfig, T.GPTNeoXForCausalLM, dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)),
 "gptj": (T.GPTJConfig, T.GPTJForCausalLM, dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4)),
 "opt": (T.OPTConfig, T.OPTForCausalLM, dict(hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32)),
 "falcon": (T.FalconConfig, T.FalconForCausalLM, dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4)),
 "bloom": (T.BloomConfig, T.BloomForCausalLM, dict(hidden_size=32, n_layer=2, n_head=4)),
 "starcoder2": (T.Starcoder2Config, T.Starcoder2ForCausalLM, dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)),
 "mixtral": (T.MixtralConfig, T.MixtralForCausalLM, dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)),
 "qwen2_moe": (T.Qwen2MoeConfig, T.Qwen2MoeForCausalLM, dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2)),
 "t5": (T.T5Config, T.T5ForConditionalGeneration, dict(d_model=32, d_ff=48, d_kv=8, num_layers=2, num_heads=4, decoder_start_token_id=0, pad_token_id=0)),
 "bart": (T.BartConfig, T.BartForConditionalGeneration, dict(d_model=32, encoder_ffn_dim=48, decoder_ffn_dim=48, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4)),
 "distilbert": (T.DistilBertConfig, T.DistilBertForMaskedLM, dict(dim=32, hidden_dim=48, n_layers=2, n_heads=4)),
 "bert": (T.BertConfig, T.BertForMaskedLM, dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)),
 "roberta": (T.RobertaConfig, T.RobertaForMaskedLM, dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)),
 "gpt_bigcode": (T.GPTBigCodeConfig, T.GPTBigCodeForCausalLM, dict(n_embd=32, n_layer=2, n_head=4)),
 "olmo": (T.OlmoConfig, T.OlmoForCausalLM, dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)),
 "olmo2": (T.Olmo2Config, T.Olmo2ForCausalLM, dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)),
 "stablelm": (T.StableLmConfig, T.StableLmForCausalLM, dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)),
 "cohere": (T.CohereConfig, T.CohereForCausalLM, dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)),
 "granite": (T.GraniteConfig, T.GraniteForCausalLM, dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)),
 "mpt": (T.MptConfig, T.MptForCausalLM, dict(d_model=32, n_layers=2, n_heads=4)),
 "codegen": (T.CodeGenConfig, T.CodeGenForCausalLM, dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4)),
 "electra": (T.ElectraConfig, T.ElectraForMaskedLM, dict(hidden_size=32, embedding_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)),
 "gpt_oss": (T.GptOssConfig, T.GptOssForCausalLM, dict(hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2)),
 "qwen3_moe": (T.Qwen3MoeConfig, T.Qwen3MoeForCausalLM, dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, head_dim=8)),
}


SEVEN = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.gate", "mlp.down")
SIX = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down")
MOE = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.router", "mlp.experts.up", "mlp.experts.gate", "mlp.experts.down")
SEQ2SEQ = ("attn.q", "attn.k", "attn.v", "attn.o", "xattn.q", "xattn.k", "xattn.v", "xattn.o", "mlp.up", "mlp.down")

#: The canonical components each family must come out with (the decoder stack's, for encoder-decoders).
EXPECTED = {
    **{name: SEVEN for name in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "olmo2",
                                "stablelm", "cohere", "granite")},
    **{name: SIX for name in ("phi", "gpt2", "gpt_neox", "gptj", "opt", "falcon", "bloom", "starcoder2", "distilbert",
                              "bert", "roberta", "gpt_bigcode", "mpt", "codegen", "electra")},
    "mixtral": MOE, "qwen3_moe": MOE, "gpt_oss": MOE,
    "qwen2_moe": MOE + ("mlp.shared.up", "mlp.shared.gate", "mlp.shared.down", "mlp.shared.router"),
    "t5": SEQ2SEQ, "bart": SEQ2SEQ,
}


def build(name: str, **overrides):
    config_class, model_class, arguments = FAMILIES[name]
    return model_class(config_class(vocab_size=64, **{**arguments, **overrides}))
