"""The hook point of the token mixers: every mixer layer calls its op through `call_op`, where an analysis may
watch it (`polyattn.analysis.attention_maps` reads attention maps this way).

`call_op(layer, op, q, k, v, *args, **kwargs)` is `op(q, k, v, *args, **kwargs)`. While observers are attached
(`observe_mixer_ops`, for the duration of a `with` block), each is then called with a `MixerCall`: the layer, the
op object the layer called and its arguments, and the output, so the observer can call the same op again (with
probe values, say) without knowing where or how the layer imported it. With none attached, the default, nothing
else is done: one test of an empty tuple, no extra computation, nothing stored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from torch import nn

_observers: tuple[Callable[[MixerCall], None], ...] = ()


@dataclass(frozen=True)
class MixerCall:
    """One call of a mixer's op, as the layer made it: `output = op(q, k, v, *args, **kwargs)`."""

    layer: nn.Module
    op: Callable
    q: Any
    k: Any
    v: Any
    args: tuple
    kwargs: dict
    output: Any

    def again(self, v: Any) -> Any:
        """The same op on the same queries, keys and options, with other values `v`."""
        return self.op(self.q, self.k, v, *self.args, **self.kwargs)


def call_op(layer: nn.Module, op: Callable, q: Any, k: Any, v: Any, *args, **kwargs) -> Any:
    """`op(q, k, v, *args, **kwargs)`, reported to the attached observers (if any) as a `MixerCall` of `layer`."""
    output = op(q, k, v, *args, **kwargs)
    if _observers:
        call = MixerCall(layer, op, q, k, v, args, kwargs, output)
        for observer in _observers:
            observer(call)
    return output


@contextmanager
def observe_mixer_ops(observer: Callable[[MixerCall], None]) -> Iterator[None]:
    """Within the block, `observer` sees every mixer op call (after the op ran); blocks nest."""
    global _observers
    outer = _observers
    _observers = (*outer, observer)
    try:
        yield
    finally:
        _observers = outer


__all__ = ["MixerCall", "call_op", "observe_mixer_ops"]
