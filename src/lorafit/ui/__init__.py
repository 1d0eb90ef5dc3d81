"""``lorafit ui``: a local web page to inspect data, fine-tune, watch, chat and export.

The page is the CLI's engine behind Gradio: the Data tab runs lorafit's data pipeline, Start
runs ``python -m lorafit train`` in a process of its own, Chat loads what ``lorafit chat``
loads, Export calls what ``lorafit merge`` calls. Gradio is an optional dependency
(``pip install 'lorafit[ui]'``); :func:`launch` says so when it is missing.

Offline by construction: Gradio's analytics and version check are off, the page's scripts,
styles and fonts come from the installed package, and nothing is shared through Gradio's
tunnel. It binds 127.0.0.1 unless another host is asked for.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from lorafit.errors import LorafitError

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def require_gradio() -> None:
    """Raise a ``LorafitError`` naming the install command when gradio is not installed."""
    if importlib.util.find_spec("gradio") is None:
        raise LorafitError(
            "lorafit ui needs gradio, which is not installed; install the ui extra: pip install 'lorafit[ui]'"
        )


def launch(
    host: str = "127.0.0.1", port: int = 7860, runs: str | Path = "runs", model: str | None = None
) -> None:
    """Serve the page on ``host:port`` with run folders in ``runs``, until interrupted; ``model``
    starts in the Base model box (default: the real demo model where installed, else lorafit-demo)."""
    require_gradio()
    # Before gradio is imported: its version check and telemetry read these at import and launch.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    from lorafit.ui.app import serve

    serve(host=host, port=port, runs=Path(runs), model=model)


__all__ = ["LOCAL_HOSTS", "launch", "require_gradio"]
