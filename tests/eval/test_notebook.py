"""The exploration notebook runs top to bottom on the venv's python3 kernel and shows what it promises."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[2] / "eval" / "notebooks" / "explore.ipynb"


@pytest.mark.slow
def test_explore_notebook_executes():
    import nbclient
    import nbformat
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=120,  # per cell: a hang fails, not a slow day
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()
    text = "\n".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "stream"
    )
    images = sum(1 for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if "image/png" in o.get("data", {}))
    assert "60 requests" in text
    assert "fastserve" in text and "fcfs" in text
    assert "swap-outs" in text and "queuing" in text
    assert images >= 3, "expected the state/level, KV-use and swap-traffic figures"
