"""Running ringd as a service: systemd notifications and watchdog, the launchd stall
detector, and the unit files ``ringctl service install`` writes."""

from ringd.service.sdnotify import notify, watchdog_interval
from ringd.service.watchdog import EXIT_STALLED, StallDetector, StallWatch, systemd_watchdog

__all__ = ["EXIT_STALLED", "StallDetector", "StallWatch", "notify", "systemd_watchdog",
           "watchdog_interval"]
