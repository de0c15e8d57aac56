"""Parallel computation on one machine: intra-op thread scaling, multi-process inference, and
data-parallel (DDP) fine-tuning that matches single-process training.

>>> from nnopt.parallel import thread_sweep, parallel_predict, ddp_train
"""

from nnopt.parallel.threads import ThreadSweep, ThreadTiming, thread_sweep
from nnopt.parallel.workers import (
    InferencePool,
    WorkerSweep,
    WorkerThroughput,
    parallel_predict,
    throughput_vs_workers,
)
from nnopt.training.ddp import DDPHistory, ddp_train

__all__ = [
    "DDPHistory", "InferencePool", "ThreadSweep", "ThreadTiming", "WorkerSweep", "WorkerThroughput",
    "ddp_train", "parallel_predict", "thread_sweep", "throughput_vs_workers",
]
