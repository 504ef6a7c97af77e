"""What a sparse method's selection kept of the dense attention (opt-in per run).

:mod:`.coverage` turns a method's selection (prefill index, decode page table or kept
tokens) and the layer's q/k into the share of dense softmax mass it covers and whether
given needle positions were selected; :mod:`.capture` records per-layer results during
a run. See docs/fidelity.md, "Diagnostics".
"""
