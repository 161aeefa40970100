"""`svd`: plain activation PCA of the group's keys (per RoPE pair, complex) and values."""

from kvconvert.merge.lowrank import LowRankLosses, low_rank_loss, low_rank_merge
from kvconvert.merge.problem import Method

METHOD = Method(
    "svd",
    lambda p: low_rank_loss(p, False),
    lambda p: low_rank_merge(p, False),
    lambda lm, geom, coherence: LowRankLosses(lm, geom, coherence, False),
)
