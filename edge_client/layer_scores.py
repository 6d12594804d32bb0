"""Per-layer scores for the scored pruning strategies, measured on calibration text.

With h_i the hidden state ENTERING decoder layer i (h_0 = token embeddings, h_L = output of the last layer,
before the final norm), averaged over every non-padding token t of the calibration text:

  magnitude[i]    = mean |w| over all elements of layer i's Linear weights          (unitless)
  contribution[i] = 1 - mean_t cos(h_i, h_{i+1})     Block Influence (ShortGPT) = Sajjad's contribution
  angular[k][s]   = mean_t arccos(cos(h_s, h_{s+k})) / pi   in [0, 1], Gromov et al., for s = 0..L-k
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from edge_client.core.pruning import SCORED_STRATEGIES, LayerScores, PruningPlan, make_plan
from edge_client.evaluate import pad_batch
from prufed.common.errors import ConfigError

#: Calibration passages are cut at this many tokens; a few hundred tokens in all are enough to rank layers.
CALIB_MAX_LEN = 256


def weight_magnitudes(layers: nn.ModuleList) -> tuple[float, ...]:
    """magnitude[i] = sum |w| / count over the weights of every nn.Linear in layer i (norms excluded)."""
    scores = []
    for layer in layers:
        total, count = 0.0, 0
        for module in layer.modules():
            if isinstance(module, nn.Linear):
                weight = module.weight.detach()
                total += weight.abs().double().sum().item()
                count += weight.numel()
        scores.append(total / count if count else 0.0)
    return tuple(scores)


@torch.inference_mode()
def compute_layer_scores(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    block_sizes: Iterable[int] = (),
    max_len: int = CALIB_MAX_LEN,
    batch_size: int = 4,
    on_batch: Callable[[int, int], None] | None = None,
) -> LayerScores:
    """Score every decoder layer of `model` on `texts` (one forward pass per batch; see the module docstring).

    `block_sizes` are the k for which angular distances are computed (k = layers dropped by `angular-block`).
    `on_batch(done, total)` is called after each batch with the number of texts scored (for a progress bar).
    """
    from edge_client.model import decoder_layers

    layers = decoder_layers(model)
    num_layers = len(layers)
    sizes = sorted({int(k) for k in block_sizes})
    if any(not 1 <= k <= num_layers for k in sizes):
        raise ConfigError("--keep", f"block sizes must lie in [1, {num_layers}], got {sizes}")
    token_lists = [ids[:max_len] for ids in tokenizer(list(texts), add_special_tokens=True)["input_ids"]]
    token_lists = [ids for ids in token_lists if ids]
    if not token_lists:
        raise ConfigError("--calib", "calibration text is empty after tokenization")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    # HF's last entry of `hidden_states` is AFTER the final RMSNorm, which rescales every token: comparing it
    # with the un-normed h_{L-1} would make the last layer look like it changes the residual stream a lot.
    # The residual stream leaving the last layer is the final norm's input, so capture that instead.
    captured: list[torch.Tensor] = []
    hook = model.model.norm.register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
    cos_sums = torch.zeros(num_layers, dtype=torch.float64)
    angular_sums = {k: torch.zeros(num_layers - k + 1, dtype=torch.float64) for k in sizes}
    tokens = 0
    try:
        for start in range(0, len(token_lists), batch_size):
            batch = pad_batch([{"input_ids": ids} for ids in token_lists[start : start + batch_size]], pad_id)
            input_ids, mask = batch["input_ids"], batch["attention_mask"]
            captured.clear()
            out = model.model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
            # h_0..h_{L-1} are the inputs of layers 0..L-1; h_L is the final norm's input.
            states = list(out.hidden_states[:num_layers]) + [captured[-1]]
            valid = mask.bool()
            flat = [h[valid].double() for h in states]  # [N_tokens, hidden], padding removed
            tokens += int(valid.sum())
            for i in range(num_layers):
                cos_sums[i] += nn.functional.cosine_similarity(flat[i], flat[i + 1], dim=-1).sum()
            for k in sizes:
                for s in range(num_layers - k + 1):
                    cos = nn.functional.cosine_similarity(flat[s], flat[s + k], dim=-1).clamp(-1.0, 1.0)
                    angular_sums[k][s] += (torch.arccos(cos) / torch.pi).sum()
            if on_batch is not None:
                on_batch(min(start + batch_size, len(token_lists)), len(token_lists))
    finally:
        hook.remove()
    return LayerScores(
        magnitude=weight_magnitudes(layers),
        contribution=tuple((1.0 - cos_sums / tokens).tolist()),
        angular={k: tuple((angular_sums[k] / tokens).tolist()) for k in sizes},
    )


def read_calibration_file(path: str | os.PathLike[str]) -> list[str]:
    """Passages of a plain-text calibration file: blocks separated by blank lines (one passage if none)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError("--calib", f"no such file: {file}")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError("--calib", f"{file} is not UTF-8 text") from None
    passages = [" ".join(block.split()) for block in text.split("\n\n")]
    passages = [p for p in passages if p]
    if not passages:
        raise ConfigError("--calib", f"{file} holds no text")
    return passages


def calibration_passages(calib_file: str | os.PathLike[str] | None = None) -> list[str]:
    """`--calib FILE` passages, else the built-in corpus's calibration split."""
    if calib_file is not None:
        return read_calibration_file(calib_file)
    from edge_client.corpus import calibration_texts

    return calibration_texts()


def source_model_dir(spec: str | os.PathLike[str] | None) -> Path:
    """Resolve a model to prune; refuse an already pruned directory (plans index the ORIGINAL layers)."""
    from edge_client.model import read_plan
    from prufed.common.models import resolve_model

    model_dir = resolve_model(spec)
    if read_plan(model_dir) is not None:
        raise ConfigError("--model", f"{model_dir} is already pruned (pruning.json); prune the original model instead")
    return model_dir


def plan_for_model(
    model_dir_or_spec: str | os.PathLike[str] | None,
    strategy: str,
    keep: int,
    protect: Iterable[int] = (),
    calib_file: str | os.PathLike[str] | None = None,
    *,
    on_batch: Callable[[int, int], None] | None = None,
) -> PruningPlan:
    """The pruning plan for a model (alias or directory); loads the model and scores layers only when scored.

    Strategy, keep and protect are checked before any model is loaded.
    """
    from edge_client.model import load_base_model, num_layers_of
    from prufed.common.models import DEFAULT_MODEL

    model_dir = source_model_dir(model_dir_or_spec)
    source = str(model_dir_or_spec) if model_dir_or_spec is not None else DEFAULT_MODEL
    num_layers = num_layers_of(model_dir)
    protect = tuple(protect)
    if strategy not in SCORED_STRATEGIES:
        return make_plan(strategy, num_layers, keep, protect=protect, source_model=source)
    make_plan("top", num_layers, keep, source_model=source)  # validates keep cheaply
    texts = calibration_passages(calib_file)
    model, tokenizer = load_base_model(model_dir)
    drops = num_layers - keep
    sizes = (drops,) if strategy == "angular-block" and drops else ()
    scores = compute_layer_scores(model, tokenizer, texts, block_sizes=sizes, on_batch=on_batch)
    return make_plan(strategy, num_layers, keep, scores=scores, protect=protect, source_model=source)
