"""Progress display: live bars where a person is watching, one line per epoch in executed notebooks.

A notebook run by hand in JupyterLab or Colab shows widget bars (ipywidgets), a terminal shows text bars.
`reproduce` sets MTBERT_PROGRESS=lines for the notebook kernels it starts: no bars there, so the
executed copies keep only the lines the training loop prints (one per epoch), not every bar frame.
"""

from __future__ import annotations

import os

ENV_VAR = "MTBERT_PROGRESS"  # "bars" (default) or "lines"


def bars_enabled() -> bool:
    return os.environ.get(ENV_VAR, "bars") != "lines"


def bar(*args, enabled: bool = True, **kwargs):
    """A tqdm bar (widgets in a notebook, text in a terminal), or a silent one when bars are off."""
    if enabled and bars_enabled():
        from tqdm.auto import tqdm
        return tqdm(*args, **kwargs)
    from tqdm import tqdm
    return tqdm(*args, disable=True, **kwargs)


def write(message: str) -> None:
    """One line, printed without breaking a live bar."""
    from tqdm import tqdm
    tqdm.write(message)
