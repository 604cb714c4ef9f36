"""unimm's benchmarks: one module per family, each timing unimm against the code people run today
(the anchors) on the same inputs, checking every result against a reference, and writing one
JSON file, on the harness they share (``_harness``); ``suite`` runs them as ``unimm bench`` and
``render`` turns the results into docs/PERFORMANCE.md.

    unimm bench --quick                     # one headline shape per family, strongest anchors
    unimm bench --families cross_entropy    # one family at all its headline shapes
    python -m unimm.bench.attention --help  # a family's own options (shapes, layouts, ...)
"""

# The families, in the order `unimm bench` runs them (under a time budget the first matter most).
FAMILIES = ("cross_entropy", "attention", "generate", "diffusion_head", "vq", "train_step")
