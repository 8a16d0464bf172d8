import os
from collections import Counter

import pytest
import torch

# Two cores on CI: keep each test process to one intra-op thread so parallel gloo workers do not oversubscribe.
torch.set_num_threads(int(os.environ.get("CRESCENT_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _offline_hubs(monkeypatch):
    """Hub downloads cannot work here; fail fast instead of hanging on retries."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def write_run_config(tmp_path):
    """Writes a training config's YAML text to tmp_path/run.yaml; returns the path as `--config` takes it."""
    def write(text: str) -> str:
        path = tmp_path / "run.yaml"
        path.write_text(text)
        return str(path)

    return write


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """The training tests' small real corpus (train_helpers.build_corpus), built once for the whole session."""
    import train_helpers

    return train_helpers.build_corpus(tmp_path_factory.mktemp("corpus"))


def pytest_collection_modifyitems(config, items):
    # The order xdist hands files out in (`make test` passes --no-loadscope-reorder, so xdist keeps this order): files
    # marked `chain` first, then most tests first (xdist's own default), ties in collection order. A `chain` file is
    # one long serial chain of processes on one core (the experiment runner's launches, the image builds): started
    # last, it ran alone on one worker for the suite's last 5+ minutes while the other core idled (seen). Heavy
    # multi-process files are not put first together: two at once contended (1077 s against 813 s, measured).
    counts = Counter(item.path for item in items)
    first_index: dict = {}
    for index, item in enumerate(items):
        first_index.setdefault(item.path, index)
    chains = {item.path for item in items if "chain" in item.keywords}
    items.sort(key=lambda item: (item.path not in chains, -counts[item.path], first_index[item.path]))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
