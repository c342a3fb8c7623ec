"""tunesmith: fine-tune a pretrained language model on your own data, locally, and prove it got better."""
from tunesmith.config import RunConfig, load_config
from tunesmith.errors import ConfigError, DataError, TrainingCancelled, TunesmithError

__all__ = ["RunConfig", "load_config", "train", "evaluate", "predict", "check_data",
           "TunesmithError", "ConfigError", "DataError", "TrainingCancelled"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The heavy entry points import torch/transformers; load them on first use so
    # `import tunesmith` and `tunesmith --help` stay fast.
    if name == "train":
        from tunesmith.train import train
        return train
    if name in {"evaluate", "predict"}:
        from tunesmith import runs
        return getattr(runs, name)
    if name == "check_data":
        from tunesmith.data.check import check_data
        return check_data
    raise AttributeError(name)
