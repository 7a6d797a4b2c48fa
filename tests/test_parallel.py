"""helpers.parallel: worker processes give bit-identical results to one process, and fail loudly."""

import copy
import os
import pickle
import random

import numpy as np
import pytest
import torch

from helpers.data import load_dataset, partition_iid
from helpers.federated import FedConfig
from helpers.parallel import RunFailed, _worker_info, example_task, run_parallel

SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def fed_tasks(fmnist_train, small_test):
    """One round of FedAvg for an MLP on the first 2,000 training images (4 IID clients), per seed.
    The full training set goes in the kwargs: it pickles as "load it again", not as 188 MB."""
    partition = partition_iid(fmnist_train.y[:2000], 4, 0)
    config = FedConfig(rounds=1, batch_size=32, lr=0.02, momentum=0.9)
    test = small_test.subset(torch.arange(500))
    return [dict(seed=s, train=fmnist_train, test=test, partition=partition, config=config, hidden=(64,))
            for s in SEEDS]


@pytest.fixture(scope="module")
def sequential_results(fed_tasks):
    """The reference: the same tasks one after another in this process, on one torch thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [example_task(**copy.deepcopy(task)) for task in fed_tasks]
    finally:
        torch.set_num_threads(before)


def assert_same_states(a, b):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert ra["state"].keys() == rb["state"].keys()
        for key in ra["state"]:
            assert torch.equal(ra["state"][key], rb["state"][key]), key
        assert ra["accuracy"] == rb["accuracy"]


def test_parallel_is_bit_identical_to_sequential(fed_tasks, sequential_results, capsys):
    results = run_parallel(example_task, fed_tasks, workers=2, labels=[f"seed {s}" for s in SEEDS])
    assert_same_states(results, sequential_results)
    # the seeds really differ (the tasks seed themselves), and training moved the model
    assert not torch.equal(results[0]["state"]["net.1.weight"], results[1]["state"]["net.1.weight"])
    assert all(0.3 < r["accuracy"] < 1.0 for r in results)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and sorted(line.split("] ")[1].split(":")[0] for line in lines) == [
        "seed 0", "seed 1", "seed 2"]


def test_in_process_fallback_gives_the_same_results(fed_tasks, sequential_results, monkeypatch):
    torch.set_num_threads(2)
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    expected = torch.rand(1), np.random.rand(), random.random()
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    assert_same_states(run_parallel(example_task, fed_tasks, workers=1, progress=False), sequential_results)
    monkeypatch.setenv("FLBOOK_WORKERS", "1")
    assert_same_states(run_parallel(example_task, fed_tasks, progress=False), sequential_results)
    # the caller's thread count and global random state are left as they were
    assert torch.get_num_threads() == 2
    assert (torch.rand(1), np.random.rand(), random.random()) == expected


def test_workers_run_one_thread_in_other_processes(monkeypatch):
    infos = run_parallel(_worker_info, [{}, {}], workers=2, progress=False)
    assert all(pid != os.getpid() for pid, _, _ in infos)
    assert all(threads == 1 and omp == "1" for _, threads, omp in infos)
    monkeypatch.setenv("FLBOOK_WORKERS", "1")
    assert [pid for pid, _, _ in run_parallel(_worker_info, [{}, {}], progress=False)] == [os.getpid()] * 2


@pytest.mark.parametrize("workers", [2, 1])
def test_a_failing_task_names_its_label_and_the_original_error(fed_tasks, workers):
    # two tasks that fail at once, differently: whichever is reported must carry its own label and error
    tasks = [dict(fed_tasks[0], model="transformer"), dict(fed_tasks[1], seed=-1)]
    with pytest.raises(RunFailed) as info:
        run_parallel(example_task, tasks, workers=workers, labels=["bad model", "bad seed"], progress=False)
    err = info.value
    assert err.exc_type == "ValueError" and isinstance(err.__cause__, ValueError)
    expected = {"bad model": "model must be 'mlp' or 'cnn'", "bad seed": "seed must be a non-negative int"}
    assert err.label in expected and expected[err.label] in err.message
    if workers == 1:
        assert err.label == "bad model"  # in-process: the first task fails first
    assert "example_task" in err.remote_traceback and "ValueError" in err.remote_traceback
    assert err.label in str(err) and err.message in str(err)
    # the workers are still usable
    assert len(run_parallel(_worker_info, [{}, {}], workers=2, progress=False)) == 2


def test_functions_workers_cannot_import_are_refused():
    with pytest.raises(TypeError, match="module-level function"):
        run_parallel(lambda seed: seed, [dict(seed=0)])

    def nested(seed):
        return seed

    with pytest.raises(TypeError, match="module-level function"):
        run_parallel(nested, [dict(seed=0)])
    with pytest.raises(TypeError, match="must be a function"):
        run_parallel(42, [dict(seed=0)])


def test_bad_arguments_are_named(monkeypatch):
    with pytest.raises(TypeError, match="tasks"):
        run_parallel(_worker_info, {"seed": 0})
    with pytest.raises(TypeError, match=r"tasks\[1\]"):
        run_parallel(_worker_info, [{}, 3])
    with pytest.raises(ValueError, match="labels"):
        run_parallel(_worker_info, [{}, {}], labels=["only one"])
    with pytest.raises(ValueError, match="workers"):
        run_parallel(_worker_info, [{}], workers=0)
    monkeypatch.setenv("FLBOOK_WORKERS", "two")
    with pytest.raises(ValueError, match="FLBOOK_WORKERS"):
        run_parallel(_worker_info, [{}])
    assert run_parallel(_worker_info, [], workers=2) == []


def test_a_loaded_dataset_pickles_as_a_reload_and_a_subset_as_tensors(fmnist_train):
    blob = pickle.dumps(fmnist_train)
    assert len(blob) < 1000 and pickle.loads(blob) is fmnist_train
    part = fmnist_train.subset(torch.arange(100))
    assert part.origin is None
    back = pickle.loads(pickle.dumps(part))
    assert torch.equal(back.x, part.x) and torch.equal(back.y, part.y) and back.classes == part.classes
    clone = copy.deepcopy(fmnist_train)  # a copy owns its tensors and pickles them
    assert clone.x is not fmnist_train.x and torch.equal(clone.x, fmnist_train.x) and clone.origin is None
    fresh = load_dataset("fashion_mnist", train=True)
    assert fresh is fmnist_train and fresh.origin[:2] == ("fashion_mnist", True)
