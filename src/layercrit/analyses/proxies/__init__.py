"""Cheap block proxies of the layer-pruning literature, and how well they agree with real resets.

`similarity` holds the pure per-row math (Block Influence, angular distance, relative L2),
`recorder` the hooks that stream block inputs and outputs, `measure` the verb `proxies`, `compare`
the comparison with real criticality (`compare_proxies`, bootstrap rank correlations), and `result`
the result objects and their text tables.
"""

from .compare import bootstrap_rank_correlations, compare_proxies, paired_table
from .measure import proxies
from .result import ProxyComparison, ProxyResult, format_proxies, format_proxy_comparison
from .similarity import angular_distance, block_influence, cosine, relative_l2, sample_means

__all__ = [
    "ProxyComparison",
    "ProxyResult",
    "angular_distance",
    "block_influence",
    "bootstrap_rank_correlations",
    "compare_proxies",
    "cosine",
    "format_proxies",
    "format_proxy_comparison",
    "paired_table",
    "proxies",
    "relative_l2",
    "sample_means",
]
