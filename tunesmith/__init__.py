"""tunesmith: fine-tune a pretrained language model on your own data, locally, and prove it got better."""
import logging
import sys
import types
import warnings

from tunesmith.config import RunConfig, load_config, provide_tasks
from tunesmith.errors import ConfigError, DataError, TrainingCancelled, TunesmithError

__all__ = ["RunConfig", "load_config", "train", "evaluate", "predict", "check_data",
           "TunesmithError", "ConfigError", "DataError", "TrainingCancelled"]
__version__ = "0.1.0"

# peft calls a transformers method that transformers 5 deprecates; nothing a user can act on.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


class _QuantKernelNote(logging.Filter):
    """bitsandbytes logs, on import, that its optional CPU 4-bit kernel (the `kernels` package,
    fetched from a hub) is missing. Every command imports bitsandbytes through peft, and that
    kernel serves the AVX-512 inference layout tunesmith keeps off (models/quant.py:
    keep_one_cpu_4bit_path), so the line says nothing a user can act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_QuantKernelNote())

# The API's entry points, loaded on first use so `import tunesmith` and `tunesmith --help` stay
# fast: name -> (module, attribute).
_LAZY = {"train": ("tunesmith.train", "train"), "evaluate": ("tunesmith.runs", "evaluate"),
         "predict": ("tunesmith.runs", "predict"), "check_data": ("tunesmith.tasks.check", "check_data")}


def _get_task(name: str):
    # config sits below the tasks and asks them through this hook; importing them here lazily
    # keeps `import tunesmith` and `tunesmith --help` fast.
    from tunesmith.tasks import get_task
    return get_task(name)


provide_tasks(_get_task)


def __getattr__(name: str):
    if name in _LAZY:
        # Plain imports (not importlib on _LAZY's strings) so the import graph test sees them.
        if name == "train":
            from tunesmith.train import train as fn
        elif name == "check_data":
            from tunesmith.tasks.check import check_data as fn
        else:
            from tunesmith import runs
            fn = getattr(runs, name)
        sub = sys.modules.get(f"{__name__}.{name}")
        if sub is not None:  # `import tunesmith.train.loop as loop` walks tunesmith.train.loop: let the function
            for key, value in vars(sub).items():  # carry the subpackage's loaded submodules as attributes
                if isinstance(value, types.ModuleType) and value.__name__ == f"{sub.__name__}.{key}":
                    setattr(fn, key, value)
        return fn
    raise AttributeError(name)


class _Package(types.ModuleType):
    """`train` and `evaluate` are both API functions and subpackages (tunesmith/train/,
    tunesmith/evaluate/). Importing a subpackage makes Python set it as an attribute of this
    package, which would shadow the function for `from tunesmith import train`. The function
    wins: the attribute is left unset, so `__getattr__` above returns the function, while
    `import tunesmith.train.loop` and `from tunesmith.train import checkpoint` still find the
    subpackages in sys.modules, and `import tunesmith.train.loop as loop` (which walks the
    attributes) finds the submodules on the function (see `__getattr__`)."""

    def __setattr__(self, name: str, value) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
