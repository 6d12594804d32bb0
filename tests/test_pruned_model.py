"""Real pruned HF models: kept weights, KV-cache generation, save/load round trip, pruning.json, scored strategies."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_llama, build_tiny_tokenizer, save_tiny_model

from edge_client.core.pruning import make_plan
from edge_client.layer_scores import compute_layer_scores, plan_for_model
from edge_client.model import (
    PRUNING_FILE,
    load_base_model,
    materialize_pruned,
    prune_model,
    read_plan,
    save_pruned,
)
from prufed.common.errors import ConfigError

KEPT = (0, 2, 3, 6, 7)
PROMPT = torch.tensor([[5, 17, 42, 99, 7, 64]])


def layer_state(layer) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in layer.state_dict().items()}


def test_kept_layers_keep_their_exact_weights_and_indices():
    model = build_tiny_llama(8, seed=1)
    originals = [layer_state(layer) for layer in model.model.layers]
    prune_model(model, KEPT)
    assert model.config.num_hidden_layers == len(KEPT) == len(model.model.layers)
    for new_index, layer in enumerate(model.model.layers):
        assert layer.self_attn.layer_idx == new_index
        state = layer_state(layer)
        original = originals[KEPT[new_index]]
        assert state.keys() == original.keys()
        assert all(torch.equal(state[name], original[name]) for name in state)


def test_pruned_model_equals_running_the_kept_layers_by_hand():
    model = build_tiny_llama(8, seed=2)
    full = build_tiny_llama(8, seed=2)
    prune_model(model, KEPT)
    with torch.no_grad():
        logits = model(PROMPT).logits
        # Reference: the unpruned model's own modules, skipping the dropped layers.
        hidden = full.model.embed_tokens(PROMPT)
        positions = torch.arange(PROMPT.shape[1])[None]
        rope = full.model.rotary_emb(hidden, positions)
        causal = torch.full((PROMPT.shape[1],) * 2, float("-inf")).triu(1)[None, None]
        for index in KEPT:
            hidden = full.model.layers[index](hidden, attention_mask=causal, position_embeddings=rope,
                                              position_ids=positions)
        expected = full.lm_head(full.model.norm(hidden))
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_generation_with_and_without_kv_cache_match():
    model = build_tiny_llama(8, seed=3)
    prune_model(model, KEPT)
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    cached = model.generate(PROMPT, use_cache=True, **kwargs)
    uncached = model.generate(PROMPT, use_cache=False, **kwargs)
    assert cached.shape == (1, PROMPT.shape[1] + 12)
    assert torch.equal(cached, uncached)


def test_save_load_round_trip_is_exact(tmp_path):
    model = build_tiny_llama(8, seed=4)
    prune_model(model, KEPT)
    plan = make_plan("top", 8, 5)  # the plan's content is irrelevant here beyond pruning.json
    save_pruned(model, build_tiny_tokenizer(), plan, tmp_path / "pruned")
    from transformers import AutoModelForCausalLM

    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert loaded.config.num_hidden_layers == 5
    assert [layer.self_attn.layer_idx for layer in loaded.model.layers] == list(range(5))
    with torch.no_grad():
        assert torch.equal(model(PROMPT).logits, loaded.eval()(PROMPT).logits)
    reference = model.state_dict()
    assert all(torch.equal(tensor, reference[name]) for name, tensor in loaded.state_dict().items())


def test_pruning_json_maps_pruned_layers_to_original_ones(tmp_path):
    source = save_tiny_model(tmp_path / "base", seed=5)
    base, _ = load_base_model(source)
    originals = [layer_state(layer) for layer in base.model.layers]
    plan = make_plan("odd-alternate", 8, 5, source_model=str(source))
    pruned_dir = materialize_pruned(str(source), plan)
    assert materialize_pruned(str(source), plan) == pruned_dir  # cached on disk
    assert (pruned_dir / PRUNING_FILE).is_file()
    stored = read_plan(pruned_dir)
    assert stored == plan and stored.kept_layers == (0, 1, 3, 5, 7)
    pruned, _ = load_base_model(pruned_dir)
    for j, layer in enumerate(pruned.model.layers):
        original = originals[stored.original_index(j)]
        assert all(torch.equal(tensor, original[name]) for name, tensor in layer_state(layer).items())
    assert read_plan(source) is None


def test_bad_kept_layers_are_refused():
    model = build_tiny_llama(4)
    for bad in ((), (0, 4), (-1,), (2, 1), (1, 1)):
        with pytest.raises(ConfigError, match="kept_layers"):
            prune_model(model, bad)
    assert len(model.model.layers) == 4


def test_qwen2_layer_types_are_sliced(tmp_path):
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    types = ["full_attention", "sliding_attention"] * 3
    config = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
                         layer_types=types)
    torch.manual_seed(6)
    model = Qwen2ForCausalLM(config).eval()
    kept = (1, 2, 5)
    prune_model(model, kept)
    assert model.config.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    long_prompt = torch.randint(3, 250, (1, 10))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(model.generate(long_prompt, use_cache=True, **kwargs),
                       model.generate(long_prompt, use_cache=False, **kwargs))
    model.save_pretrained(tmp_path / "qwen")
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "qwen", output_loading_info=True)
    assert not info["missing_keys"] and loaded.config.layer_types == model.config.layer_types
    with torch.no_grad():
        assert torch.equal(model(long_prompt).logits, loaded.eval()(long_prompt).logits)


def weaken_layer(model, index: int, factor: float) -> None:
    with torch.no_grad():
        for module in model.model.layers[index].modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(factor)


def make_identity_like(model, indices) -> None:
    """Zero the residual writers (o_proj, down_proj): the layer then passes its input through unchanged."""
    with torch.no_grad():
        for index in indices:
            model.model.layers[index].self_attn.o_proj.weight.zero_()
            model.model.layers[index].mlp.down_proj.weight.zero_()


def test_magnitude_drops_the_scaled_down_layer(tmp_path):
    model = build_tiny_llama(8, seed=7)
    weaken_layer(model, 5, 0.2)
    model.save_pretrained(tmp_path / "m")
    build_tiny_tokenizer().save_pretrained(tmp_path / "m")
    plan = plan_for_model(tmp_path / "m", "magnitude", 7)
    assert plan.dropped_layers == (5,)
    protected = plan_for_model(tmp_path / "m", "magnitude", 7, protect=[5])
    assert 5 in protected.kept_layers and len(protected.dropped_layers) == 1


def test_angular_block_and_contribution_find_identity_like_layers(tmp_path):
    model = build_tiny_llama(8, seed=8)
    make_identity_like(model, (3, 4))
    model.save_pretrained(tmp_path / "m")
    build_tiny_tokenizer().save_pretrained(tmp_path / "m")
    calib = tmp_path / "calib.txt"
    calib.write_text("In the beginning was the Word.\n\nAnd the Word was with God, and the Word was God.\n")
    assert plan_for_model(tmp_path / "m", "angular-block", 6, calib_file=calib).dropped_layers == (3, 4)
    assert plan_for_model(tmp_path / "m", "contribution", 6, calib_file=calib).dropped_layers == (3, 4)


def test_plan_for_model_loads_nothing_for_positional(tmp_path, monkeypatch):
    source = save_tiny_model(tmp_path / "m")
    import edge_client.model as model_module

    monkeypatch.setattr(model_module, "load_base_model", lambda *a, **k: pytest.fail("model was loaded"))
    assert plan_for_model(source, "top-alternate", 5).kept_layers == (0, 1, 2, 4, 7)  # drops 6, 5, then 3
    with pytest.raises(ConfigError, match="^--keep"):
        plan_for_model(source, "contribution", 0)
    with pytest.raises(ConfigError, match="^--protect"):
        plan_for_model(source, "top", 5, protect=[6])


def hidden_states_by_hand(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """h_0..h_L for one unpadded sequence, from decoder-layer hooks (independent of output_hidden_states)."""
    states: list[torch.Tensor] = []
    hooks = [layer.register_forward_pre_hook(lambda _m, args, kwargs: states.append(
        args[0] if args else kwargs["hidden_states"]), with_kwargs=True) for layer in model.model.layers]
    hooks.append(model.model.layers[-1].register_forward_hook(
        lambda _m, _a, output: states.append(output[0] if isinstance(output, tuple) else output)))
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    return [s[0].double() for s in states]


def test_layer_scores_match_an_independent_computation():
    model = build_tiny_llama(6, seed=9)
    tokenizer = build_tiny_tokenizer()
    text = "For God so loved the world, that he gave his only begotten Son."
    scores = compute_layer_scores(model, tokenizer, [text], block_sizes=(2,))
    states = hidden_states_by_hand(model, torch.tensor([tokenizer(text)["input_ids"]]))
    assert len(states) == 7

    def cos(a, b):
        return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))

    for i in range(6):
        assert scores.contribution[i] == pytest.approx(1 - cos(states[i], states[i + 1]).mean().item(), abs=1e-6)
    for s in range(5):
        expected = (torch.arccos(cos(states[s], states[s + 2]).clamp(-1, 1)) / torch.pi).mean().item()
        assert scores.angular[2][s] == pytest.approx(expected, abs=1e-6)
    layer0 = [m.weight for m in model.model.layers[0].modules() if isinstance(m, torch.nn.Linear)]
    expected_magnitude = sum(w.abs().sum().item() for w in layer0) / sum(w.numel() for w in layer0)
    assert scores.magnitude[0] == pytest.approx(expected_magnitude, rel=1e-6)


def test_layer_scores_ignore_padding():
    model = build_tiny_llama(6, seed=10)
    tokenizer = build_tiny_tokenizer()
    texts = ["Jesus wept.", "Rejoice in the Lord alway: and again I say, Rejoice.", "Pray without ceasing."]
    batched = compute_layer_scores(model, tokenizer, texts, block_sizes=(1, 3), batch_size=3)
    single = compute_layer_scores(model, tokenizer, texts, block_sizes=(1, 3), batch_size=1)
    assert batched.contribution == pytest.approx(single.contribution, abs=1e-6)
    for k in (1, 3):
        assert batched.angular[k] == pytest.approx(single.angular[k], abs=1e-6)
    assert batched.angular[1] != pytest.approx(batched.angular[3])
