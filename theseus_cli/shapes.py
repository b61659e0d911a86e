"""``ShapeRecord``: what one dry forward pass observed about a module (``models.hooks.trace_shapes`` writes it;
surgery and the replacements' ``check_call`` read it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# output_arity of a module that returns neither a tensor nor a tuple/list (a dict, a ModelOutput). The value is
# stored in the plan entries of saved targets, so it stays -1.
OTHER_OUTPUT = -1


@dataclass
class ShapeRecord:
    calls: int = 0  # how often the module ran in one forward pass (> 1: a shared module)
    order: int = -1  # when its first call finished, among all modules (execution order)
    input: Optional[tuple[int, ...]] = None  # the primary input's per-sample shape (None: no tensor input)
    output: Optional[tuple[int, ...]] = None  # the first output tensor's per-sample shape (None: no tensor output)
    n_inputs: int = 0  # tensors passed in, positional or keyword
    output_arity: Optional[int] = None  # None: a bare tensor; n: a tuple/list of n; OTHER_OUTPUT: anything else

    @property
    def returns_other(self) -> bool:
        return self.output_arity == OTHER_OUTPUT
