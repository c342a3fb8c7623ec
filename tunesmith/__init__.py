"""tunesmith: fine-tune a pretrained language model on your own data, locally, and prove it got better."""
from tunesmith.config import RunConfig, load_config, provide_tasks
from tunesmith.errors import ConfigError, DataError, TrainingCancelled, TunesmithError

__all__ = ["RunConfig", "load_config", "train", "evaluate", "predict", "check_data",
           "TunesmithError", "ConfigError", "DataError", "TrainingCancelled"]
__version__ = "0.1.0"


def _get_task(name: str):
    # config sits below the tasks and asks them through this hook; importing them here lazily
    # keeps `import tunesmith` and `tunesmith --help` fast.
    from tunesmith.tasks import get_task
    return get_task(name)


provide_tasks(_get_task)


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
        from tunesmith.tasks.check import check_data
        return check_data
    raise AttributeError(name)
