"""The course machinery: read the engine's source, and check your work lesson by lesson."""

from nanoengine.course.check import check
from nanoengine.course.show import show

__all__ = ["check", "show"]
