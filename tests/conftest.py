import os

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
    # Files with slow tests first (stable order otherwise): xdist's loadfile hands out files with the most tests
    # first, and among equal counts in this order, so a long two-test file is not the last one out (seen: the
    # experiment runner's file alone on one worker for the last ~3 minutes).
    slow_files = {item.path for item in items if "slow" in item.keywords}
    items.sort(key=lambda item: item.path not in slow_files)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
