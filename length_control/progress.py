"""Progress that never looks stuck: a bar whose elapsed time moves while a call blocks.

An engine start (30-80 s) or Axolotl's imports print nothing for long
stretches; a bar refreshed every second shows the time passing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm import tqdm


@contextmanager
def ticking(desc: str, unit: str = "it", interval: float = 1.0, position: int | None = None) -> Iterator[tqdm]:
    """A tqdm bar (closed on exit) refreshed every `interval` seconds from a thread; `position`: its line,
    for bars shown together."""
    bar = tqdm(desc=desc, unit=unit, leave=False, position=position)
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(interval):
            bar.refresh()

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield bar
    finally:
        stop.set()
        thread.join()
        bar.close()
