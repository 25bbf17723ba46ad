"""The analyses, one module per paper or question, each a verb over `engine.Engine`:

`criticality` (Gavrikov et al.: `measure`), `robustness` (Zhang et al.), `modcrit` (Chatterji et
al.), `generalization` (complexity measures and their ranking), `proxies/` (block proxies against
real resets), `shifts` (criticality under distribution shift), `adaptive` (sampling until a
precision is reached). The verbs are re-exported by the package `layercrit`; this face binds no
names, so that every submodule keeps its own name.
"""
