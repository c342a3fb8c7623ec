"""Hyperparameter search over train(), on Optuna: `run_search(config, space, trials=N)`.

Ours: the space file and the built-in spaces (space.py), the trial runner (each trial a child
process that reports its validations from inside the loop for pruning: runner.py, child.py),
sharing one study between processes and recovering killed trials (study.py), and what a search
leaves behind (report.py). Optuna's: samplers, pruners, storages, plots. docs/SEARCH.md.
"""
from tunesmith.search.driver import SearchResult, run_search
from tunesmith.search.space import Param, Space, SpaceError, default_space, load_space

__all__ = ["run_search", "SearchResult", "Space", "Param", "SpaceError", "load_space", "default_space"]
