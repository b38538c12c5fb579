"""AttentionHeatmap against an independent reference computed from the model's own pieces.

The reference captures each attention's q and k projection outputs with forward hooks, applies the model's
rotary embedding (its own ``position_embeddings`` with the modeling module's public ``apply_rotary_pos_emb``),
masks as the family does (causal, sliding window, padding), and takes the entropy from the eager
``output_attentions=True`` probabilities of the same forward. The callback's values are read back from the
npz files and event files a user reads.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import transformers as T
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_heatmaps import AttentionHeatmap, attention_statistics
from lightning_heatmaps.attention import allowed_keys

from conftest import VOCAB, make_trainer, read_events, scalar_series

def _build(cls, config, implementation):
    model = cls(config)
    model.set_attn_implementation(implementation)
    return model


FAMILIES = {
    "llama": lambda impl: _build(T.LlamaForCausalLM, T.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=64), impl),
    "gpt2": lambda impl: _build(T.GPT2LMHeadModel, T.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0,
        attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, scale_attn_by_inverse_layer_idx=True), impl),
    "gemma2": lambda impl: _build(T.Gemma2ForCausalLM, T.Gemma2Config(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, vocab_size=VOCAB, max_position_embeddings=64, sliding_window=4, attn_logit_softcapping=0.1,
        query_pre_attn_scalar=1, final_logit_softcapping=None), impl),
    "bert": lambda impl: _build(T.BertForMaskedLM, T.BertConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), impl),
    "bart": lambda impl: _build(T.BartForConditionalGeneration, T.BartConfig(
        d_model=32, encoder_ffn_dim=48, decoder_ffn_dim=48, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=64,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, decoder_start_token_id=2), impl),
    "t5": lambda impl: _build(T.T5ForConditionalGeneration, T.T5Config(
        d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4, vocab_size=VOCAB,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0, pad_token_id=1,
        eos_token_id=2, decoder_start_token_id=2), impl),
    # attention sinks (a learned per-head logit every row may attend to instead of a key), alternating windows
    "gpt_oss": lambda impl: _build(T.GptOssForCausalLM, T.GptOssConfig(
        hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, num_local_experts=4, num_experts_per_tok=2, vocab_size=VOCAB, max_position_embeddings=64,
        sliding_window=4, layer_types=["sliding_attention", "full_attention"]), impl),
}


class PaddedModel(L.LightningModule):
    """A Hugging Face model trained on (tokens, attention mask) batches with right padding."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def inputs(self, batch):
        ids, mask = batch
        kwargs = dict(input_ids=ids, attention_mask=mask)
        if self.model.config.is_encoder_decoder:
            kwargs.update(decoder_input_ids=ids, decoder_attention_mask=mask)
        return kwargs

    def training_step(self, batch, batch_idx):
        logits = self.model(**self.inputs(batch)).logits
        return logits.float().logsumexp(-1).mean() + logits.float().square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def padded_loader(batches=3, batch_size=3, length=12, seed=0, padded=True):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batches * batch_size, length), generator=generator)
    mask = torch.ones_like(ids)
    if padded:
        for row in range(len(ids)):
            mask[row, length - row % 4 * 2 :] = 0  # 0, 2, 4 or 6 padding positions at the end
    return torch.utils.data.DataLoader(list(zip(ids, mask)), batch_size=batch_size)


# --- the independent reference ---------------------------------------------------------------------


def _sites(model):
    """(q module, k module, heads, kv heads, rope module or None, scale, kind, window, key source) per row, in
    the callback's row order; kind is causal / bidirectional / cross."""
    config = model.config
    if isinstance(model, (T.LlamaForCausalLM, T.Gemma2ForCausalLM, T.GptOssForCausalLM)):
        scale = (config.query_pre_attn_scalar ** -0.5) if isinstance(model, T.Gemma2ForCausalLM) else config.head_dim ** -0.5
        rows = []
        for i, layer in enumerate(model.model.layers):
            window = config.sliding_window if getattr(config, "layer_types", None) and config.layer_types[i] == "sliding_attention" else None
            a = layer.self_attn
            rows.append((a.q_proj, a.k_proj, config.num_attention_heads, config.num_key_value_heads, a, scale, "causal", window))
        return rows
    if isinstance(model, T.GPT2LMHeadModel):
        head_dim = config.n_embd // config.n_head
        return [(b.attn.c_attn, b.attn.c_attn, config.n_head, config.n_head, None, head_dim ** -0.5 / (i + 1), "causal", None)
                for i, b in enumerate(model.transformer.h)]
    if isinstance(model, T.BertForMaskedLM):
        return [(l.attention.self.query, l.attention.self.key, 4, 4, None, 8 ** -0.5, "bidirectional", None)
                for l in model.bert.encoder.layer]
    if isinstance(model, T.T5ForConditionalGeneration):  # no scaling: T5 folds it into its weights
        rows = [(b.layer[0].SelfAttention.q, b.layer[0].SelfAttention.k, 4, 4, None, 1.0, "bidirectional", None)
                for b in model.encoder.block]
        for b in model.decoder.block:
            rows.append((b.layer[0].SelfAttention.q, b.layer[0].SelfAttention.k, 4, 4, None, 1.0, "causal", None))
            rows.append((b.layer[1].EncDecAttention.q, b.layer[1].EncDecAttention.k, 4, 4, None, 1.0, "cross", None))
        return rows
    rows = [(l.self_attn.q_proj, l.self_attn.k_proj, 4, 4, None, 8 ** -0.5, "bidirectional", None) for l in model.model.encoder.layers]
    for l in model.model.decoder.layers:
        rows.append((l.self_attn.q_proj, l.self_attn.k_proj, 4, 4, None, 8 ** -0.5, "causal", None))
        rows.append((l.encoder_attn.q_proj, l.encoder_attn.k_proj, 4, 4, None, 8 ** -0.5, "cross", None))
    return rows


def _row_probabilities(model, result):
    """The ``output_attentions`` probabilities in the callback's row order: the encoder's, then per decoder block
    its self and its cross attention."""
    if not model.config.is_encoder_decoder:
        return list(result.attentions)
    probabilities = [*result.encoder_attentions]
    for self_, cross in zip(result.decoder_attentions, result.cross_attentions):
        probabilities += [self_, cross]
    return probabilities


def reference(model, kwargs):
    """Per row and head: the exact max logit and mean row entropy, and the output logits' log Z mean and max |.|."""
    sites = _sites(model)
    outputs: dict[int, torch.Tensor] = {}
    rope: dict[int, tuple] = {}
    handles = []
    for q, k, *_ in sites:
        for module in (q, k):
            handles.append(module.register_forward_hook(lambda m, a, o: outputs.setdefault(id(m), []).append(o.detach())))
    for site in sites:
        if site[4] is not None:
            handles.append(site[4].register_forward_pre_hook(
                lambda m, a, kw: rope.setdefault(id(m), kw["position_embeddings"]) and None, with_kwargs=True))
    implementation = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            result = model(**kwargs, output_attentions=True)
    finally:
        model.set_attn_implementation(implementation)
        for handle in handles:
            handle.remove()
    probabilities = _row_probabilities(model, result)
    mask = kwargs["attention_mask"].bool()
    queries_mask = kwargs.get("decoder_attention_mask", mask).bool()
    calls: dict[int, int] = {}
    maxima, entropies = [], []
    for (q_mod, k_mod, heads, kv_heads, rope_owner, scale, kind, window), p in zip(sites, probabilities):
        def take(module):
            index = calls.get(id(module), 0)
            calls[id(module)] = index + 1
            return outputs[id(module)][index]
        if q_mod is k_mod:  # GPT-2's fused c_attn
            fused = take(q_mod)
            q_out, k_out = fused.split(fused.shape[-1] // 3, dim=-1)[:2]
        else:
            q_out, k_out = take(q_mod), take(k_mod)
        batch, length = q_out.shape[:2]
        q = q_out.view(batch, length, heads, -1).transpose(1, 2)
        k = k_out.view(batch, k_out.shape[1], kv_heads, -1).transpose(1, 2)
        if rope_owner is not None:
            module = sys.modules[type(rope_owner).__module__]
            cos, sin = rope[id(rope_owner)]
            q, k = module.apply_rotary_pos_emb(q, k, cos, sin)
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        logits = (q @ k.transpose(-1, -2)) * scale
        keys = k.shape[2]
        if kind == "cross":
            allowed = mask[:, None, None, :].expand(batch, 1, length, keys)
            rows = queries_mask
        else:
            key_mask = mask if kind == "bidirectional" else queries_mask
            allowed = key_mask[:, None, None, :].expand(batch, 1, length, keys).clone()
            position = torch.arange(length)
            if kind == "causal":
                allowed &= position[None, :] <= position[:, None]
            if window is not None:
                allowed &= position[None, :] > position[:, None] - window
            rows = key_mask
        counted = allowed & rows[:, None, :, None]
        maxima.append(logits.masked_fill(~counted, -math.inf).amax(dim=(0, 2, 3)))
        entropy = -(p * torch.where(p > 0, p.log(), 0.0)).sum(-1)  # [B, H, L]
        if isinstance(model, T.GptOssForCausalLM):  # the sink's share: the probabilities returned leave it out
            sink = (1.0 - p.sum(-1)).clamp_min(0.0)
            entropy = entropy - sink * torch.where(sink > 0, sink.log(), 0.0)
        weights = rows[:, None, :].float()
        entropies.append((entropy * weights).sum(dim=(0, 2)) / weights.sum(dim=(0, 2)))
    logits = result.logits.float()
    log_z = torch.logsumexp(logits, -1)
    output = (float(log_z[queries_mask].mean()), float(logits.abs()[queries_mask].max()))
    return torch.stack(maxima).numpy(), torch.stack(entropies).numpy(), output


class Reference(Callback):
    """Records the reference at the start of each sampled step (before the AttentionHeatmap taps go in)."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.values: dict[int, tuple] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step % self.every == 0:
            self.values[trainer.global_step] = reference(pl_module.model, pl_module.inputs(batch))


def run(tmp_path, model, loader, steps=3, every=2, extra=(), **options):
    callback = AttentionHeatmap(every_n_steps=every, min_render_interval_seconds=0, **options)
    ref = Reference(every)
    trainer = make_trainer(tmp_path, [ref, callback, *extra], max_steps=steps)
    trainer.fit(PaddedModel(model), loader)
    return trainer, callback, ref


def check_against_reference(trainer, callback, ref, labels):
    log_dir = trainer.logger.log_dir
    events = read_events(log_dir)
    top = np.load(f"{log_dir}/heatmaps/attention_max_logit/layer_x_head.npz")
    entropy = np.load(f"{log_dir}/heatmaps/attention_entropy/layer_x_head.npz")
    last = max(ref.values)
    assert int(top["step"]) == last and str(top["metric"]) == "attention_max_logit"
    assert top["layer_labels"].tolist() == labels and top["component_labels"].tolist() == ["0", "1", "2", "3"]
    assert not top["missing"].any()
    expected_top, expected_entropy, (log_z, max_abs) = ref.values[last]
    np.testing.assert_allclose(top["values"], expected_top, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(entropy["values"], expected_entropy, rtol=1e-5, atol=1e-6)
    tags = callback._layer_tags
    for step, (expected_top, expected_entropy, (log_z, max_abs)) in ref.values.items():
        for row, tag in enumerate(tags):
            assert scalar_series(events, f"attention_max_logit/{tag}/all")[step] == pytest.approx(expected_top[row].max(), rel=1e-5)
        # the per-layer entropy is the row-weighted mean over heads: every head has the layer's rows
        for row, tag in enumerate(tags):
            assert scalar_series(events, f"attention_entropy/{tag}/all")[step] == pytest.approx(expected_entropy[row].mean(), rel=1e-5)
        assert scalar_series(events, "output_logits/log_z_mean")[step] == pytest.approx(log_z, rel=1e-5)
        assert scalar_series(events, "output_logits/max_abs")[step] == pytest.approx(max_abs, rel=1e-5)
    per_layer = [t for t in events.Tags()["scalars"] if t.startswith("attention_")]
    assert len(per_layer) == 2 * len(labels)  # a fixed number of tags: one per layer and metric, not per head
    history = np.load(f"{log_dir}/heatmaps/attention_max_logit/layer_x_step.npz")
    assert history["steps"].tolist() == sorted(ref.values)
    np.testing.assert_allclose(history["values"][:, -1], ref.values[last][0].max(axis=1), rtol=1e-5)


@pytest.mark.parametrize(("family", "implementation", "labels"), [
    ("llama", "eager", ["0", "1"]),
    ("llama", "sdpa", ["0", "1"]),
    ("gpt2", "sdpa", ["0", "1"]),
    ("gemma2", "eager", ["0", "1"]),
    ("gpt_oss", "eager", ["0", "1"]),
    ("bert", "sdpa", ["0", "1"]),
    ("bart", "sdpa", ["enc.0", "enc.1", "dec.0", "dec_xattn.0", "dec.1", "dec_xattn.1"]),
    ("t5", "eager", ["enc.0", "enc.1", "dec.0", "dec_xattn.0", "dec.1", "dec_xattn.1"]),
    ("t5", "sdpa", ["enc.0", "enc.1", "dec.0", "dec_xattn.0", "dec.1", "dec_xattn.1"]),
])
def test_matches_reference_from_model_pieces(tmp_path, family, implementation, labels):
    torch.manual_seed(0)
    model = FAMILIES[family](implementation)
    trainer, callback, ref = run(tmp_path, model, padded_loader())
    assert sorted(ref.values) == [0, 2]
    check_against_reference(trainer, callback, ref, labels)
    assert model.config._attn_implementation == implementation  # restored: the model computes as it did


# --- plain models: a scaled_dot_product_attention call, nn.MultiheadAttention ---------------------------


class SdpaBlock(nn.Module):
    def __init__(self, width=16, num_heads=4):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x):
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.out(y.transpose(1, 2).reshape(batch, length, width))


class PlainModel(L.LightningModule):
    def __init__(self, block=SdpaBlock, checkpointing=False):
        super().__init__()
        self.blocks = nn.ModuleList([block(), block()])
        self.checkpointing = checkpointing

    def forward(self, x):
        for block in self.blocks:
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False) if self.checkpointing else block(x)
        return x

    def training_step(self, batch, batch_idx):
        return self(batch).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class PlainReference(Callback):
    """q and k from each block's own qkv projection, by torch ops: causal max logit and softmax entropy."""

    def __init__(self):
        self.values = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step % 2:
            return
        captured = []
        handles = [b.qkv.register_forward_hook(lambda m, a, o: captured.append(o.detach())) for b in pl_module.blocks]
        with torch.no_grad():
            pl_module(batch)
        for handle in handles:
            handle.remove()
        maxima, entropies = [], []
        for out in captured:
            batch_size, length, _ = out.shape
            q, k, _ = out.view(batch_size, length, 3, 4, -1).permute(2, 0, 3, 1, 4)
            logits = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
            causal = torch.ones(length, length, dtype=torch.bool).tril()
            logits = logits.masked_fill(~causal, -math.inf)
            p = logits.softmax(-1)
            maxima.append(logits.amax(dim=(0, 2, 3)))
            entropies.append(-(p * torch.where(p > 0, p.log(), 0.0)).sum(-1).mean(dim=(0, 2)))
        self.values[trainer.global_step] = (torch.stack(maxima).numpy(), torch.stack(entropies).numpy())


def _latest(trainer, metric):
    return np.load(f"{trainer.logger.log_dir}/heatmaps/attention_{metric}/layer_x_head.npz")["values"]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_plain_sdpa_model_matches_reference_and_checkpointing_is_not_seen(tmp_path, checkpointing):
    torch.manual_seed(0)
    model = PlainModel(checkpointing=checkpointing)
    seen = []
    callback = AttentionHeatmap(every_n_steps=2, min_render_interval_seconds=0)
    callback.add_sample_listener(seen.append)
    reference = PlainReference()
    trainer = make_trainer(tmp_path, [reference, callback], max_steps=3)
    trainer.fit(model, torch.utils.data.DataLoader(torch.randn(12, 6, 16), batch_size=4))
    expected_top, expected_entropy = reference.values[2]
    np.testing.assert_allclose(_latest(trainer, "max_logit"), expected_top, rtol=1e-5)
    np.testing.assert_allclose(_latest(trainer, "entropy"), expected_entropy, rtol=1e-5)
    assert [sample.step for sample in seen] == [0, 2]


def test_recomputed_forward_during_backward_sees_no_taps(tmp_path):
    """Activation checkpointing re-runs the forward during backward: the taps are gone by then."""
    torch.manual_seed(0)
    model = FAMILIES["llama"]("sdpa")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    during_backward = []

    class InBackward(Callback):
        inside = False

        def on_before_backward(self, trainer, pl_module, loss):
            InBackward.inside = True

        def on_after_backward(self, trainer, pl_module):
            InBackward.inside = False

    for layer in model.model.layers:
        layer.self_attn.register_forward_pre_hook(
            lambda m, a: during_backward.append(model.config._attn_implementation) if InBackward.inside else None)
    trainer, callback, ref = run(tmp_path, model, padded_loader(), extra=[InBackward()])
    check_against_reference(trainer, callback, ref, ["0", "1"])
    assert during_backward and set(during_backward) == {"sdpa"}  # recomputed with the model's own implementation


class MultiheadModel(L.LightningModule):
    """nn.TransformerEncoder (nn.MultiheadAttention inside) on padded vectors."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True),
                                             num_layers=2, enable_nested_tensor=False)

    def training_step(self, batch, batch_idx):
        x, padding = batch
        return self.encoder(x, src_key_padding_mask=padding).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_multihead_attention_with_padding_matches_its_own_weights(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(8, 7, 16)
    padding = torch.zeros(8, 7, dtype=torch.bool)
    padding[::2, 5:] = True
    model = MultiheadModel()
    values = {}

    class Reference(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step % 2:
                return
            x, pad = batch
            maxima, entropies = [], []
            h = x
            with torch.no_grad():
                for layer in pl_module.encoder.layers:
                    attention = layer.self_attn
                    _, p = attention(h, h, h, key_padding_mask=pad, need_weights=True, average_attn_weights=False)
                    w, b = attention.in_proj_weight, attention.in_proj_bias
                    q = (h @ w[:16].T + b[:16]).view(8, 7, 2, 8).transpose(1, 2)
                    k = (h @ w[16:32].T + b[16:32]).view(8, 7, 2, 8).transpose(1, 2)
                    logits = (q @ k.transpose(-1, -2)) / math.sqrt(8)
                    keep = ~pad[:, None, :, None] & ~pad[:, None, None, :]
                    maxima.append(logits.masked_fill(~keep, -math.inf).amax(dim=(0, 2, 3)))
                    entropy = -(p * torch.where(p > 0, p.log(), 0.0)).sum(-1)
                    rows = (~pad)[:, None, :].float()
                    entropies.append((entropy * rows).sum(dim=(0, 2)) / rows.sum(dim=(0, 2)))
                    h = layer(h, src_key_padding_mask=pad)
            values[trainer.global_step] = (torch.stack(maxima).numpy(), torch.stack(entropies).numpy())

    callback = AttentionHeatmap(every_n_steps=2, min_render_interval_seconds=0)
    trainer = make_trainer(tmp_path, [Reference(), callback], max_steps=3)
    trainer.fit(model, torch.utils.data.DataLoader(list(zip(x, padding)), batch_size=8))
    np.testing.assert_allclose(_latest(trainer, "max_logit"), values[2][0], rtol=1e-5)
    np.testing.assert_allclose(_latest(trainer, "entropy"), values[2][1], rtol=1e-5)


# --- errors, NaN, the pure function ----------------------------------------------------------------------


def test_no_attention_is_a_clear_error_at_fit_start(tmp_path):
    class MLP(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))

        def training_step(self, batch, batch_idx):
            return self.blocks(batch).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = make_trainer(tmp_path, [AttentionHeatmap(every_n_steps=1)], max_steps=1)
    with pytest.raises(ValueError, match="found no attention it can see in MLP: it looks for Hugging Face"):
        trainer.fit(MLP(), torch.utils.data.DataLoader(torch.randn(4, 16), batch_size=4))

    class Silent(nn.Module):  # says it has heads, but calls no attention function
        num_heads = 2

        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(16, 16)

        def forward(self, x):
            return self.linear(x)

    trainer = make_trainer(tmp_path, [AttentionHeatmap(every_n_steps=1)], max_steps=1)
    with pytest.raises(RuntimeError, match="saw no attention in the training forward of step 0: it looked for calls "
                                           "of torch.nn.functional.scaled_dot_product_attention inside the blocks"):
        trainer.fit(PlainModel(block=Silent), torch.utils.data.DataLoader(torch.randn(4, 6, 16), batch_size=4))

    bloom = T.BloomForCausalLM(T.BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=VOCAB))  # ALiBi, own code
    trainer = make_trainer(tmp_path, [AttentionHeatmap(every_n_steps=1)], max_steps=1)
    with pytest.raises(RuntimeError, match="looked for calls of the attention function registered in transformers' "
                                           "AttentionInterface .models whose attention does not go through it, e.g. BLOOM"):
        trainer.fit(PaddedModel(bloom), padded_loader())


class FrozenModel(PaddedModel):
    """Trains a scale of the logits alone: the attention inputs need no gradient, so flex_attention runs on CPU
    (torch 2.13 has no flex_attention backward on CPU), and the training step still has a backward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        model.requires_grad_(False)
        self.temperature = nn.Parameter(torch.ones(()))

    def training_step(self, batch, batch_idx):
        logits = self.model(**self.inputs(batch)).logits.float() * self.temperature
        return logits.logsumexp(-1).mean() + logits.square().mean()


@pytest.mark.parametrize(("family", "labels"), [
    ("gemma2", ["0", "1"]),
    ("bart", ["enc.0", "enc.1", "dec.0", "dec_xattn.0", "dec.1", "dec_xattn.1"]),
])
def test_flex_attention_matches_reference_from_model_pieces(tmp_path, family, labels):
    """flex_attention's BlockMasks with padding (Gemma 2: GQA, causal, sliding window, soft-cap; BART:
    bidirectional, causal and cross attention), measured in a fit."""
    torch.manual_seed(0)
    model = FAMILIES[family]("flex_attention")
    callback = AttentionHeatmap(every_n_steps=2, min_render_interval_seconds=0)
    ref = Reference(2)
    trainer = make_trainer(tmp_path, [ref, callback], max_steps=3)
    trainer.fit(FrozenModel(model), padded_loader(length=20))
    assert sorted(ref.values) == [0, 2]
    check_against_reference(trainer, callback, ref, labels)
    assert model.config._attn_implementation == "flex_attention"


def test_unmeasured_implementation_and_bad_arguments_are_refused(tmp_path):
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register("my_kernel", sdpa_attention_forward)
    AttentionMaskInterface.register("my_kernel", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model = FAMILIES["llama"]("my_kernel")
    trainer = make_trainer(tmp_path, [AttentionHeatmap(every_n_steps=1)], max_steps=1)
    with pytest.raises(ValueError, match="does not measure attn_implementation='my_kernel' of LlamaForCausalLM: its "
                                         "kernel's masking.*Supported: eager, sdpa, flex_attention"):
        trainer.fit(PaddedModel(model), padded_loader())
    with pytest.raises(ValueError, match=r"Invalid value for query_stride=0: must be an integer >= 1"):
        AttentionHeatmap(query_stride=0)
    with pytest.raises(ValueError, match=r"Invalid value for metrics='logit'"):
        AttentionHeatmap(metrics="logit")


def test_tensor_parallel_attention_is_refused_at_fit_start(tmp_path):
    """q/k projections split by parallelize_module (column-parallel: each rank would see its own heads) are
    refused when fit starts; the same model with fully_shard alone (FSDP2) is accepted."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    from lightning_heatmaps.attention_sites import check_attention_sharding, find_attention_sites

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = FAMILIES["llama"]("sdpa")
        mesh = init_device_mesh("cpu", (1,))
        for layer in model.model.layers:
            parallelize_module(layer.self_attn, mesh, {"q_proj": ColwiseParallel(), "k_proj": ColwiseParallel()})
        trainer = make_trainer(tmp_path, [AttentionHeatmap(every_n_steps=1)], max_steps=1)
        with pytest.raises(ValueError, match=r"AttentionHeatmap does not support tensor parallelism: parameter "
                                             r"model.model.layers.0.self_attn.q_proj.weight is a DTensor sharded as "
                                             r"\(Shard\(dim=0\),\) that no `fully_shard` manages.*FSDP2"):
            trainer.fit(PaddedModel(model), padded_loader())
        sharded = FAMILIES["llama"]("sdpa")
        for layer in sharded.model.layers:
            fully_shard(layer, mesh=mesh)
        check_attention_sharding(find_attention_sites(sharded), sharded, "AttentionHeatmap")  # FSDP2: accepted
    finally:
        dist.destroy_process_group()


def test_an_attention_call_with_another_head_count_is_an_error_not_a_shifted_row(tmp_path):
    """As under tensor parallelism, where each rank's call has its own heads only: the module says 8 heads
    (its config, after the model was built with 4), the call has 4."""
    torch.manual_seed(0)
    model = FAMILIES["llama"]("sdpa")
    model.config.num_attention_heads = 8
    trainer = make_trainer(tmp_path, [AttentionHeatmap(every_n_steps=1)], max_steps=1)
    with pytest.raises(RuntimeError, match=r"expected 8 query heads in row 0 \(LlamaAttention\) but its attention "
                                           r"call has 4: tensor parallelism"):
        trainer.fit(PaddedModel(model), padded_loader())


def test_nan_logits_make_the_cell_nan_warn_once_and_training_goes_on(tmp_path):
    torch.manual_seed(0)
    model = FAMILIES["llama"]("sdpa")

    def poison(module, args, output):  # head 1 of layer 1's queries become NaN at the first step
        if poison.armed:
            output = output.clone()
            output[..., 8:16] = math.nan
            poison.armed = False
            return output

    poison.armed = True
    model.model.layers[1].self_attn.q_proj.register_forward_hook(poison)
    callback = AttentionHeatmap(every_n_steps=1, min_render_interval_seconds=0)
    trainer = make_trainer(tmp_path, [callback], max_steps=2)
    with pytest.warns(UserWarning, match="attention_max_logit is NaN or infinite at step 0") as record:
        trainer.fit(PaddedModel(model), padded_loader())
    assert trainer.global_step == 2
    steps, history = callback.sample_history("attention_max_logit")
    assert steps.tolist() == [0, 1]
    first = history[0]
    assert np.isnan(first[1, 1]) and np.isfinite(first[0, :4]).all() and np.isfinite(first[1, [0, 2, 3]]).all()
    assert np.isnan(first[1, -1])  # the layer's max over heads shows it
    _, entropy = callback.sample_history("attention_entropy")
    assert np.isnan(entropy[0, 1, 1]) and np.isfinite(entropy[0, 0, :4]).all()
    assert sum("attention_max_logit is NaN" in str(w.message) for w in record) == 1


def test_attention_sinks_per_head_and_per_row_take_their_share_of_the_entropy_not_of_the_max():
    """The sink is one more entry of each row's softmax (as gpt-oss's eager attention concatenates it): the
    entropy is that of keys and sink together, chunked or not; the max logit stays over q.k."""
    generator = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 4, 7, 8, generator=generator), torch.randn(2, 2, 7, 8, generator=generator)
    allowed = torch.ones(7, 7, dtype=torch.bool).tril()
    logits = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 0.5
    for sink in (torch.randn(4, generator=generator) * 3, torch.randn(2, 4, 7, 1, generator=generator) * 3):
        column = sink.reshape(1, 4, 1, 1).expand(2, 4, 7, 1) if sink.dim() == 1 else sink
        p = torch.cat([logits.masked_fill(~allowed, -math.inf), column], -1).softmax(-1)
        entropy = -(p * torch.where(p > 0, p.log(), 0.0)).sum(-1)
        for chunk_bytes in (1, 10**9):
            top, total, rows = attention_statistics(q, k, 0.5, None, causal=True, sink=sink, chunk_bytes=chunk_bytes)
            np.testing.assert_allclose(total / rows, entropy.mean(dim=(0, 2)), rtol=1e-5)
            np.testing.assert_allclose(top, logits.masked_fill(~allowed, -math.inf).amax(dim=(0, 2, 3)), rtol=1e-6)


def test_attention_statistics_chunks_strides_and_gqa_against_direct_computation():
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 9, 8, generator=generator)
    k = torch.randn(2, 2, 9, 8, generator=generator)
    window = 3
    pos = torch.arange(9)
    allowed = (pos[None] <= pos[:, None]) & (pos[None] > pos[:, None] - window)
    logits = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 0.3
    capped = 2.0 * torch.tanh(logits / 2.0)
    p = capped.masked_fill(~allowed, -math.inf).softmax(-1)
    entropy = -(p * torch.where(p > 0, p.log(), 0.0)).sum(-1)
    for chunk_bytes in (1, 10**9):  # one row per chunk, and all rows at once
        top, total, rows = attention_statistics(q, k, 0.3, None, causal=True, sliding_window=window, softcap=2.0,
                                                chunk_bytes=chunk_bytes)
        np.testing.assert_allclose(top, logits.masked_fill(~allowed, -math.inf).amax(dim=(0, 2, 3)), rtol=1e-6)
        np.testing.assert_allclose(total / rows, entropy.mean(dim=(0, 2)), rtol=1e-5)
    additive = torch.zeros(9, 9).masked_fill(~allowed, torch.finfo(torch.float32).min)
    top, total, rows = attention_statistics(q, k, 0.3, additive, softcap=2.0, query_stride=4)
    strided = logits[:, :, ::4].masked_fill(~allowed[::4], -math.inf)
    np.testing.assert_allclose(top, strided.amax(dim=(0, 2, 3)), rtol=1e-6)  # rows 0, 4, 8 only: a lower bound
    np.testing.assert_allclose(total / rows, entropy[:, :, ::4].mean(dim=(0, 2)), rtol=1e-5)
    assert (top <= logits.masked_fill(~allowed, -math.inf).amax(dim=(0, 2, 3))).all()
    assert allowed_keys(additive).equal(allowed)


def test_block_mask_is_read_element_by_element_with_full_and_partial_blocks():
    """A BlockMask with 4 x 4 blocks (full blocks inside the window, partial ones on its edges) and a per-batch,
    per-head mask_mod, evaluated chunk by chunk, equals the dense mask the mask_mod describes."""
    from torch.nn.attention.flex_attention import create_block_mask

    from lightning_heatmaps.attention import block_mask_allowed

    length, window = 12, 8
    keep = torch.tensor([[True] * 12, [True] * 9 + [False] * 3])  # batch 1: the last 3 keys are padding

    def mask_mod(b, h, q, kv):
        return (kv <= q) & (kv > q - window) & keep[b, kv] & ((h == 0) | (kv != q))  # head 1 never sees itself

    block_mask = create_block_mask(mask_mod, 2, 2, length, length, device="cpu", BLOCK_SIZE=4)
    assert block_mask.full_kv_num_blocks is not None and int(block_mask.full_kv_num_blocks.sum()) > 0
    index = torch.arange(length)
    batch, head, keys = index[:2, None, None, None], index[None, :2, None, None], index[None, None, None, :]
    dense = mask_mod(batch, head, index[None, None, :, None], keys)
    assert block_mask_allowed(block_mask, batch, head, index[None, None, :, None], keys).equal(dense)
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 2, length, 8, generator=generator), torch.randn(2, 2, length, 8, generator=generator)
    by_chunk = lambda rows: block_mask_allowed(block_mask, batch, head, rows[None, None, :, None], keys)
    for chunk_bytes in (1, 10**9):
        np.testing.assert_allclose(attention_statistics(q, k, 0.5, by_chunk, softcap=3.0, chunk_bytes=chunk_bytes),
                                   attention_statistics(q, k, 0.5, dense, softcap=3.0), rtol=1e-6)


# --- DDP and FSDP2: every rank measures its rows, one collective pools them -------------------------------

SCRIPT = Path(__file__).with_name("attention_script.py")


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_distributed_runs_equal_one_process(tmp_path_factory, mode):
    root = tmp_path_factory.getbasetemp() / "attention_distributed"
    results = {}
    for run_mode in ("single", mode):
        log_root = root / run_mode
        if not log_root.exists():
            result = subprocess.run([sys.executable, str(SCRIPT), str(root), run_mode], capture_output=True, text=True,
                                    timeout=240)
            assert result.returncode == 0, result.stderr[-4000:]
        (log_dir,) = {p.parent for p in log_root.rglob("events.out.tfevents.*")}
        assert len(list(log_dir.glob("events.out.tfevents.*"))) == 1  # rank zero writes alone
        events = read_events(str(log_dir))
        results[run_mode] = ({tag: scalar_series(events, tag) for tag in events.Tags()["scalars"]
                              if tag.startswith(("attention_", "output_logits/"))}, log_dir)
    (expected, single_dir), (actual, sharded_dir) = results["single"], results[mode]
    assert len(expected) == 2 * 2 + 2 and sorted(actual) == sorted(expected)
    for tag, series in expected.items():
        assert sorted(actual[tag]) == [0, 1, 2]
        for step, value in series.items():
            assert math.isfinite(value) and actual[tag][step] == pytest.approx(value, rel=1e-5, abs=1e-6), (tag, step)
    for metric in ("max_logit", "entropy"):
        one = np.load(single_dir / f"heatmaps/attention_{metric}/layer_x_head.npz")["values"]
        two = np.load(sharded_dir / f"heatmaps/attention_{metric}/layer_x_head.npz")["values"]
        np.testing.assert_allclose(two, one, rtol=1e-5)


def test_nothing_is_installed_on_unsampled_steps(tmp_path):
    """The model runs its own attention function on unsampled steps and the wrapped one on sampled steps only."""
    torch.manual_seed(0)
    model = FAMILIES["llama"]("sdpa")
    seen: dict[int, set] = {}

    class Step(Callback):
        step = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            Step.step = trainer.global_step

    model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda m, a: seen.setdefault(Step.step, set()).add(model.config._attn_implementation))
    callback = AttentionHeatmap(every_n_steps=3, min_render_interval_seconds=0)
    trainer = make_trainer(tmp_path, [Step(), callback], max_steps=5)
    trainer.fit(PaddedModel(model), padded_loader(batches=5))
    assert {step: sorted(names) for step, names in seen.items()} == {
        0: ["lightning_heatmaps_sdpa"], 1: ["sdpa"], 2: ["sdpa"], 3: ["lightning_heatmaps_sdpa"], 4: ["sdpa"]}
    assert model.config._attn_implementation == "sdpa"


def test_two_instances_on_one_model_both_equal_the_reference(tmp_path):
    torch.manual_seed(0)
    model = FAMILIES["llama"]("eager")
    other = AttentionHeatmap(metrics="entropy", every_n_steps=2, name="second", min_render_interval_seconds=0)
    trainer, callback, ref = run(tmp_path, model, padded_loader(), extra=[other])
    check_against_reference(trainer, callback, ref, ["0", "1"])
    steps, values = other.sample_history("second/attention_entropy")
    assert steps.tolist() == [0, 2]
    np.testing.assert_allclose(values[-1, :, :-1], ref.values[2][1], rtol=1e-5)
    assert model.config._attn_implementation == "eager"  # the second instance did not wrap the first's wrapper


# --- every family the resolver knows: the entropy against the model's own probabilities --------------------------

from families import FAMILIES as ALL_FAMILIES, build as build_family  # noqa: E402

#: Families whose attention does not go through transformers' AttentionInterface (ALiBi built into their own
#: attention): refused at the first sample, never drawn (tested in test_no_attention_is_a_clear_error_at_fit_start).
NOT_SEEN = {"bloom", "mpt"}


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("family", sorted(set(ALL_FAMILIES) - NOT_SEEN))
def test_every_family_entropy_equals_its_own_eager_probabilities(tmp_path, family, implementation):
    """One sampled step through the plain loop (eager or sdpa), padded rows, no dropout: each (layer, head)
    entropy in the npz equals the mean over non-padding query rows of the entropy of the model's own
    ``output_attentions`` rows (plus the sink's share where the returned row sums to less than one). A wrong
    scale, mask, soft-cap, bias or sink in any family shows here; its heads count and row order too."""
    torch.manual_seed(0)
    model = build_family(family)
    try:
        model.set_attn_implementation(implementation)
    except ValueError as error:  # the family has no sdpa attention (gpt-oss)
        pytest.skip(str(error)[:200])
    model.set_attn_implementation("eager")  # the reference: the model's own probabilities
    model.eval()  # no dropout: the reference forward and the monitored one see the same hidden states
    ids = torch.randint(3, 64, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    inputs = dict(input_ids=ids, attention_mask=mask)
    if model.config.is_encoder_decoder:
        inputs.update(decoder_input_ids=ids, decoder_attention_mask=mask)
    with torch.no_grad():
        result = model(**inputs, output_attentions=True)
    probabilities = _row_probabilities(model, result)
    expected = []
    for p in probabilities:
        p = p.double()
        entropy = -(p * torch.where(p > 0, p.log(), 0.0)).sum(-1)
        sink = (1.0 - p.sum(-1)).clamp_min(0.0)  # zero without sinks (up to rounding)
        entropy = entropy - sink * torch.where(sink > 1e-6, sink.log(), 0.0)
        rows = mask.bool()[:, None, :].double()
        expected.append(((entropy * rows).sum(dim=(0, 2)) / rows.sum(dim=(0, 2))).numpy())
    model.set_attn_implementation(implementation)
    _, npz = _monitor_once(model, inputs, tmp_path)
    assert npz["values"].shape == (len(expected), max(len(e) for e in expected)), family
    for row, want in enumerate(expected):
        np.testing.assert_allclose(npz["values"][row, : len(want)], want, rtol=2e-4, atol=2e-5,
                                   err_msg=f"{family} row {npz['layer_labels'][row]}")


# --- FlashAttention: its contract emulated on CPU ------------------------------------------------------------------


def flash_contract(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                   softcap=None, is_causal=None, s_aux=None, position_ids=None, cu_seq_lens_q=None,
                   cu_seq_lens_k=None, max_length_q=None, max_length_k=None, **kwargs):
    """transformers' ``flash_attention_forward`` on CPU, in float32, written out sequence by sequence from
    flash-attn's documented semantics: a padded batch is unpadded (a 2D mask), a packed one cut at ``cu_seq_lens``
    or where ``position_ids`` restart (batch 1); within a sequence of ``nq`` queries and ``nk`` keys, query ``i``
    sees key ``j`` when ``j <= i + nk - nq`` (causal, bottom-right) and ``|j - (i + nk - nq)| < sliding_window``
    (a window, when the padded key length exceeds it); uncomputed (padding) rows are zero."""
    causal = module.is_causal if is_causal is None else is_causal
    batch, heads, q_len, dim = query.shape
    k_len = key.shape[2]
    k = key.repeat_interleave(heads // key.shape[1], 1)
    v = value.repeat_interleave(heads // value.shape[1], 1)
    scale = dim ** -0.5 if scaling is None else scaling
    if attention_mask is not None:
        sequences = []
        for b in range(batch):
            keys = attention_mask[b].nonzero().view(-1)
            queries = keys if q_len == k_len else attention_mask[b, -q_len:].nonzero().view(-1)
            sequences.append(([(b, int(i)) for i in queries], [(b, int(j)) for j in keys]))
    else:
        if cu_seq_lens_q is None and position_ids is not None and batch == 1 and (position_ids.diff(dim=-1) < 0).any():
            starts = (position_ids.view(-1) == position_ids.min()).nonzero().view(-1).tolist()
            cu_seq_lens_q = cu_seq_lens_k = torch.tensor([*starts, q_len])
        if cu_seq_lens_q is not None:
            cq, ck = cu_seq_lens_q.tolist(), cu_seq_lens_k.tolist()
            sequences = [([divmod(t, q_len) for t in range(cq[s], cq[s + 1])], [divmod(t, k_len) for t in range(ck[s], ck[s + 1])])
                         for s in range(len(cq) - 1)]
        else:
            sequences = [([(b, i) for i in range(q_len)], [(b, j) for j in range(k_len)]) for b in range(batch)]
    out = query.new_zeros(batch, q_len, heads, v.shape[-1])
    for queries, keys in sequences:
        qs = torch.stack([query[b, :, i] for b, i in queries], 1)  # [H, nq, D]
        ks = torch.stack([k[b, :, j] for b, j in keys], 1)
        vs = torch.stack([v[b, :, j] for b, j in keys], 1)
        logits = (qs @ ks.transpose(-1, -2)) * scale
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        nq, nk = len(queries), len(keys)
        i = torch.arange(nq)[:, None] + nk - nq
        j = torch.arange(nk)[None, :]
        allowed = torch.ones(nq, nk, dtype=torch.bool)
        if causal:
            allowed &= j <= i
        if sliding_window is not None and k_len > sliding_window:
            allowed &= (j - i).abs() <= sliding_window - 1
        logits = logits.masked_fill(~allowed, -math.inf)
        if s_aux is not None:
            logits = torch.cat([logits, s_aux.view(-1, 1, 1).expand(heads, nq, 1)], -1)
        p = logits.softmax(-1)[..., :nk]
        result = p @ vs  # [H, nq, Dv]
        for row, (b, index) in enumerate(queries):
            out[b, index] = result[:, row]
    return out, None


class EmulatedFlash:
    """Runs ``model`` with ``attn_implementation="flash_attention_2"`` on CPU: ``flash_contract`` registered under that
    name in transformers' public AttentionInterface (restored on exit), and the model's config set to it. The config
    is set directly: ``set_attn_implementation`` refuses flash_attention_2 without the flash-attn package (CUDA)."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        from transformers import AttentionInterface
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        self.original = ALL_ATTENTION_FUNCTIONS["flash_attention_2"]
        self.implementation = self.model.config._attn_implementation
        AttentionInterface.register("flash_attention_2", flash_contract)
        self.model.config._attn_implementation = "flash_attention_2"
        return self.model

    def __exit__(self, *exc):
        from transformers import AttentionInterface

        self.model.config._attn_implementation = self.implementation
        AttentionInterface.register("flash_attention_2", self.original)


def _monitor_once(model, inputs, log_dir):
    """One sampled training step of ``model`` on ``inputs`` through the plain loop; the two layer x head arrays."""
    from lightning_heatmaps.core import AttentionMonitor
    from lightning_heatmaps.loop import Monitor

    monitor = Monitor(model, [AttentionMonitor(every_n_steps=1, min_render_interval_seconds=0)], log_dir=str(log_dir))
    with monitor.step():
        loss = model(**inputs).logits.float().square().mean()
        monitor.backward(loss)
        monitor.before_optimizer_step()
    monitor.close()
    return [np.load(log_dir / "heatmaps" / metric / "layer_x_head.npz")
            for metric in ("attention_max_logit", "attention_entropy")]


@pytest.mark.parametrize("family", ["llama", "gemma2", "bart"])
def test_flash_attention_padded_equals_eager(tmp_path, family):
    """flash_attention_2 (its contract emulated on CPU): the model computes what it computes with eager attention at
    every real position (which checks the emulation), and AttentionHeatmap's layer x head arrays equal the eager
    ones (tested against the model's pieces above): padding unpadded, GQA, Gemma 2's window and soft-cap, BART's
    bidirectional encoder, causal decoder and cross attention."""
    torch.manual_seed(0)
    model = FAMILIES[family]("eager").eval()
    ids, mask = next(iter(padded_loader(batches=1, batch_size=4)))
    inputs = PaddedModel(model).inputs((ids, mask))
    with torch.no_grad():
        eager_logits = model(**inputs).logits
    eager = _monitor_once(model, inputs, tmp_path / "eager")
    with EmulatedFlash(model):
        with torch.no_grad():
            flash_logits = model(**inputs).logits
        flash = _monitor_once(model, inputs, tmp_path / "flash")
        assert model.config._attn_implementation == "flash_attention_2"  # unchanged while sampled: the kernel's name
    real = mask.bool()
    torch.testing.assert_close(flash_logits[real], eager_logits[real], rtol=1e-4, atol=1e-5)
    for got, want in zip(flash, eager):
        assert got["layer_labels"].tolist() == want["layer_labels"].tolist()
        np.testing.assert_allclose(got["values"], want["values"], rtol=1e-5, atol=1e-6, err_msg=str(want["metric"]))


@pytest.mark.parametrize("packing", ["position_ids", "cu_seq_lens"])
def test_flash_attention_packed_sequences_equal_the_same_documents_padded(tmp_path, packing):
    """Padding-free packing (batch 1; sequences cut where ``position_ids`` restart, or at ``cu_seq_lens`` as
    transformers' DataCollatorWithFlattening passes them): each document attends within itself only, so the arrays
    equal eager attention's on the same documents as a padded batch (the same query rows and keys)."""
    torch.manual_seed(0)
    model = FAMILIES["llama"]("eager").eval()
    lengths = [5, 9, 3]
    generator = torch.Generator().manual_seed(2)
    documents = [torch.randint(3, VOCAB, (n,), generator=generator) for n in lengths]
    padded = torch.zeros(len(documents), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(padded)
    for row, document in enumerate(documents):
        padded[row, : len(document)], mask[row, : len(document)] = document, 1
    with torch.no_grad():
        eager_logits = model(input_ids=padded, attention_mask=mask).logits
    eager = _monitor_once(model, dict(input_ids=padded, attention_mask=mask), tmp_path / "eager")
    packed = dict(input_ids=torch.cat(documents)[None], position_ids=torch.cat([torch.arange(n) for n in lengths])[None])
    if packing == "cu_seq_lens":
        cu = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32)
        packed.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths), max_length_k=max(lengths))
    with EmulatedFlash(model):
        with torch.no_grad():
            flash_logits = model(**packed).logits
        flash = _monitor_once(model, packed, tmp_path / "flash")
    torch.testing.assert_close(flash_logits[0], eager_logits[mask.bool()], rtol=1e-4, atol=1e-5)
    for got, want in zip(flash, eager):
        np.testing.assert_allclose(got["values"], want["values"], rtol=1e-5, atol=1e-6, err_msg=str(want["metric"]))


@pytest.mark.skipif(not torch.cuda.is_available() or __import__("importlib").util.find_spec("flash_attn") is None,
                    reason="the real flash_attention_2 needs a CUDA GPU with the flash-attn package")
@pytest.mark.parametrize("family", ["llama", "gemma2", "bart"])
def test_real_flash_attention_2_equals_eager_on_a_gpu(tmp_path, family):
    """The kernel itself (bfloat16, so to bfloat16 precision) against eager attention on the same padded batch."""
    torch.manual_seed(0)
    model = FAMILIES[family]("eager").eval().to("cuda", torch.bfloat16)
    ids, mask = next(iter(padded_loader(batches=1, batch_size=4)))
    inputs = {name: value.cuda() for name, value in PaddedModel(model).inputs((ids, mask)).items()}
    eager = _monitor_once(model, inputs, tmp_path / "eager")
    model.set_attn_implementation("flash_attention_2")
    flash = _monitor_once(model, inputs, tmp_path / "flash")
    for got, want in zip(flash, eager):
        np.testing.assert_allclose(got["values"], want["values"], rtol=2e-2, atol=2e-2, err_msg=str(want["metric"]))
