"""How the study slices its models: scale bands by parameter count (families and block types live with the
backbones). One definition, used by run metadata, W&B tags and the analysis tables."""

from __future__ import annotations

# (upper bound in parameters, band name); the study's models fall at 110M-410M, 1.3B-1.4B and 6.9B.
SCALE_BANDS = ((200e6, "<200M"), (1e9, "200M-1B"), (3e9, "1B-3B"), (float("inf"), ">3B"))


def scale_band(n_params: int | float) -> str:
    return next(name for bound, name in SCALE_BANDS if n_params < bound)
