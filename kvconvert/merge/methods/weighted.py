"""`weighted` (default): the PCA of `svd`, weighted by what the merged head feeds: query energy per key frequency
pair (minus the share of a constant key offset that softmax ignores), and o_proj's columns for values."""

from kvconvert.merge.lowrank import LowRankLosses, low_rank_loss, low_rank_merge
from kvconvert.merge.problem import Method

METHOD = Method(
    "weighted",
    lambda p: low_rank_loss(p, True),
    lambda p: low_rank_merge(p, True),
    lambda lm, geom, coherence: LowRankLosses(lm, geom, coherence, True),
)
