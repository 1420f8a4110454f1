"""The names of the change metrics, in one place below everything that uses them: `locality.measure`
computes them, `measure.metrics` chooses among them (its rule in `locality.core.config`), analysis reads
them from results.json."""

CHANGE_METRICS = ("cosine", "cka_linear", "cka_debiased", "procrustes", "euclidean")
FEATURE_METRICS = ("dot", "norm", "norm_ratio")  # Ren et al. 2023 feature statistics, not oriented as change
METRICS = CHANGE_METRICS + FEATURE_METRICS  # what `layer_changes` computes from pooled features
TOKEN_METRICS = (
    "cosine_tokens",
)  # from per-token states during capture (`token_change`), not pooled features
MEASURE_METRICS = METRICS + TOKEN_METRICS  # every name `measure.metrics` accepts
