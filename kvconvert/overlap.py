"""Decompose and export at once: the plan is computed on a thread while the export streams the checkpoint.

The writer asks for layer `i`'s plan only when it reaches that layer's attention tensors, and waits just for that
layer; everything else (MLPs, norms, embeddings) is written while the planner works. At 7B scale on a GPU host the
export alone is about one copy of the checkpoint, so overlapping takes the planning off the critical path.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import TracebackType

from kvconvert.plan import CompressionPlan, LayerPlan

OnLayer = Callable[[int, LayerPlan], None]


class Cancelled(Exception):
    """Raised inside the planner when its consumer gave up (the export failed or was interrupted)."""


class PendingPlan:
    """A `CompressionPlan` being computed on a thread; `layer(i)` waits for layer `i` only, `result()` for all.

    Use as a context manager: leaving the block (normally or by an error) stops the planner at its next finished
    layer and joins its thread, so no work outlives the caller.
    """

    def __init__(self, plan: Callable[[OnLayer], CompressionPlan], num_layers: int, num_kv_heads_after: int):
        """Start `plan(on_layer)` on a thread; it must call `on_layer(layer, plan)` for every layer it finishes."""
        self.num_kv_heads_after = num_kv_heads_after
        self._layers: list[LayerPlan | None] = [None] * num_layers
        self._ready = [threading.Event() for _ in range(num_layers)]
        self._stop = threading.Event()
        self._plan: CompressionPlan | None = None
        self._error: BaseException | None = None
        # not a daemon: exiting while a daemon thread is inside torch aborts the process (streaming.read_in_background)
        self._thread = threading.Thread(target=self._run, args=(plan,), name="kvconvert-decompose")
        self._thread.start()

    def _run(self, plan: Callable[[OnLayer], CompressionPlan]) -> None:
        try:
            self._plan = plan(self._deliver)
        except BaseException as exc:  # handed to whoever waits for a layer or the result
            self._error = exc
        finally:
            for event in self._ready:
                event.set()

    def _deliver(self, layer: int, plan: LayerPlan) -> None:
        if self._stop.is_set():
            raise Cancelled
        self._layers[layer] = plan
        self._ready[layer].set()

    def layer(self, i: int) -> LayerPlan:
        """Layer `i`'s plan, waiting until it is ready; the planner's own error if it failed."""
        self._ready[i].wait()
        found = self._layers[i]
        if found is None:
            raise self._failure()
        return found

    def result(self) -> CompressionPlan:
        """The whole plan, once every layer is done."""
        self._thread.join()
        if self._plan is None:
            raise self._failure()
        return self._plan

    def _failure(self) -> BaseException:
        return self._error or RuntimeError("the planning thread ended without a plan")

    def close(self) -> None:
        """Stop the planner (at its next finished layer) and wait for its thread."""
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> PendingPlan:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
