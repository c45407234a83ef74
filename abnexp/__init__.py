"""abnexp: an experiment runner reproducing the In-Place Activated BatchNorm, MABN and
Cross-Iteration BN papers (normalization layers, native kernels, recipes, tables)."""

__version__ = "0.1.0"
