"""ONNX export of tiny pruned LLaMA models: parity with PyTorch (padding, cache, adapter merge), files, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_client.core.pruning import make_plan
from edge_client.global_adapter import read_global_adapter, resolve_source
from edge_client.model import attach_lora, load_base_model, load_model_dir, prune_model, read_plan, save_pruned
from edge_client.onnx_export import FP32_TOLERANCE, INT4_ALGORITHM, INT4_BLOCK_SIZE, ExportError, export_onnx
from edge_client.onnx_generate import OnnxDecoder, OnnxGenerator, SamplingConfig, left_pad, position_ids_for
from prufed.common.adapter_format import DELTA_FORMAT, GLOBAL_FORMAT, AdapterMeta, save_adapter
from prufed.common.errors import ConfigError
from prufed.common.models import fingerprint_model_dir
from prufed.common.peft_bridge import adapter_state, load_adapter_state

KEEP = 5
#: Max |logit diff| of the int4 graph vs torch, as a fraction of max |logit| (tiny random model).
INT4_PARITY = 0.25
PROMPTS = ["Let there be light", "In the beginning God created the heaven and the earth, and", "Amen"]


def _adapter(model_dir: Path, path: Path, layers=None, fmt: str = GLOBAL_FORMAT, seed: int = 1) -> Path:
    """A full-depth (or `layers`-only) adapter with random non-zero B, so merging it changes the logits."""
    model, _ = load_base_model(model_dir)
    peft_model = attach_lora(model, r=4, alpha=8, targets=("q_proj", "v_proj"), dropout=0.0)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    layers = tuple(range(len(model.model.layers))) if layers is None else tuple(layers)
    state = {k: v for k, v in adapter_state(peft_model, range(len(model.model.layers))).items()
             if int(k.split(".layers.")[1].split(".")[0]) in layers}
    meta = AdapterMeta(format=fmt, kept_layers=layers, base_model=fingerprint_model_dir(model_dir), round=3,
                       num_examples=10 if fmt == DELTA_FORMAT else None,
                       lora={"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]})
    return save_adapter(path, state, meta)


def _ort_logits(onnx_path: Path, rows, model_config) -> tuple[np.ndarray, np.ndarray]:
    ids, mask = left_pad(rows, 0)
    decoder = OnnxDecoder(onnx_path, model_config.num_hidden_layers,
                          (model_config.num_key_value_heads, model_config.hidden_size // model_config.num_attention_heads))
    return decoder(ids, mask)[0], mask


def _torch_logits(model, rows) -> np.ndarray:
    ids, mask = left_pad(rows, 0)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(position_ids_for(mask, ids.shape[1])))
    return out.logits.numpy()


@pytest.fixture(scope="module")
def plain_export(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "plain"
    info = export_onnx(resolve_source(str(tiny_model_dir), keep=KEEP, strategy="top"), out, int8=True, int4=True)
    return out, info


@pytest.fixture(scope="module")
def pruned_dir(tiny_model_dir, tmp_path_factory):
    """`prufed prune`-style output: the pruned model with pruning.json (symmetric keeps layers on both ends)."""
    plan = make_plan("symmetric", 8, KEEP, source_model=str(tiny_model_dir))
    model, tokenizer = load_base_model(tiny_model_dir)
    prune_model(model, plan.kept_layers)
    return save_pruned(model, tokenizer, plan, tmp_path_factory.mktemp("pruned") / "p5")


@pytest.fixture(scope="module")
def adapter_export(tiny_model_dir, pruned_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx-adapter")
    adapter = _adapter(tiny_model_dir, root / "global.safetensors")
    info = export_onnx(resolve_source(str(tiny_model_dir), pruning=pruned_dir), root / "out", adapter=adapter)
    return root / "out", info, adapter


def test_export_writes_files_and_export_json(plain_export, tiny_model_dir):
    out, info = plain_export
    for name in ("model.onnx", "model.int8.onnx", "model.int4.onnx", "tokenizer.json", "pruning.json", "export.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "export.json").read_text()) == info
    plan = make_plan("top", 8, KEEP)
    assert info["kept_layers"] == list(plan.kept_layers) == list(read_plan(out).kept_layers)
    assert info["base_fingerprint"] == fingerprint_model_dir(tiny_model_dir)
    assert info["source_fingerprint"] == fingerprint_model_dir(Path(info["source_model"]))
    assert info["source_fingerprint"] != info["base_fingerprint"]
    assert (info["num_layers"], info["opset"], info["adapter"]) == (KEEP, 17, None)
    assert info["files"] == {"fp32": "model.onnx", "int8": "model.int8.onnx", "int4": "model.int4.onnx"}
    fp32 = info["parity"]["fp32"]
    assert max(fp32["prefill_max_abs_diff"], fp32["decode_max_abs_diff"]) <= FP32_TOLERANCE
    assert info["parity"]["int8"]["prefill_max_abs_diff"] > 0  # int8 really quantized something
    assert (out / "model.int8.onnx").stat().st_size < (out / "model.onnx").stat().st_size


def test_int8_copy_keeps_only_the_down_projections_fp32(plain_export):
    import onnx

    out, _ = plain_export
    nodes = onnx.load(str(out / "model.int8.onnx")).graph.node
    float_matmuls = {n.name for n in nodes if n.op_type == "MatMul" and "_proj/" in n.name}
    quantized = {n.name for n in nodes if n.op_type == "MatMulInteger"}
    assert len(float_matmuls) == KEEP and all("/mlp/down_proj/" in name for name in float_matmuls)
    # q, k, v, o, gate and up of every kept layer, plus the LM head, run on int8 weights
    assert len(quantized) == 6 * KEEP + 1 and not any("down_proj" in name for name in quantized)


def test_parity_dynamic_batch_with_left_padding(plain_export):
    """A batch of 3 (the export traced batch 2) with different padding; only real positions are compared."""
    out, info = plain_export
    model, tokenizer = load_model_dir(Path(info["source_model"]), "fp32")
    rows = [tokenizer(p)["input_ids"] for p in PROMPTS]
    ort_logits, mask = _ort_logits(out / "model.onnx", rows, model.config)
    torch_logits = _torch_logits(model, rows)
    real = mask.astype(bool)
    assert (~real).any()
    assert np.abs(ort_logits[real] - torch_logits[real]).max() <= FP32_TOLERANCE
    # A row's logits do not depend on its padding: the longest prompt alone gives the same last logits.
    alone, _ = _ort_logits(out / "model.onnx", [rows[1]], model.config)
    assert np.abs(alone[0, -1] - ort_logits[1, -1]).max() <= FP32_TOLERANCE


def test_adapter_merge_parity(adapter_export, plain_export, pruned_dir):
    out, info, adapter = adapter_export
    assert info["kept_layers"] == list(read_plan(pruned_dir).kept_layers) == list(make_plan("symmetric", 8, KEEP).kept_layers)
    assert info["kept_layers"] != list(range(KEEP))  # not a prefix: the adapter's keys really get remapped
    assert info["adapter"]["round"] == 3 and info["adapter"]["sha256"].startswith("sha256:")
    assert max(info["parity"]["fp32"]["prefill_max_abs_diff"], info["parity"]["fp32"]["decode_max_abs_diff"]) <= FP32_TOLERANCE
    # Independent reference: the UNMERGED PEFT model on the pruned weights with the adapter slice loaded.
    model, tokenizer = load_model_dir(pruned_dir, "fp32")
    peft_model = attach_lora(model, r=4, alpha=8, targets=("q_proj", "v_proj"), dropout=0.0).eval()
    tensors, _ = read_global_adapter(adapter, read_plan(pruned_dir), info["base_fingerprint"])
    load_adapter_state(peft_model, tensors, info["kept_layers"])
    rows = [tokenizer(p)["input_ids"] for p in PROMPTS]
    ort_logits, mask = _ort_logits(out / "model.onnx", rows, model.config)
    real = mask.astype(bool)
    assert np.abs(ort_logits[real] - _torch_logits(peft_model, rows)[real]).max() <= FP32_TOLERANCE
    with peft_model.disable_adapter():
        plain = _torch_logits(peft_model, rows)
    assert np.abs(ort_logits[real] - plain[real]).max() > 1e-2  # the merge changed the model


def test_greedy_matches_torch_generate(adapter_export, pruned_dir):
    out, info, _ = adapter_export
    generator = OnnxGenerator(out)
    model, tokenizer = load_model_dir(pruned_dir, "fp32")
    attach = attach_lora(model, r=4, alpha=8, targets=("q_proj", "v_proj"), dropout=0.0)
    tensors, _ = read_global_adapter(out.parent / "global.safetensors", read_plan(pruned_dir), info["base_fingerprint"])
    load_adapter_state(attach, tensors, info["kept_layers"])
    merged = attach.merge_and_unload().eval()
    config = SamplingConfig(max_new_tokens=16)
    prompts = [generator.encode(p) for p in PROMPTS]
    batched = generator.generate_ids(prompts, config)
    for ids, got in zip(prompts, batched):
        with torch.no_grad():
            ref = merged.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                  max_new_tokens=16, do_sample=False, pad_token_id=0)
        expected = [t for t in ref[0, len(ids):].tolist()]
        if info["eos_token_ids"][0] in expected:
            expected = expected[: expected.index(info["eos_token_ids"][0])]
        assert got == expected
        assert generator.generate_ids([ids], config)[0] == got  # padding in the batch changed nothing
    assert len({tuple(row) for row in batched}) > 1


def test_generation_stops_at_eos(plain_export):
    out, _ = plain_export
    generator = OnnxGenerator(out)
    ids = generator.encode("Let there be light")
    config = SamplingConfig(max_new_tokens=8, temperature=3.0, seed=0)  # hot sampling: varied tokens
    first = generator.generate_ids([ids], config)[0]
    assert len(first) == 8
    cut = next(k for k in range(1, len(first)) if first[k] not in first[:k])
    generator.eos_ids = {first[cut]}
    assert generator.generate_ids([ids], config)[0] == first[:cut]


def test_missing_adapter_is_a_config_error(tiny_model_dir, tmp_path):
    source = resolve_source(str(tiny_model_dir), keep=KEEP)
    with pytest.raises(ConfigError, match="--adapter.*no such file"):
        export_onnx(source, tmp_path / "out", adapter=tmp_path / "nope.safetensors")
    assert not (tmp_path / "out").exists()


def test_adapter_that_does_not_cover_the_pruning(tiny_model_dir, tmp_path):
    plan = make_plan("top", 8, KEEP)  # keeps 0..4
    short = _adapter(tiny_model_dir, tmp_path / "short.safetensors", layers=range(4))
    with pytest.raises(ConfigError, match=r"--adapter.*lacks"):
        read_global_adapter(short, plan, fingerprint_model_dir(tiny_model_dir))
    delta = _adapter(tiny_model_dir, tmp_path / "delta.safetensors", fmt=DELTA_FORMAT)
    with pytest.raises(ConfigError, match="--adapter.*prufed-delta/1"):
        read_global_adapter(delta, plan, fingerprint_model_dir(tiny_model_dir))
    with pytest.raises(ConfigError, match="--adapter.*base"):
        read_global_adapter(_adapter(tiny_model_dir, tmp_path / "full.safetensors"), plan, "sha256:other")


def test_mismatched_pruning_and_source_flags(tiny_model_dir, tmp_path):
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "pruning.json").write_text(make_plan("top", 12, 6).to_json())
    with pytest.raises(ConfigError, match=r"--pruning.*12-layer.*8 layers"):
        resolve_source(str(tiny_model_dir), pruning=wrong)
    with pytest.raises(ConfigError, match="--pruning.*not both"):
        resolve_source(str(tiny_model_dir), pruning=wrong, keep=3)
    with pytest.raises(ConfigError, match="--pruning.*or pass a `prufed prune` output"):
        resolve_source(str(tiny_model_dir))
    with pytest.raises(ConfigError, match="--pruning.*pruning.json"):
        resolve_source(str(tiny_model_dir), pruning=tmp_path)
    with pytest.raises(ConfigError, match="--keep"):
        resolve_source(str(tiny_model_dir), keep=9)


def test_parity_failure_is_loud_and_leaves_no_output(tiny_model_dir, tmp_path):
    with pytest.raises(ExportError, match="differ from PyTorch"):
        export_onnx(resolve_source(str(tiny_model_dir), keep=2), tmp_path / "out", tolerance=-1.0)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out-")]


def test_int4_copy_is_weight_only_4bit_on_every_projection(plain_export):
    """Every constant-weight MatMul (q, k, v, o, gate, up, down of each kept layer, and the LM head) becomes a
    MatMulNBits with 4-bit weights in blocks of INT4_BLOCK_SIZE; no float projection is left."""
    import onnx

    out, info = plain_export
    nodes = onnx.load(str(out / "model.int4.onnx")).graph.node
    nbits = [n for n in nodes if n.op_type == "MatMulNBits"]
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nbits]
    assert len(nbits) == 7 * KEEP + 1
    assert {(a["bits"], a["block_size"], a["accuracy_level"]) for a in attrs} == {(4, INT4_BLOCK_SIZE, 4)}
    assert not [n for n in nodes if n.op_type == "MatMul" and "_proj/" in n.name]
    assert info["int4"] == {"algorithm": INT4_ALGORITHM, "block_size": INT4_BLOCK_SIZE, "bits": 4, "accuracy_level": 4}
    # 0.5 B per weight + a scale and zero point per block vs 4 B in fp32 (the tiny embedding table stays fp32)
    assert (out / "model.int4.onnx").stat().st_size < 0.5 * (out / "model.onnx").stat().st_size


def test_int4_parity_to_torch_within_its_bound(plain_export):
    """The int4 graph tracks torch within INT4_PARITY of the logit scale, on the left-padded prefill and the
    cached decode step (the tiny random model's logits are near-flat, so argmax is not a useful check here)."""
    _, info = plain_export
    check = info["parity"]["int4"]
    scale = check["max_abs_logit"]
    assert 0 < check["prefill_max_abs_diff"] <= INT4_PARITY * scale  # > 0: it really quantized
    assert check["decode_max_abs_diff"] <= INT4_PARITY * scale
    # int4 error is larger than int8's weight error, and far larger than fp32 rounding
    assert check["prefill_max_abs_diff"] > 10 * info["parity"]["fp32"]["prefill_max_abs_diff"]


def test_cli_export_accepts_a_pruned_directory_as_model(pruned_dir, tmp_path, capsys):
    """`prufed export-onnx --model <prufed prune output>` reads its pruning.json (no --pruning/--keep needed)."""
    from prufed.cli import main

    out = tmp_path / "onnx"
    assert main(["export-onnx", "--model", str(pruned_dir), "--out", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kept_layers"] == list(read_plan(pruned_dir).kept_layers) and info["num_layers"] == KEEP
    assert Path(info["source_model"]) == pruned_dir
    assert info["base_fingerprint"] == fingerprint_model_dir(Path(read_plan(pruned_dir).source_model))
    assert main(["export-onnx", "--model", str(pruned_dir), "--keep", "3", "--out", str(tmp_path / "x")]) == 2
    assert "error: --keep" in capsys.readouterr().err


def test_generate_runs_the_int4_copy(plain_export, capsys):
    from prufed.cli import main

    out, _ = plain_export
    ids = OnnxGenerator(out, precision="int4").generate_ids([[5, 6, 7]], SamplingConfig(max_new_tokens=4))[0]
    assert 0 < len(ids) <= 4
    assert main(["generate", "--onnx", str(out), "--int4", "--prompt", "Amen", "--max-new-tokens", "4"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit):  # argparse: --int4 and --int8 exclude each other
        main(["generate", "--onnx", str(out), "--int4", "--int8", "--prompt", "Amen"])


def test_cli_int4_defaults_are_the_exporters():
    """prufed.cli.onnx repeats the defaults (importing the exporter would pull torch into `--help`): keep them equal."""
    from prufed.cli import build_parser

    args = build_parser().parse_args(["export-onnx", "--keep", "2", "--out", "x", "--int4"])
    assert (args.int4_block_size, args.int4_algorithm) == (INT4_BLOCK_SIZE, INT4_ALGORITHM)
