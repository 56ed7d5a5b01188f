"""EAN-style connection search (Huang et al., arXiv 2011.14058): supernet -> search -> retrain.

  * ``supernet``:   the engine step hook drawing a fresh random connection mask per training step;
  * ``evaluator``:  accuracy of the supernet under a scheme on the held-out val split, with an optional per-scheme
                    BN recalibration, cached per scheme in a JSONL file (``cache``);
  * ``reward``:     accuracy + alpha x (fraction of blocks not connected) [- latency term];
  * ``searchers``:  exhaustive, random, greedy and REINFORCE (EAN preset) on one budgeted oracle;
  * ``replay``:     the searchers against a committed reward table, many seeds, rank statistics;
  * ``pipeline``:   ``attnlab search --config ...``, the three phases, each resumable and skippable.

A scheme is a flat tuple of 0/1, one bit per residual block, first stage first (``models.connections``
converts it to the ``blocks=`` string "101-110-011").
"""
