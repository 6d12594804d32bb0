"""Layer-pruning plans (pure): which ORIGINAL decoder layers a pruned model keeps.

Indices are 0-based and always refer to the original (unpruned) model. With L source layers and N kept,
K = L - N layers are dropped. The example in each docstring is L=12, K=4.

Positional strategies need only (L, K). Scored strategies take per-layer scores computed elsewhere
(`edge_client.layer_scores`) on calibration text, so this module stays free of torch and I/O.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from prufed.common.errors import ConfigError

POSITIONAL_STRATEGIES = ("top", "bottom", "even-alternate", "odd-alternate", "top-alternate", "symmetric")
SCORED_STRATEGIES = ("magnitude", "contribution", "angular-block")
STRATEGIES = POSITIONAL_STRATEGIES + SCORED_STRATEGIES
#: The paper's finding: top dropping degrades least on average, so it is the default.
DEFAULT_STRATEGY = "top"


@dataclass(frozen=True)
class PruningPlan:
    """A pruning plan: `kept_layers` are ascending ORIGINAL indices into a `source_num_layers`-deep model."""

    strategy: str
    source_num_layers: int
    kept_layers: tuple[int, ...]
    source_model: str = ""
    protected: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        kept = tuple(int(i) for i in self.kept_layers)
        object.__setattr__(self, "kept_layers", kept)
        if self.source_num_layers < 1:
            raise ConfigError("source_num_layers", f"must be >= 1, got {self.source_num_layers}")
        if not kept:
            raise ConfigError("--keep", "a plan must keep at least one layer")
        if list(kept) != sorted(set(kept)):
            raise ConfigError("kept_layers", f"must be strictly ascending without repeats, got {list(kept)}")
        if kept[0] < 0 or kept[-1] >= self.source_num_layers:
            raise ConfigError("kept_layers", f"indices must lie in [0, {self.source_num_layers}), got {list(kept)}")
        protected = normalize_protected(self.protected, self.source_num_layers)
        object.__setattr__(self, "protected", protected)
        violated = sorted(set(protected) - set(kept))
        if violated:
            raise ConfigError(
                "--protect", f"strategy {self.strategy!r} drops protected layer(s) {violated}; "
                "choose another strategy or --keep, or remove them from --protect"
            )

    @property
    def depth(self) -> int:
        return len(self.kept_layers)

    @property
    def dropped_layers(self) -> tuple[int, ...]:
        kept = set(self.kept_layers)
        return tuple(i for i in range(self.source_num_layers) if i not in kept)

    def original_index(self, pruned_index: int) -> int:
        """Map a layer index of the pruned model to its ORIGINAL index."""
        return self.kept_layers[pruned_index]

    def pruned_index(self, original_index: int) -> int:
        """Map an ORIGINAL layer index to its index in the pruned model (KeyError if it was dropped)."""
        try:
            return self.kept_layers.index(original_index)
        except ValueError:
            raise KeyError(f"layer {original_index} was dropped by this plan") from None

    def to_json_dict(self) -> dict[str, Any]:
        """The `pruning.json` document: strategy, kept_layers, source_num_layers, source_model."""
        data = asdict(self)
        data["kept_layers"] = list(self.kept_layers)
        data["protected"] = list(self.protected)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_json_dict(), indent=2)

    @classmethod
    def from_json_dict(cls, data: dict[str, Any]) -> PruningPlan:
        missing = {"strategy", "kept_layers", "source_num_layers"} - set(data)
        if missing:
            raise ConfigError("pruning.json", f"missing field(s) {sorted(missing)}")
        return cls(
            strategy=str(data["strategy"]),
            source_num_layers=int(data["source_num_layers"]),
            kept_layers=tuple(data["kept_layers"]),
            source_model=str(data.get("source_model", "")),
            protected=tuple(data.get("protected", ())),
        )


def normalize_protected(protected: Iterable[int], num_layers: int) -> tuple[int, ...]:
    """Resolve negative indices (-1 is the final layer) and check bounds."""
    resolved = set()
    for index in protected:
        original = int(index)
        absolute = original + num_layers if original < 0 else original
        if not 0 <= absolute < num_layers:
            raise ConfigError("--protect", f"layer {original} is out of range for a {num_layers}-layer model")
        resolved.add(absolute)
    return tuple(sorted(resolved))


def parse_protect(text: str | None) -> tuple[int, ...]:
    """Parse `--protect 0,-1` into integers."""
    if not text:
        return ()
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError("--protect", f"expected comma-separated integers such as 0,-1, got {text!r}") from None


def _check_counts(num_layers: int, keep: int) -> int:
    if num_layers < 1:
        raise ConfigError("num_hidden_layers", f"must be >= 1, got {num_layers}")
    if not 1 <= keep <= num_layers:
        raise ConfigError("--keep", f"must be between 1 and {num_layers} (the model's layer count), got {keep}")
    return num_layers - keep


def _drop_then_fill(num_layers: int, drops: int, first_pass: Sequence[int]) -> list[int]:
    """Drop `first_pass` in order; if more drops are needed, continue with the highest layers still kept."""
    dropped = list(first_pass[:drops])
    remaining_from_top = [i for i in reversed(range(num_layers)) if i not in set(dropped)]
    dropped += remaining_from_top[: drops - len(dropped)]
    return dropped


def drop_top(num_layers: int, drops: int) -> list[int]:
    """Drop the K highest layers: L=12, K=4 -> drops 8, 9, 10, 11."""
    return list(range(num_layers - drops, num_layers))


def drop_bottom(num_layers: int, drops: int) -> list[int]:
    """Drop the K lowest layers: L=12, K=4 -> drops 0, 1, 2, 3."""
    return list(range(drops))


def drop_even_alternate(num_layers: int, drops: int) -> list[int]:
    """Every other layer from the top, starting at the top layer: L=12, K=4 -> drops 11, 9, 7, 5.

    These are the even layers in Sajjad et al.'s 1-based numbering. When K exceeds the ceil(L/2) alternate
    layers, the rest are taken from the highest layers still kept (top dropping).
    """
    return _drop_then_fill(num_layers, drops, list(range(num_layers - 1, -1, -2)))


def drop_odd_alternate(num_layers: int, drops: int) -> list[int]:
    """Every other layer from the top, starting one below it: L=12, K=4 -> drops 10, 8, 6, 4.

    When K exceeds the floor(L/2) alternate layers, the rest are taken from the highest layers still kept.
    """
    return _drop_then_fill(num_layers, drops, list(range(num_layers - 2, -1, -2)))


def drop_top_alternate(num_layers: int, drops: int) -> list[int]:
    """Top dropping and alternate dropping combined, never dropping the final layer.

    Our reading of the poster's best strategy: ceil(K/2) layers go as one contiguous block just below the
    final layer (the most redundant region, as top dropping shows), the other floor(K/2) alternate below
    that block (keeping depth spread, as alternate dropping does). The final layer feeds the LM head and
    its norm, so it always stays. L=12, K=4 -> drops 10, 9 (block), then 7, 5 (alternating).
    If alternation runs out of room, the rest comes from the highest kept layers below the final one.
    """
    if drops == 0:
        return []
    if drops >= num_layers:  # only possible for L=1; plan validation refuses an empty model anyway
        return list(range(num_layers))
    block = (drops + 1) // 2
    block_layers = list(range(num_layers - 2, num_layers - 2 - block, -1))
    alternating = list(range(num_layers - 3 - block, -1, -2))
    candidates = [i for i in block_layers + alternating if i >= 0]
    dropped = candidates[:drops]
    below_final = [i for i in reversed(range(num_layers - 1)) if i not in set(dropped)]
    dropped += below_final[: drops - len(dropped)]
    return dropped


def drop_symmetric(num_layers: int, drops: int) -> list[int]:
    """Drop the K middle layers, keeping the top and bottom: L=12, K=4 -> drops 4, 5, 6, 7.

    The block starts at floor((L - K) / 2), so the bottom keeps the extra layer when L - K is odd.
    """
    start = (num_layers - drops) // 2
    return list(range(start, start + drops))


POSITIONAL_DROPPERS: dict[str, Callable[[int, int], list[int]]] = {
    "top": drop_top,
    "bottom": drop_bottom,
    "even-alternate": drop_even_alternate,
    "odd-alternate": drop_odd_alternate,
    "top-alternate": drop_top_alternate,
    "symmetric": drop_symmetric,
}


def drop_lowest_scores(scores: Sequence[float], drops: int, protected: Iterable[int] = ()) -> list[int]:
    """Drop the K layers with the lowest score among the unprotected ones (ties: lower index first)."""
    protected_set = set(protected)
    eligible = [i for i in range(len(scores)) if i not in protected_set]
    if drops > len(eligible):
        raise ConfigError("--protect", f"cannot drop {drops} layers: only {len(eligible)} are unprotected")
    return sorted(eligible, key=lambda i: (scores[i], i))[:drops]


def drop_angular_block(block_distances: Sequence[float], drops: int, protected: Iterable[int] = ()) -> list[int]:
    """Gromov et al.: drop the contiguous block [s, s+K) whose input/output angular distance is smallest.

    `block_distances[s]` is d(h_s, h_{s+K}) = arccos(cos(h_s, h_{s+K})) / pi, averaged over tokens, where h_i
    is the hidden state entering layer i. Blocks that contain a protected layer are not eligible.
    """
    if drops == 0:
        return []
    protected_set = set(protected)
    eligible = [s for s in range(len(block_distances)) if not protected_set & set(range(s, s + drops))]
    if not eligible:
        raise ConfigError("--protect", f"every block of {drops} contiguous layers contains a protected layer")
    best = min(eligible, key=lambda s: (block_distances[s], s))
    return list(range(best, best + drops))


@dataclass(frozen=True)
class LayerScores:
    """Per-layer scores measured on calibration text (see `edge_client.layer_scores`).

    magnitude[i]: mean |w| over layer i's weight matrices. contribution[i]: Block Influence
    1 - mean_t cos(h_i, h_{i+1}). angular[k][s]: angular distance between h_s and h_{s+k} for block size k.
    """

    magnitude: tuple[float, ...]
    contribution: tuple[float, ...]
    angular: dict[int, tuple[float, ...]] = field(default_factory=dict)


def make_plan(
    strategy: str,
    num_layers: int,
    keep: int,
    *,
    scores: LayerScores | None = None,
    protect: Iterable[int] = (),
    source_model: str = "",
) -> PruningPlan:
    """Build the plan that keeps `keep` of `num_layers` layers with `strategy`.

    Positional strategies ignore `protect` when choosing and are refused if they hit it; scored strategies
    never consider protected layers. Raises `ConfigError` naming the flag at fault.
    """
    if strategy not in STRATEGIES:
        raise ConfigError("--strategy", f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    drops = _check_counts(num_layers, keep)
    protected = normalize_protected(protect, num_layers)
    if strategy in POSITIONAL_DROPPERS:
        dropped = POSITIONAL_DROPPERS[strategy](num_layers, drops)
    else:
        if scores is None:
            raise ConfigError("--strategy", f"{strategy!r} needs layer scores from calibration text")
        if len(scores.magnitude) != num_layers:
            raise ConfigError("scores", f"have {len(scores.magnitude)} layers, model has {num_layers}")
        if strategy == "magnitude":
            dropped = drop_lowest_scores(scores.magnitude, drops, protected)
        elif strategy == "contribution":
            dropped = drop_lowest_scores(scores.contribution, drops, protected)
        else:
            if drops and drops not in scores.angular:
                raise ConfigError("scores", f"no angular distances for block size {drops}")
            dropped = drop_angular_block(scores.angular.get(drops, ()), drops, protected)
    kept = tuple(i for i in range(num_layers) if i not in set(dropped))
    return PruningPlan(strategy, num_layers, kept, source_model=source_model, protected=protected)
