"""Lessons 06–07: deciding, every step, which requests run and how many tokens each computes.

Plain Python, no torch: the scheduler hands the worker a picklable ``SchedulerOutput``.
"""

from nanoengine.scheduler.output import ScheduledRequest, SchedulerOutput
from nanoengine.scheduler.scheduler import Scheduler

__all__ = ["ScheduledRequest", "Scheduler", "SchedulerOutput"]
