"""Text generation on an exported ONNX decoder with onnxruntime, numpy, tokenizers and jinja2 only (no torch).

Reads a directory written by `prufed export-onnx`: model.onnx (or model.int8.onnx / model.int4.onnx), tokenizer.json, the chat
template (chat_template.jinja or tokenizer_config.json) and export.json (cache shapes, eos ids).
Decoding: greedy (temperature 0) or sampling from softmax(logits / T) restricted to the top-p nucleus.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prufed.common.errors import ConfigError

ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
INT4_FILE = "model.int4.onnx"
#: Graph file per weight precision, as `export.json`'s "files" names them.
MODEL_FILES = {"fp32": ONNX_FILE, "int8": INT8_FILE, "int4": INT4_FILE}
EXPORT_FILE = "export.json"


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 = greedy; otherwise sample from the smallest token set whose probability mass >= top_p."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError("--max-new-tokens", f"must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ConfigError("--temperature", f"must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError("--top-p", f"must be in (0, 1], got {self.top_p}")


def position_ids_for(attention_mask: np.ndarray, seq: int) -> np.ndarray:
    """Positions of the last `seq` tokens: real tokens before each (pads get 1), as HF generate computes them."""
    positions = np.cumsum(attention_mask, axis=-1) - 1
    positions = np.where(attention_mask == 0, 1, positions)
    return positions[:, -seq:].astype(np.int64)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) int64 with each row right-aligned."""
    width = max(len(row) for row in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = row
            mask[i, width - len(row):] = 1
    return ids, mask


def next_tokens(logits: np.ndarray, config: SamplingConfig, rng: np.random.Generator) -> np.ndarray:
    """Pick one token per row of `logits` [batch, vocab]."""
    if config.temperature == 0:
        return logits.argmax(-1)
    scaled = logits.astype(np.float64) / config.temperature
    probs = np.exp(scaled - scaled.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    picks = np.empty(len(probs), dtype=np.int64)
    for row, p in enumerate(probs):
        order = np.argsort(-p, kind="stable")
        mass = np.cumsum(p[order])
        # Keep tokens until the mass before them reaches top_p (the first token always stays).
        keep = order[: int(np.searchsorted(mass, config.top_p, side="left")) + 1]
        picks[row] = rng.choice(keep, p=p[keep] / p[keep].sum())
    return picks


def render_chat(template: str, messages: Sequence[dict], special: dict[str, str]) -> str:
    """Render a HF chat template the way transformers does (sandboxed jinja2, trim/lstrip blocks)."""
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=list(messages), add_generation_prompt=True, **special)


def past_names(depth: int) -> list[str]:
    return [f"past_key_values.{i}.{kind}" for i in range(depth) for kind in ("key", "value")]


class OnnxDecoder:
    """An onnxruntime session over the exported graph (see `edge_client.onnx_export` for its inputs/outputs)."""

    def __init__(self, model_file: str | Path, depth: int, kv_shape: tuple[int, int], threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
        self.kv_shape = kv_shape
        self.past_names = past_names(depth)

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                 past: Sequence[np.ndarray] | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """One decoder call: logits [batch, seq, vocab] and the grown cache. `past=None` = empty cache."""
        if past is None:
            empty = np.zeros((input_ids.shape[0], self.kv_shape[0], 0, self.kv_shape[1]), dtype=np.float32)
            past = [empty] * len(self.past_names)
        feed = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64),
                "position_ids": position_ids_for(attention_mask, input_ids.shape[1])}
        feed.update(zip(self.past_names, past))
        logits, *presents = self.session.run(None, feed)
        return logits, presents


class OnnxGenerator:
    """An exported decoder + its tokenizer; `generate` runs prefill then one cached step per new token."""

    def __init__(self, onnx_dir: str | Path, *, precision: str = "fp32", threads: int | None = None):
        from tokenizers import Tokenizer

        self.dir = Path(onnx_dir)
        info_path = self.dir / EXPORT_FILE
        if not info_path.is_file():
            raise ConfigError("--onnx", f"{self.dir} has no {EXPORT_FILE}; export one with `prufed export-onnx`")
        self.info = json.loads(info_path.read_text())
        if precision not in MODEL_FILES:
            raise ConfigError("--precision", f"must be one of {', '.join(MODEL_FILES)}, got {precision!r}")
        model_file = self.dir / MODEL_FILES[precision]
        if not model_file.is_file():
            hint = f" (export with --{precision})" if precision != "fp32" else ""
            raise ConfigError(f"--{precision}" if precision != "fp32" else "--onnx", f"no such file: {model_file}{hint}")
        kv_shape = (int(self.info["num_key_value_heads"]), int(self.info["head_dim"]))
        self.decoder = OnnxDecoder(model_file, int(self.info["num_layers"]), kv_shape, threads)
        self.tokenizer = Tokenizer.from_file(str(self.dir / "tokenizer.json"))
        self.tokenizer_config = self._json("tokenizer_config.json")
        self.eos_ids = set(self.info["eos_token_ids"])
        pad = self.info.get("pad_token_id")
        self.pad_id = int(pad if pad is not None else min(self.eos_ids))

    def _json(self, name: str) -> dict:
        path = self.dir / name
        return json.loads(path.read_text()) if path.is_file() else {}

    def chat_template(self) -> str:
        path = self.dir / "chat_template.jinja"
        template = path.read_text() if path.is_file() else self.tokenizer_config.get("chat_template")
        if not template:
            raise ConfigError("--chat", f"{self.dir} has no chat template")
        return template

    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        """Token ids as transformers would give: `tokenizer(prompt)` or `apply_chat_template(..., tokenize=True)`."""
        if not chat:
            return self.tokenizer.encode(prompt).ids
        special = {name: self._token_text(name) for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
        text = render_chat(self.chat_template(), [{"role": "user", "content": prompt}], special)
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def _token_text(self, name: str) -> str:
        value = self.tokenizer_config.get(name) or ""
        return value.get("content", "") if isinstance(value, dict) else value

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def generate_ids(self, prompts: Sequence[Sequence[int]], config: SamplingConfig,
                     on_token: Callable[[int], None] | None = None) -> list[list[int]]:
        """New token ids per prompt (left-padded batch); a row stops after its first eos (eos not returned)."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ConfigError("--prompt", "every prompt must encode to at least one token")
        rng = np.random.default_rng(config.seed)
        ids, mask = left_pad(prompts, self.pad_id)
        logits, past = self.decoder(ids, mask, None)
        done = np.zeros(len(prompts), dtype=bool)
        out: list[list[int]] = [[] for _ in prompts]
        for step in range(config.max_new_tokens):
            tokens = next_tokens(logits[:, -1], config, rng)
            for row, token in enumerate(tokens):
                if not done[row]:
                    done[row] = int(token) in self.eos_ids
                    if not done[row]:
                        out[row].append(int(token))
            if on_token:
                on_token(step + 1)
            if done.all() or step + 1 == config.max_new_tokens:
                break
            # Finished rows keep feeding pad tokens so the batch stays rectangular; their output is ignored.
            tokens = np.where(done, self.pad_id, tokens).astype(np.int64)[:, None]
            mask = np.concatenate([mask, np.ones((len(prompts), 1), dtype=np.int64)], axis=1)
            logits, past = self.decoder(tokens, mask, past)
        return out

    def generate(self, prompt: str, config: SamplingConfig, chat: bool = False,
                 on_token: Callable[[int], None] | None = None) -> str:
        ids = self.generate_ids([self.encode(prompt, chat)], config, on_token)[0]
        return self.decode(ids)

