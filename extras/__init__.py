"""Skip on a first read: everything beside the paper's objects. Baselines and ablation switches
(baselines, ablations: importing this package registers them in nara.METHODS), merging and the adapter
state (adapters), adapter files (interop), writing a checkpoint for transformers (files), run directories
(runs), data and scoring (tasks), Figures 1 and 3 (figures), and the sandbox for generated code. Each
imports the core (model, diffusion, nara), never the other way round."""
from extras import ablations, baselines  # noqa: F401  (their entries in nara.METHODS)
