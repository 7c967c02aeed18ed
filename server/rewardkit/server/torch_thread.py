"""One thread for all of the server's torch work: the model load, the forwards (the scheduler's worker), the R2M
set-up, head scoring and head activation.

Why one: torch's CPU kernels run on an OpenMP team owned by the thread that calls them, and a second thread that
calls any BLAS or parallel op (even a 64x64 matmul) gets a team of its own. With more OpenMP threads than cores,
libgomp throttles its spin-wait, and every later parallel region of the forward pays a wake-up. Measured on this
2-core CPU, SmolLM2-135M, one 300-token item: 291-306 ms per forward when one thread ever touched torch,
326-379 ms once a second thread had (the model loaded in ``asyncio.to_thread`` and the forwards on the event loop, as
the server did: 0.74x the naive server over HTTP at K = 1). The R2M updater thread is the exception (its GREBT steps
overlap scoring by design); ``rewardkit r2m-updater`` moves it to another process.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rewardkit-torch")


async def run(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` on the torch thread, awaited from the event loop."""
    return await asyncio.get_running_loop().run_in_executor(EXECUTOR, functools.partial(fn, *args, **kwargs))
