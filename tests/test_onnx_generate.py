"""onnxruntime generation: the torch-free import boundary, the CLI's stdout contract, sampling, chat encoding."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_client.onnx_generate import OnnxGenerator, SamplingConfig, next_tokens
from prufed.cli import main
from prufed.common.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "And God said"


@pytest.fixture(scope="module")
def onnx_dir(tiny_model_dir, tmp_path_factory):
    from edge_client.global_adapter import resolve_source
    from edge_client.onnx_export import export_onnx

    out = tmp_path_factory.mktemp("gen") / "onnx"
    export_onnx(resolve_source(str(tiny_model_dir), keep=4, strategy="top"), out)
    return out


def _python(code: str, *, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_import_boundary_has_no_torch():
    result = _python(
        "import sys; import edge_client.onnx_generate, prufed.cli.onnx, prufed.cli; "
        "import onnxruntime, tokenizers, jinja2; "
        "bad = sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules); "
        "assert not bad, bad; print('ok')"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_cli_generate_runs_with_torch_unimportable(onnx_dir):
    expected = OnnxGenerator(onnx_dir).generate(PROMPT, SamplingConfig(max_new_tokens=6))
    # sys.modules['torch'] = None makes every `import torch` raise ImportError in the child.
    result = _python(
        "import sys; sys.modules['torch'] = None; from prufed.cli import main; "
        f"sys.exit(main(['generate', '--onnx', {str(onnx_dir)!r}, '--prompt', {PROMPT!r}, '--max-new-tokens', '6']))"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
    assert expected  # the model produced some text


def test_cli_generate_onnx_equals_torch_path(onnx_dir, capsys):
    import json

    assert main(["generate", "--onnx", str(onnx_dir), "--prompt", PROMPT, "--max-new-tokens", "8", "--chat"]) == 0
    onnx_text = capsys.readouterr().out
    source = json.loads((onnx_dir / "export.json").read_text())["source_model"]
    assert main(["generate", "--model", source, "--prompt", PROMPT, "--max-new-tokens", "8", "--chat"]) == 0
    assert capsys.readouterr().out == onnx_text


@pytest.mark.parametrize("flag,value", [("--top-p", "0"), ("--temperature", "-1"), ("--max-new-tokens", "0"),
                                        ("--threads", "0")])
def test_cli_rejects_bad_flags(onnx_dir, capsys, flag, value):
    assert main(["generate", "--onnx", str(onnx_dir), "--prompt", "x", flag, value]) == 2
    assert f"error: {flag}" in capsys.readouterr().err


def test_cli_rejects_a_directory_without_export(tmp_path, capsys):
    assert main(["generate", "--onnx", str(tmp_path), "--prompt", "x"]) == 2
    assert "export.json" in capsys.readouterr().err


def test_sampling_is_reproducible_with_a_seed(onnx_dir):
    generator = OnnxGenerator(onnx_dir)
    ids = [generator.encode(PROMPT)]
    hot = SamplingConfig(max_new_tokens=12, temperature=1.5, top_p=0.95, seed=7)
    first = generator.generate_ids(ids, hot)
    assert generator.generate_ids(ids, hot) == first
    assert generator.generate_ids(ids, SamplingConfig(12, 1.5, 0.95, seed=8)) != first
    # A vanishing nucleus keeps only the most likely token: sampling collapses to greedy.
    assert generator.generate_ids(ids, SamplingConfig(12, 1.5, 1e-9, seed=7)) == \
        generator.generate_ids(ids, SamplingConfig(12))


def test_top_p_draws_only_from_the_nucleus():
    probs = np.array([0.05, 0.5, 0.15, 0.3])
    logits = np.log(probs)[None, :].repeat(400, axis=0)
    rng = np.random.default_rng(0)
    picks = next_tokens(logits, SamplingConfig(temperature=1.0, top_p=0.7), rng)
    assert set(picks.tolist()) == {1, 3}  # 0.5 + 0.3 >= 0.7: token 2 and token 0 are outside
    share = float((picks == 1).mean())
    assert abs(share - 0.5 / 0.8) < 0.08
    assert next_tokens(logits[:2], SamplingConfig(), rng).tolist() == [1, 1]


def test_chat_encoding_matches_transformers(onnx_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(onnx_dir)
    messages = [{"role": "user", "content": "Who was Moses?"}]
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"]
    generator = OnnxGenerator(onnx_dir)
    assert generator.encode("Who was Moses?", chat=True) == expected
    assert generator.encode("Who was Moses?") == tokenizer("Who was Moses?")["input_ids"]


def test_sampling_config_validation():
    with pytest.raises(ConfigError, match="--top-p"):
        SamplingConfig(top_p=1.5)
    with pytest.raises(ConfigError, match="--temperature"):
        SamplingConfig(temperature=float("nan"))
