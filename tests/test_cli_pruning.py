"""`prufed prune / layers / eval` through prufed.cli.main on the tiny model, and every bad-flag path."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import save_tiny_model

import prufed.cli
from edge_client.core.pruning import STRATEGIES, make_plan
from edge_client.evaluate import perplexity
from edge_client.model import load_base_model, read_plan


@pytest.fixture(autouse=True)
def only_pruning_commands(monkeypatch):
    """Parse only this module's commands, so these tests do not depend on the other command modules."""
    monkeypatch.setattr(prufed.cli, "COMMAND_MODULES", ("prufed.cli.pruning",))


def run(capsys, *argv) -> tuple[int, str, str]:
    code = prufed.cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_prune_writes_model_and_plan(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    code, stdout, _ = run(capsys, "prune", "--model", tiny_model_dir, "--strategy", "top-alternate", "--keep", 5,
                          "--protect", "0,-1", "--out", out, "--json")
    assert code == 0
    report = json.loads(stdout)
    assert report["kept_layers"] == [0, 1, 2, 4, 7] and report["protected"] == [0, 7]
    plan = read_plan(out)
    assert plan.kept_layers == (0, 1, 2, 4, 7) and plan.source_model == str(tiny_model_dir)
    model, _ = load_base_model(out)
    base, _ = load_base_model(tiny_model_dir)
    assert len(model.model.layers) == 5
    for j, original in enumerate(plan.kept_layers):
        assert torch.equal(model.model.layers[j].mlp.up_proj.weight, base.model.layers[original].mlp.up_proj.weight)


def test_prune_scored_with_calib_file(tiny_model_dir, tmp_path, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text("Let there be light: and there was light.\n\nAnd God saw the light, that it was good.\n")
    code, stdout, _ = run(capsys, "prune", "--model", tiny_model_dir, "--strategy", "angular-block", "--keep", 6,
                          "--calib", calib, "--out", tmp_path / "p")
    assert code == 0 and "angular-block" in stdout
    dropped = read_plan(tmp_path / "p").dropped_layers
    assert len(dropped) == 2 and dropped[1] == dropped[0] + 1


def test_layers_json_lists_scores_and_every_strategy(tiny_model_dir, capsys):
    code, stdout, _ = run(capsys, "layers", "--model", tiny_model_dir, "--json")
    assert code == 0
    report = json.loads(stdout)
    assert report["num_layers"] == 8 and report["keep"] == 5  # round(2/3 * 8)
    assert [row["layer"] for row in report["layers"]] == list(range(8))
    assert all(row["magnitude"] > 0 and 0 <= row["contribution"] <= 2 for row in report["layers"])
    assert set(report["plans"]) == set(STRATEGIES)
    for strategy in ("top", "symmetric", "even-alternate"):
        assert report["plans"][strategy]["kept_layers"] == list(make_plan(strategy, 8, 5).kept_layers)
    contribution = [row["contribution"] for row in report["layers"]]
    lowest = sorted(range(8), key=lambda i: (contribution[i], i))[:3]
    assert report["plans"]["contribution"]["dropped_layers"] == sorted(lowest)


def test_layers_table(tiny_model_dir, capsys):
    code, stdout, _ = run(capsys, "layers", "--model", tiny_model_dir, "--keep", 6)
    assert code == 0
    assert "top-alternate" in stdout and "contribution" in stdout and "keep 6" in stdout


def test_eval_reports_kept_layers_and_matches_perplexity(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert run(capsys, "prune", "--model", tiny_model_dir, "--strategy", "bottom", "--keep", 4, "--out", out)[0] == 0
    code, stdout, _ = run(capsys, "eval", "--model", out, "--texts", 3, "--max-len", 32, "--json")
    assert code == 0
    report = json.loads(stdout)
    assert report["kept_layers"] == [4, 5, 6, 7] and report["source_num_layers"] == 8
    from edge_client.corpus import heldout_texts

    model, tokenizer = load_base_model(out)
    expected = perplexity(model, tokenizer, heldout_texts(3), max_len=32)
    assert report["perplexity"] == pytest.approx(expected.perplexity, rel=1e-6)
    assert report["tokens"] == expected.tokens
    code, stdout, _ = run(capsys, "eval", "--model", tiny_model_dir, "--texts", 2, "--max-len", 16)
    assert code == 0 and "perplexity" in stdout


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["prune", "--keep", "0"], "--keep"),
        (["prune", "--keep", "9"], "--keep"),
        (["prune", "--keep", "4", "--protect", "a,b"], "--protect"),
        (["prune", "--keep", "4", "--protect", "12"], "--protect"),
        (["prune", "--keep", "4", "--protect", "-1"], "--protect"),  # top drops the final layer
        (["prune", "--keep", "4", "--strategy", "magnitude", "--calib", "MISSING"], "--calib"),
        (["prune", "--keep", "4", "--out", "NONEMPTY"], "--out"),
        (["layers", "--keep", "0"], "--keep"),
        (["layers", "--keep", "20"], "--keep"),
        (["eval", "--batch-size", "0"], "--batch-size"),
        (["eval", "--max-len", "1"], "--max-len"),
        (["eval", "--texts", "0"], "--texts"),
        (["eval", "--data", "MISSING"], "--data"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(tiny_model_dir, tmp_path, capsys, argv, flag):
    nonempty = tmp_path / "full"
    nonempty.mkdir()
    (nonempty / "x").write_text("x")
    argv = [str(tmp_path / "missing.txt") if a == "MISSING" else str(nonempty) if a == "NONEMPTY" else a for a in argv]
    if argv[0] == "prune" and "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    code, _, stderr = run(capsys, *argv, "--model", tiny_model_dir)
    assert code == 2
    assert stderr.startswith(f"error: {flag}")
    assert not (tmp_path / "out").exists()


def test_bad_model_paths(tmp_path, capsys):
    code, _, stderr = run(capsys, "eval", "--model", tmp_path / "nowhere")
    assert code == 2 and "no such directory" in stderr
    pruned = tmp_path / "pruned"
    save_tiny_model(pruned)
    (pruned / "pruning.json").write_text(make_plan("top", 10, 8).to_json())
    code, _, stderr = run(capsys, "prune", "--model", pruned, "--keep", 4, "--out", tmp_path / "o")
    assert code == 2 and "already pruned" in stderr


def test_unknown_strategy_is_an_argparse_error(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        prufed.cli.main(["prune", "--model", str(tiny_model_dir), "--strategy", "middle", "--keep", "4",
                         "--out", str(tmp_path / "o")])
    assert info.value.code == 2
    assert "--strategy" in capsys.readouterr().err


@pytest.mark.slow
def test_default_model_converts_prunes_and_reloads(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from prufed.common.models import DEFAULT_MODEL, resolve_model

    base_dir = resolve_model()  # converts the GGUF into this session's cache on first use
    assert (base_dir / "config.json").is_file()
    out = tmp_path / "smollm2-20"
    code, stdout, _ = run(capsys, "prune", "--keep", 20, "--strategy", "top-alternate", "--out", out, "--json")
    assert code == 0 and json.loads(stdout)["source_model"] == DEFAULT_MODEL
    plan = read_plan(out)
    assert plan.source_num_layers == 30 and plan.depth == 20 and plan.kept_layers[-1] == 29
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.num_hidden_layers == 20
    base, tokenizer = load_base_model(base_dir)
    for j, original in enumerate(plan.kept_layers):
        assert torch.equal(model.model.layers[j].self_attn.q_proj.weight,
                           base.model.layers[original].self_attn.q_proj.weight)
    prompt = tokenizer("In the beginning God created", return_tensors="pt").input_ids
    kwargs = dict(max_new_tokens=5, do_sample=False)
    assert torch.equal(model.generate(prompt, use_cache=True, **kwargs), model.generate(prompt, use_cache=False, **kwargs))


def test_eval_on_an_instruction_file_scores_response_tokens(tiny_model_dir, tmp_path, capsys):
    from edge_client.data import load_examples, tokenize_examples
    from edge_client.evaluate import batched, masked_loss

    data = tmp_path / "heldout.jsonl"
    records = [{"instruction": "Quote John 11:35.", "input": "", "output": "Jesus wept."},
               {"instruction": "Finish the verse.", "input": "In the beginning", "output": "God created the heaven."}]
    data.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    code, stdout, _ = run(capsys, "eval", "--model", tiny_model_dir, "--data", data, "--max-len", 256, "--json")
    assert code == 0
    report = json.loads(stdout)
    model, tokenizer = load_base_model(tiny_model_dir)
    rows = tokenize_examples(load_examples(data), tokenizer, 256)
    assert len(rows) == 2
    expected = masked_loss(model, batched(rows, tokenizer.pad_token_id, 4))
    assert report["tokens"] == expected.tokens == sum(sum(label != -100 for label in r["labels"][1:]) for r in rows)
    assert report["loss"] == pytest.approx(expected.loss, rel=1e-6)
    assert report["kept_layers"] is None
