"""The paper's analyses as commands: per-layer AP plot (Fig. 1), imbalance tolerance (Table 3), ablations (4-9)."""
