"""Logit lens: divergences against SciPy, the lens against a hand-written loop, the callback in a real run."""

import os

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy

from lightning_heatmaps import LogitLensHeatmap
from lightning_heatmaps.lens import deep_thinking_share, jensen_shannon_bits, kl_bits, logit_lens, settling_depth

from conftest import VOCAB, TokenModel, decode_png, make_trainer, read_events, scalar_series, tiny_gpt2, tiny_llama, token_loader


def test_jsd_and_kl_in_bits_match_scipy():
    generator = torch.Generator().manual_seed(0)
    p = torch.softmax(3 * torch.randn(5, 40, generator=generator), -1)
    q = torch.softmax(3 * torch.randn(5, 40, generator=generator), -1)
    p[0, :10] = 0  # zero-probability entries must be handled in log space
    p[0] /= p[0].sum()
    ours = jensen_shannon_bits(p.log(), q.log())
    for row in range(5):
        assert float(ours[row]) == pytest.approx(jensenshannon(p[row].double(), q[row].double(), base=2) ** 2, abs=1e-6)
        assert float(kl_bits(p.log(), q.log())[row]) == pytest.approx(entropy(p[row].double(), q[row].double(), base=2), rel=1e-5)
    assert float(jensen_shannon_bits(p.log(), p.log()).abs().max()) < 1e-6


def test_logit_lens_matches_a_hand_written_loop():
    model = tiny_llama(3).eval()
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        values = logit_lens([h[0] for h in out.hidden_states[1:]], lambda h: model.lm_head(model.model.norm(h)),
                            out.logits[0], chunk_tokens=4)
        final = torch.softmax(out.logits[0].double(), -1)
        for layer in range(3):
            if layer < 2:
                decoded = torch.softmax(model.lm_head(model.model.norm(out.hidden_states[layer + 1][0])).double(), -1)
            else:
                decoded = final  # the last hidden state is already normed: it *is* the output
            for token in range(9):
                expected = jensenshannon(final[token], decoded[token], base=2) ** 2
                assert float(values[token, layer]) == pytest.approx(expected, abs=1e-5)
    assert torch.all(values[:, -1] == 0)


def test_settling_depth_and_deep_thinking_share():
    divergences = torch.tensor([[0.9, 0.2, 0.1, 0.0], [0.9, 0.9, 0.8, 0.0], [0.1, 0.1, 0.1, 0.0]])
    depths = settling_depth(divergences, 0.5)
    assert depths.tolist() == [1, 3, 0]
    assert deep_thinking_share(depths, layers=4, last_fraction=0.25) == pytest.approx(1 / 3)


class TrainModeRecorder(Callback):
    def __init__(self):
        self.modes = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.modes.append(pl_module.training)


def test_callback_in_a_real_run(tmp_path):
    prompts = [[5, 6, 7, 8, 9, 10], [11, 3, 4]]
    labels = [list("abcdef"), ["x", "y", "z"]]
    callback = LogitLensHeatmap(prompts, token_labels=labels, every_n_steps=2)
    recorder = TrainModeRecorder()
    model = TokenModel(tiny_gpt2(2))
    trainer = make_trainer(tmp_path, [callback, recorder], max_steps=4)
    trainer.fit(model, token_loader())
    assert all(recorder.modes)  # train mode restored after every evaluation
    events = read_events(trainer.logger.log_dir)
    assert {"heatmaps/logit_lens/prompt_0", "heatmaps/logit_lens/prompt_1", "heatmaps/logit_lens/layer_x_step"} <= set(events.Tags()["images"])
    assert sorted(scalar_series(events, "logit_lens/layer_0/mean_divergence")) == [0, 2, 4]
    image = decode_png(events.Images("heatmaps/logit_lens/prompt_0")[-1].encoded_image_string)
    assert image.shape[0] > 200

    # The last evaluation (step 4) equals a hand-written loop on the final weights.
    saved = np.load(os.path.join(trainer.logger.log_dir, "heatmaps", "logit_lens", "prompt_0.npz"))
    assert int(saved["step"]) == 4 and saved["column_labels"].tolist() == list("abcdef")
    gpt2 = model.model.eval()
    with torch.no_grad():
        out = gpt2(input_ids=torch.tensor([prompts[0]]), output_hidden_states=True)
        final = torch.softmax(out.logits[0].double(), -1)
        decoded = torch.softmax(gpt2.lm_head(gpt2.transformer.ln_f(out.hidden_states[1][0])).double(), -1)
    expected = [jensenshannon(final[t], decoded[t], base=2) ** 2 for t in range(6)]
    np.testing.assert_allclose(saved["values"][0], expected, atol=1e-5)
    assert saved["values"][1].tolist() == [0.0] * 6
    mean_layer_0 = np.mean([saved["values"][0].mean(), np.load(os.path.join(trainer.logger.log_dir, "heatmaps", "logit_lens", "prompt_1.npz"))["values"][0].mean()])
    assert scalar_series(events, "logit_lens/layer_0/mean_divergence")[4] == pytest.approx(mean_layer_0, rel=1e-5)
    history = np.load(os.path.join(trainer.logger.log_dir, "heatmaps", "logit_lens", "layer_x_step.npz"))
    assert history["steps"].tolist() == [0, 2, 4]


def test_custom_model_with_user_hidden_states_and_decoder(tmp_path):
    from test_outputs import DeepMLP

    model = DeepMLP(depth=3)
    unembed = torch.nn.Linear(8, 20)

    def hidden_states(module, ids):
        x = torch.nn.functional.one_hot(ids, 8).float()
        states = []
        for block in module.blocks:
            x = x + block(x)
            states.append(x)
        return states

    callback = LogitLensHeatmap([[1, 2, 3]], hidden_states=hidden_states, decoder=unembed, every_n_steps=2)
    trainer = make_trainer(tmp_path, [callback], max_steps=2)
    trainer.fit(model, torch.utils.data.DataLoader(torch.randn(16, 8), batch_size=4))
    saved = np.load(os.path.join(trainer.logger.log_dir, "heatmaps", "logit_lens", "prompt_0.npz"))
    assert saved["values"].shape == (3, 3) and np.all(saved["values"][-1] == 0) and np.all(saved["values"] >= 0)


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="text prompts need a `tokenizer`"):
        LogitLensHeatmap("hello")
    with pytest.raises(ValueError, match=r"divergence='js': must be one of \('jsd', 'kl', 'top1'\)"):
        LogitLensHeatmap([[1, 2]], divergence="js")
    with pytest.raises(ValueError, match="`hidden_states` needs a `decoder`"):
        LogitLensHeatmap([[1, 2]], hidden_states=lambda m, i: [])
    with pytest.raises(ValueError, match="would never evaluate"):
        LogitLensHeatmap([[1, 2]], every_n_steps=None)
    trainer = make_trainer(tmp_path, [LogitLensHeatmap([[1, VOCAB + 5]])], max_steps=1)
    with pytest.raises(ValueError, match=r"token ids \[53\] are outside the vocabulary \(size 48\)"):
        trainer.fit(TokenModel(tiny_llama(2)), token_loader())
    trainer = make_trainer(tmp_path, [LogitLensHeatmap([list(range(40))], max_memory_mb=0.01)], max_steps=1)
    with pytest.raises(ValueError, match=r"needs about .* MB per evaluation, more than max_memory_mb=0.01"):
        trainer.fit(TokenModel(tiny_llama(2)), token_loader())
    from test_outputs import DeepMLP

    trainer = make_trainer(tmp_path, [LogitLensHeatmap([[1, 2]])], max_steps=1)
    with pytest.raises(ValueError, match="Found no Hugging Face language model"):
        trainer.fit(DeepMLP(), torch.utils.data.DataLoader(torch.randn(16, 8), batch_size=4))


def test_a_failing_evaluation_is_skipped_and_training_goes_on(tmp_path):
    import warnings

    from test_outputs import DeepMLP

    calls = []

    def broken(module, ids):
        calls.append(1)
        if len(calls) > 1:  # the first call (at setup) works; evaluations fail
            raise TypeError("hidden states went missing")
        return [torch.zeros(1, ids.shape[1], 8)] * 3

    callback = LogitLensHeatmap([[1, 2]], hidden_states=broken, decoder=torch.nn.Linear(8, 5), every_n_steps=1)
    trainer = make_trainer(tmp_path, [callback], max_steps=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(DeepMLP(3), torch.utils.data.DataLoader(torch.randn(16, 8), batch_size=4))
    assert trainer.global_step == 4 and callback.evaluations == 0 and len(calls) == 6
    skipped = [w for w in caught if "evaluation skipped" in str(w.message)]
    assert len(skipped) == 1 and "TypeError: hidden states went missing" in str(skipped[0].message)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "opt", "phi"])
def test_decoder_is_found_for_each_family(family):
    import transformers

    from lightning_heatmaps.layers import find_decoder, find_language_model, find_layer_stack

    common = dict(vocab_size=40, num_attention_heads=4)
    configs = {
        "llama": lambda: transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, **common),
        "gpt2": lambda: transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=40),
        "gpt_neox": lambda: transformers.GPTNeoXConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, **common),
        "opt": lambda: transformers.OPTConfig(hidden_size=32, ffn_dim=48, num_hidden_layers=2, word_embed_proj_dim=32, **common),
        "phi": lambda: transformers.PhiConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, **common),
    }
    model = transformers.AutoModelForCausalLM.from_config(configs[family]()).eval()
    lm = find_language_model(TokenModel(model))
    final_norm, unembed = find_decoder(lm)
    expected = {"llama": "model.norm", "gpt2": "transformer.ln_f", "gpt_neox": "gpt_neox.final_layer_norm",
                "opt": "model.decoder.final_layer_norm", "phi": "model.final_layernorm"}[family]
    assert final_norm is dict(model.named_modules())[expected] and unembed is model.get_output_embeddings()
    assert len(find_layer_stack(lm)[1]) == 2
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        values = logit_lens([h[0] for h in out.hidden_states[1:]], lambda h: unembed(final_norm(h)), out.logits[0])
    assert values.shape == (4, 2) and torch.all(values[:, -1] == 0) and torch.all((values >= 0) & (values <= 1))


def test_top1_agreement_and_validation_end_schedule(tmp_path):
    callback = LogitLensHeatmap([[5, 6, 7, 8]], divergence="top1", every_n_steps=None, on_validation_end=True)
    trainer = make_trainer(tmp_path, [callback], max_steps=4, val_check_interval=2, limit_val_batches=1, num_sanity_val_steps=1)
    model = TokenModel(tiny_llama(2))
    trainer.fit(model, token_loader(), token_loader(batches=1))
    events = read_events(trainer.logger.log_dir)
    assert sorted(scalar_series(events, "logit_lens/layer_0/mean_divergence")) == [2, 4]  # not at the sanity check
    saved = np.load(os.path.join(trainer.logger.log_dir, "heatmaps", "logit_lens", "prompt_0.npz"))
    lm = model.model.eval()
    with torch.no_grad():
        out = lm(input_ids=torch.tensor([[5, 6, 7, 8]]), output_hidden_states=True)
        layer_0 = lm.lm_head(lm.model.norm(out.hidden_states[1][0])).argmax(-1)
    expected = (layer_0 == out.logits[0].argmax(-1)).double().numpy()
    np.testing.assert_array_equal(saved["values"][0], expected)
    assert saved["values"][1].tolist() == [1.0] * 4
