"""Joining or starting Ray, the one way every scaled-out command does it."""

import logging
import os

# Ray 2.60 turns token authentication on for every local instance it starts and logs a warning
# about it each time; the authentication stays on, only that notice is dropped for local runs
TOKEN_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"


def _not_the_token_notice(record: logging.LogRecord) -> bool:
    return "Token authentication is enabled" not in record.getMessage()


def init_ray(address: str | None = None, log_to_driver: bool = False):
    """Ray, initialised once: joins the cluster at `address`, or starts a local instance (usage stats
    off, which the workers inherit; no notice about Ray's default token authentication)."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address is None:
        notices = logging.getLogger(TOKEN_NOTICE_LOGGER)
        if _not_the_token_notice not in notices.filters:
            notices.addFilter(_not_the_token_notice)
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=log_to_driver)
    return ray
