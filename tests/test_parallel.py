"""helpers.parallel: joblib workers give bit-identical results to one process, and fail loudly."""

import copy
import os
import pickle
import random
import textwrap

import numpy as np
import pytest
import torch

from helpers.data import load_dataset, partition_iid
from helpers.experiment import fedavg_seed
from helpers.federated import FedConfig
from helpers.parallel import RunFailed, available_cpus, default_workers, run_parallel

SEEDS = (0, 1, 2)


def worker_info() -> tuple:
    """Where a task ran, on how many torch threads, with which OMP setting, and the RNGs it started from."""
    return (os.getpid(), torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS"),
            (random.random(), float(np.random.rand()), float(torch.rand(1))))


def notebook_function(source: str, name: str):
    """A function defined the way a notebook cell defines it: in ``__main__``, not importable by workers."""
    namespace = {"__name__": "__main__"}
    exec(textwrap.dedent(source), namespace)  # noqa: S102 -- test code written here
    assert namespace[name].__module__ == "__main__"
    return namespace[name]


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
        return [fedavg_seed(**copy.deepcopy(task)) for task in fed_tasks]
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
    results = run_parallel(fedavg_seed, fed_tasks, workers=2, labels=[f"seed {s}" for s in SEEDS])
    assert_same_states(results, sequential_results)
    # the seeds really differ (the tasks seed themselves), and training moved the model
    assert not torch.equal(results[0]["state"]["net.1.weight"], results[1]["state"]["net.1.weight"])
    assert all(0.3 < r["accuracy"] < 1.0 for r in results)
    lines = capsys.readouterr().out.strip().splitlines()   # one progress line per finished task
    assert len(lines) == 3 and sorted(line.split("] ")[1].split(":")[0] for line in lines) == [
        "seed 0", "seed 1", "seed 2"]
    assert sorted(line.split("]")[0] for line in lines) == ["[1/3", "[2/3", "[3/3"]


def test_in_process_fallback_gives_the_same_results(fed_tasks, sequential_results, monkeypatch):
    torch.set_num_threads(2)
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    expected = torch.rand(1), np.random.rand(), random.random()
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    assert_same_states(run_parallel(fedavg_seed, fed_tasks, workers=1, progress=False), sequential_results)
    monkeypatch.setenv("FLBOOK_WORKERS", "1")
    assert_same_states(run_parallel(fedavg_seed, fed_tasks, progress=False), sequential_results)
    # the caller's thread count and global random state are left as they were
    assert torch.get_num_threads() == 2
    assert (torch.rand(1), np.random.rand(), random.random()) == expected
    torch.set_num_threads(1)


def test_workers_run_one_thread_from_seed_0_and_are_reused(monkeypatch):
    random.seed(5)  # the caller's state does not leak into the tasks
    first = run_parallel(worker_info, [{}] * 4, workers=2, progress=False)
    again = run_parallel(worker_info, [{}] * 4, workers=2, progress=False)
    assert all(pid != os.getpid() for pid, *_ in first)
    assert all(threads == 1 and omp == "1" for _, threads, omp, _ in first)
    monkeypatch.setenv("FLBOOK_WORKERS", "1")
    here = run_parallel(worker_info, [{}] * 2, progress=False)
    assert [pid for pid, *_ in here] == [os.getpid()] * 2
    # every task starts with the global RNGs at seed 0, whichever worker (or this process) runs it
    assert len({draws for *_, draws in first + again + here}) == 1
    # the workers are reused from one call to the next
    assert {pid for pid, *_ in again} <= {pid for pid, *_ in first}


def test_flbook_workers_caps_the_workers(monkeypatch):
    monkeypatch.setenv("FLBOOK_WORKERS", "1")
    assert default_workers(8) == 1
    assert {pid for pid, *_ in run_parallel(worker_info, [{}] * 3, workers=2, progress=False)} == {os.getpid()}
    monkeypatch.setenv("FLBOOK_WORKERS", "2")
    assert default_workers(1) == 1 and default_workers(8) == min(2, available_cpus())


def test_a_function_defined_in_a_notebook_cell_runs_in_the_workers(fed_tasks, sequential_results):
    one_seed = notebook_function("""
        import os
        from helpers.experiment import fedavg_seed

        def one_seed(**kwargs):
            return dict(fedavg_seed(**kwargs), pid=os.getpid())
    """, "one_seed")
    results = run_parallel(one_seed, fed_tasks, workers=2, progress=False)
    assert all(r["pid"] != os.getpid() for r in results)
    assert_same_states(results, sequential_results)
    # lambdas and closures travel too (cloudpickle)
    offset = 10
    assert run_parallel(lambda seed: seed + offset, [dict(seed=1), dict(seed=2)], workers=2, progress=False) == [11, 12]


@pytest.mark.parametrize("workers", [2, 1])
def test_a_failing_task_names_its_label_and_the_original_error(fed_tasks, workers):
    # two tasks that fail at once, differently: whichever is reported must carry its own label and error
    tasks = [dict(fed_tasks[0], model="transformer"), dict(fed_tasks[1], seed=-1)]
    with pytest.raises(RunFailed) as info:
        run_parallel(fedavg_seed, tasks, workers=workers, labels=["bad model", "bad seed"], progress=False)
    err = info.value
    assert err.exc_type == "ValueError" and isinstance(err.__cause__, ValueError)
    expected = {"bad model": "model must be 'mlp' or 'cnn'", "bad seed": "seed must be a non-negative int"}
    assert err.label in expected and expected[err.label] in err.message
    if workers == 1:
        assert err.label == "bad model"  # in-process: the first task fails first
    assert "fedavg_seed" in err.remote_traceback and "ValueError" in err.remote_traceback
    assert err.label in str(err) and err.message in str(err)
    # the workers are still usable
    assert len(run_parallel(worker_info, [{}, {}], workers=2, progress=False)) == 2


def test_an_error_that_does_not_pickle_still_names_the_task():
    failing = notebook_function("""
        import threading

        class Unpicklable(Exception):
            def __init__(self, msg):
                super().__init__(msg)
                self.lock = threading.Lock()

        def failing(seed):
            if seed == 1:
                raise Unpicklable(f"seed {seed} is cursed")
            return seed
    """, "failing")
    with pytest.raises(RunFailed, match="seed 1 is cursed") as info:
        run_parallel(failing, [dict(seed=0), dict(seed=1)], workers=2, labels=["ok", "cursed"], progress=False)
    assert info.value.label == "cursed" and "Unpicklable" in info.value.remote_traceback
    assert info.value.message == "seed 1 is cursed" and info.value.exc_type.endswith("Unpicklable")


def test_bad_arguments_are_named(monkeypatch):
    with pytest.raises(TypeError, match="must be a function"):
        run_parallel(42, [dict(seed=0)])
    with pytest.raises(TypeError, match="tasks"):
        run_parallel(worker_info, {"seed": 0})
    with pytest.raises(TypeError, match=r"tasks\[1\]"):
        run_parallel(worker_info, [{}, 3])
    with pytest.raises(ValueError, match="labels"):
        run_parallel(worker_info, [{}, {}], labels=["only one"])
    with pytest.raises(ValueError, match="workers"):
        run_parallel(worker_info, [{}], workers=0)
    monkeypatch.setenv("FLBOOK_WORKERS", "two")
    with pytest.raises(ValueError, match="FLBOOK_WORKERS"):
        run_parallel(worker_info, [{}])
    monkeypatch.delenv("FLBOOK_WORKERS")
    assert run_parallel(worker_info, [], workers=2) == []


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
