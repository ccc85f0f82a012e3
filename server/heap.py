"""The garbage collector of a serving process: what it holds once it has started is frozen.

A serving process holds ~475k objects once its engine is ready (the imports of torch, transformers and
FastAPI, the tokenizer; in thread mode the model too), and CPython's full (generation 2) collection
traverses every one of them: ~215 ms on this project's 2-core CPU, a pause of the event loop, which a
burst of requests triggers (a py-spy profile of 64 simultaneous completions with `--engine-process` had
the loop in `gc_collect_main` for 55% of its busy samples, and the parse phase's mean at 40-225 ms).
`freeze_heap` collects once and moves what survives into the permanent generation (`gc.freeze`), which
no later collection traverses; what is allocated afterwards is collected as before. A frozen object is
still freed when its last reference goes (reference counting); only a reference cycle through a frozen
object is never collected, and the startup objects (modules, the model, the tokenizer) live as long as the
process anyway.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger(__name__)


def freeze_heap() -> None:
    """Collect, then freeze every object alive now."""
    gc.collect()
    gc.freeze()
    log.debug("froze the startup heap", extra={"objects": gc.get_freeze_count()})
