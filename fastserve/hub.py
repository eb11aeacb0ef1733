"""The Hugging Face hub, asked once whether it answers: huggingface_hub retries an unreachable
hub with backoff (~50 s per file), so callers go to the local cache instead when it does not."""

from __future__ import annotations

import functools
import logging

log = logging.getLogger("fastserve.hub")


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (HF_ENDPOINT) answers at all, asked once per process (the model
    and the tokenizer both ask, and an unanswered HEAD costs `timeout`); False when HF_HUB_OFFLINE."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - any transport error means unreachable
        log.warning(
            "Hugging Face hub at %s unreachable (%s): using the local cache only",
            constants.ENDPOINT,
            exc,
        )
        return False
    return True
