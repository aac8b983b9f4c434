"""The comparison's data: `Row` (one configuration against the baseline), `Comparison` (the rows and what is said
about them) and the Pareto front.

Shared by `compare` (which builds and formats them) and `plotting` (which draws them), so that neither imports the
other.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

SIGNIFICANCE_LEVEL = 0.05


@dataclass
class Row:
    """One line of the comparison (None = not available)."""

    file: str
    strategy: str
    baseline: bool
    method: str | None  # the pruning method's name (None: baseline)
    group: str | None  # rows of one group share a plot colour (FastV: its selection rule)
    parameters: dict | None  # the method's parameters that change results
    accuracy: float
    correct: int
    samples: int
    errors: int
    delta: float | None
    avg_latency_s: float | None
    prefill_mean_s: float | None
    prefill_median_s: float | None
    prefill_spread: float | None  # interquartile range / median of the per-sample prefill times
    prefill_speedup: float | None  # from median prefill times (from means when a file has no median)
    prefill_speedup_mean: float | None
    generate_speedup: float | None
    flops_ratio: float | None
    image_tokens: float | None
    kept_image_tokens: float | None
    image_tokens_per_layer: float | None  # mean over the decoder layers of the image tokens each processed
    busy_cores: float | None  # cores other processes kept busy, when the result file records it
    paired_samples: int | None = None
    mcnemar_b: int | None = None  # questions only the baseline answers correctly
    mcnemar_c: int | None = None  # questions only this run answers correctly
    p_value: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    short_label: str = ""
    reference: str | None = None  # the reference method's row (FastV) nearest in FLOPs, compared with paired tests
    reference_delta: float | None = None
    reference_p_value: float | None = None

    @property
    def significant(self) -> bool:
        return self.p_value is not None and self.p_value < SIGNIFICANCE_LEVEL

    def to_dict(self) -> dict:
        data = asdict(self)
        del data["short_label"]
        return data


@dataclass
class Comparison:
    rows: list[Row]
    results_dir: str
    baseline: str | None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    question_files: list[dict] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    standard_error: float | None = None  # of the baseline's accuracy (binomial), as a fraction
    timing_problems: list[str] = field(default_factory=list)  # why the prefill times are not trustworthy
    embedded_model: bool = False  # some results come from the embedded toy model (models/tiny-llava-scienceqa)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats (cost <= and accuracy >=, one of them strictly), by cost."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front
