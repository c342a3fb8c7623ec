"""An exponential moving average (EMA) of the trainable weights, used for evaluation and saving.

Small-data fine-tuning is noisy: held-out accuracy of the raw weights swings by several points from
one evaluation to the next while the learning rate is high. Averaging the recent weights (Polyak
averaging; timm's ModelEmaV2) smooths those swings at the cost of one extra copy of the trainable
weights, which for an adapter is a few MB. The decay warms up as min(decay, (1 + n) / (10 + n)), so
early on the average spans about the last tenth of the steps taken rather than dragging the random
initial weights along.

Training always continues from the raw weights; the average is swapped in only to evaluate, to save
the kept model, and for the final model. Not torch.optim.swa_utils.AveragedModel: that deep-copies
the whole module, frozen base included (a second copy of the model for a 1 MB adapter).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch


class WeightAverage:
    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params = params
        self.decay = decay
        self.updates = 0
        self.shadow = [p.detach().clone() for p in params]

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """Fold the weights after an optimizer step into the average."""
        self.updates += 1
        # lerp(shadow, p, 1 - d) = d * shadow + (1 - d) * p
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - self.current_decay())

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Swap the average into the parameters in place; put the raw weights back on exit."""
        with torch.no_grad():
            raw = [p.detach().clone() for p in self.params]
            torch._foreach_copy_([p.data for p in self.params], self.shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_([p.data for p in self.params], raw)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        """Make the average the model's weights for good (the end of training)."""
        torch._foreach_copy_([p.data for p in self.params], self.shadow)

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "shadow": [s.cpu() for s in self.shadow]}  # decay: from the config

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["shadow"]) != len(self.shadow) or any(a.shape != b.shape for a, b in zip(state["shadow"], self.shadow)):
            raise RuntimeError("checkpoint's weight average does not match the model's trainable weights")
        self.updates = state["updates"]
        self.shadow = [s.to(p.device, p.dtype) for s, p in zip(state["shadow"], self.params)]
