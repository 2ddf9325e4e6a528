import os
import sys

import pytest

# tests run offline: nothing may reach the Hugging Face Hub or wandb.ai
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# the suite runs on 2 workers (pytest.ini): one thread each, and in the runs they start (helpers.run_train),
# so that two of them never fight over the cores
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    """A test that needs one of the session's trained runs (the fixtures below) is slow, as is one
    marked so itself: `python -m pytest -m "not slow"` leaves them out (the quick subset)."""
    for item in items:
        if {"reference_run", "base_run"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
    """reference_run(*args, nproc=1): a runs folder holding the run "ref" of the tiny model with these
    settings, trained once per session and shared by the tests that compare against it (read only)."""
    from helpers import run_train
    made = {}

    def get(*args, nproc=1):
        if (args, nproc) not in made:
            runs = tmp_path_factory.mktemp("reference")
            run_train(runs, "--run_name=ref", *args, nproc=nproc)
            made[args, nproc] = runs
        return made[args, nproc]
    return get


@pytest.fixture(scope="session")
def base_run(tmp_path_factory):
    """One finished run (steps 0 and 2) that tests copy (helpers.copy_run) and then damage."""
    from helpers import run_train
    runs = tmp_path_factory.mktemp("base")
    run_train(runs, "--run_name=r", "--max_steps=2")
    return runs / "r"
