"""The distributed pieces in one process: the communicators through their
interface (the single-process one, NCCL's with a fake module), the bucketed
gradient reduction, the split of a global batch, the startup and state
checks, and how errors are agreed on.  Ranks are threads here (fakes.py);
tests/distributed/test_mpi.py runs the real thing under mpiexec."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest

from tests.distributed.fakes import FakeNccl, ThreadComm, run_ranks
from vggen.data.augment import apply_crops, draw_crops
from vggen.distributed.checks import check_identical, check_same_run, state_digest
from vggen.distributed.comm import SingleComm, comm_timeout
from vggen.distributed.failure import CollectiveError, agree
from vggen.distributed.gradients import GradientReduction, parameter_ranges, plan_buckets
from vggen.distributed.launch import connect, launched_rank, share_cores
from vggen.distributed.nccl import NcclComm
from vggen.distributed.shard import Split, dropout_generators, my_micro_batches, my_test_batches
from vggen.distributed.watchdog import Watchdog
from vggen.errors import VggenError

# --------------------------------------------------------------------------- a network's shape


def fake_net(node_sizes: list[list[int]]):
    """What the gradient reduction and the state hash read of a Network: parameters
    and gradients as views of flat vectors in node order, nodes naming them."""
    total = sum(sum(s) for s in node_sizes)
    flat_params, flat_grads = np.zeros(total, np.float32), np.zeros(total, np.float32)
    params, grads, nodes, at = {}, {}, [], 0
    for k, sizes in enumerate(node_sizes):
        names = {}
        for i, size in enumerate(sizes):
            key = f"n{k}.p{i}"
            params[key], grads[key] = flat_params[at:at + size], flat_grads[at:at + size]
            names[f"p{i}"] = key
            at += size
        nodes.append(SimpleNamespace(params=names))
    backend = SimpleNamespace(xp=np, zeros=lambda shape: np.zeros(shape, np.float32),
                              to_host=lambda a: a)
    return SimpleNamespace(params=params, grads=grads, flat_params=flat_params,
                           flat_grads=flat_grads, nodes=nodes, backend=backend,
                           state={"bn.running_mean": np.zeros(3, np.float32)})


# conv, bn, relu, conv, bn, relu, pool, linear, loss: parameter sizes per node
SHAPE = [[54], [2, 2], [], [36], [2, 2], [], [], [40], []]


def gradient_of(micro: int, size: int) -> np.ndarray:
    """Micro-batch ``micro``'s (global index) gradient: distinct per micro-batch."""
    return np.random.default_rng(100 + micro).standard_normal(size).astype(np.float32)


def backward(net, after_node, micro: int, log: list | None = None) -> None:
    """A backward pass: the nodes last to first, each writing its gradients, then the callback."""
    g = gradient_of(micro, net.flat_grads.size)
    ranges = parameter_ranges(net)
    for k in range(len(net.nodes) - 1, -1, -1):
        for start, stop in ranges.get(k, ()):
            net.flat_grads[start:stop] = g[start:stop]
        if log is not None:
            log.append(("node", k))
        after_node(k)


def reduce_step(comm, accumulate: int, bucket_bytes: int = 64, log: list | None = None) -> np.ndarray:
    net = fake_net(SHAPE)
    reduction = GradientReduction(comm, net, accumulate, bucket_bytes=bucket_bytes)
    for i in range(accumulate):
        backward(net, reduction.after_node(i), comm.rank * accumulate + i, log)
    reduction.finish()
    return net.flat_grads.copy()


def one_process_mean(micro_batches: int) -> np.ndarray:
    """The mean gradient as one process adds them: in micro-batch order, then scaled."""
    size = sum(sum(s) for s in SHAPE)
    total = gradient_of(0, size).copy()
    for j in range(1, micro_batches):
        total += gradient_of(j, size)
    return total * np.float32(1.0 / micro_batches)


# --------------------------------------------------------------------------- communicators


def test_the_single_process_comm_is_the_identity():
    comm = SingleComm()
    assert (comm.rank, comm.size, comm.local_rank, comm.local_size) == (0, 1, 0, 1)
    buffer = np.arange(4, dtype=np.float32)
    pending = [comm.allreduce_start(buffer)]
    assert comm.poll(pending)
    comm.wait(pending)
    np.testing.assert_array_equal(buffer, [0, 1, 2, 3])
    assert comm.allgather(np.array([1.5, 2.5])).tolist() == [[1.5, 2.5]]
    assert comm.broadcast_object({"a": [1, 2]}) == {"a": [1, 2]}
    assert comm.allgather_object(("x", 3)) == [("x", 3)]
    with pytest.raises(SystemExit) as stop:
        comm.abort(2)
    assert stop.value.code == 2


def test_object_collectives_through_the_interface():
    def work(rank, world):
        comm = ThreadComm(world, rank)
        sent = {"rank": rank, "data": list(range(rank * 5))}        # pickles of different lengths
        return comm.allgather_object(sent), comm.broadcast_object("from 0" if rank == 0 else None)

    for gathered, broadcast in run_ranks(3, work):
        assert gathered == [{"rank": r, "data": list(range(r * 5))} for r in range(3)]
        assert broadcast == "from 0"


def test_the_nccl_comm_through_the_interface_with_a_fake_module():
    def work(rank, world):
        host = ThreadComm(world, rank)
        nccl = fakes_by_world.setdefault(id(world), FakeNccl(world))
        comm = NcclComm(host, nccl=nccl, stream=lambda: 0xC0FFEE)
        assert (comm.rank, comm.size, comm.local_rank) == (rank, 2, rank)
        buffer = np.full(5, rank + 1, np.float32)
        pending = [comm.allreduce_start(buffer[1:4])]       # a slice, like a bucket
        assert comm.poll(pending)
        comm.wait(pending)
        with pytest.raises(VggenError, match="float32"):
            comm.allreduce_start(np.zeros(2, np.float64))
        gathered = comm.allgather(np.array([rank]))
        return buffer, gathered, comm

    fakes_by_world: dict = {}
    results = run_ranks(2, work)
    for rank, (buffer, gathered, comm) in enumerate(results):
        np.testing.assert_array_equal(buffer, [rank + 1, 3, 3, 3, rank + 1])
        assert gathered.tolist() == [[0], [1]]
        nccl_comm = comm._comm
        assert nccl_comm.unique_id == (42, id(nccl_comm.module.world))   # rank 0's, broadcast
        assert nccl_comm.ndev == 2 and nccl_comm.rank == rank
        ((send, recv, count, stream),) = nccl_comm.calls
        assert send == recv == buffer[1:].ctypes.data and count == 3 and stream == 0xC0FFEE
    comm = results[1][2]
    with pytest.raises(SystemExit):
        comm.abort(2)
    assert comm._comm.aborted                               # the GPU side freed before the host aborts


def test_an_nccl_step_is_bounded_as_a_whole_by_its_host():
    sections = []

    class Host(ThreadComm):
        def bounded(self, what):
            sections.append(what)
            return super().bounded(what)

    def work(rank, world):
        comm = NcclComm(Host(world, rank), nccl=FakeNccl(world), stream=lambda: 0)
        with comm.step():
            pass
        with SingleComm().step(), ThreadComm(world, rank).step():   # their waits bound themselves
            pass

    run_ranks(1, work)
    assert sections == ["a training step (its NCCL sums)"]


def test_the_timeout_is_read_from_the_environment(monkeypatch):
    monkeypatch.delenv("VGGEN_COMM_TIMEOUT", raising=False)
    assert comm_timeout() == 300
    monkeypatch.setenv("VGGEN_COMM_TIMEOUT", "2.5")
    assert comm_timeout() == 2.5
    for bad in ("0", "-1", "soon", "nan"):
        monkeypatch.setenv("VGGEN_COMM_TIMEOUT", bad)
        with pytest.raises(VggenError, match="VGGEN_COMM_TIMEOUT must be a number of seconds"):
            comm_timeout()


# --------------------------------------------------------------------------- launch


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"PMI_RANK": "1", "PMI_SIZE": "4"}, (1, 4)),
    ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"}, (0, 2)),
    ({"PMIX_RANK": "3"}, (3, None)),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}, None),     # an sbatch script is not a rank
])
def test_a_rank_is_known_by_its_launchers_variables(env, expected):
    assert launched_rank(env) == expected


def test_a_launched_rank_without_mpi4py_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)           # import mpi4py fails
    with pytest.raises(VggenError, match=r"started by an MPI launcher as rank 1 of 2, but mpi4py is "
                                         r"not installed: pip install 'vggen\[mpi\]'"):
        connect({"PMI_RANK": "1", "PMI_SIZE": "2"})
    assert isinstance(connect({"PMI_RANK": "0", "PMI_SIZE": "1"}), SingleComm)   # mpiexec -n 1
    assert isinstance(connect({}), SingleComm)                                   # no launcher


def test_ranks_on_one_host_share_its_cores():
    comm = SimpleNamespace(rank=1, local_size=2)
    env: dict = {}
    threads = share_cores(comm, env)
    mine = len(os.sched_getaffinity(0))
    host = os.cpu_count()
    assert env["OMP_NUM_THREADS"] == str(threads)
    assert threads == (mine if mine < host else max(1, host // 2))
    assert share_cores(comm, {"OMP_NUM_THREADS": "7"}) is None     # the user's choice stands


# --------------------------------------------------------------------------- the gradient


def test_buckets_are_slices_of_whole_nodes_from_the_last():
    net = fake_net(SHAPE)
    ranges = parameter_ranges(net)
    assert ranges[0] == [(0, 54)] and ranges[1] == [(54, 56), (56, 58)] and 2 not in ranges
    buckets = plan_buckets(ranges, bucket_elements=40)
    assert [(b.start, b.stop, b.ready_after) for b in buckets] == [
        (98, 138, 7), (58, 98, 3), (0, 58, 0)]               # linear; bn2+conv2; bn1+conv1
    assert [(b.start, b.stop) for b in plan_buckets(ranges, 10 ** 9)] == [(0, 138)]


def test_two_ranks_sum_to_one_process_with_accumulate_two_bit_for_bit():
    results = run_ranks(2, lambda rank, world: reduce_step(ThreadComm(world, rank), accumulate=1))
    for grads in results:
        np.testing.assert_array_equal(grads, one_process_mean(2))   # a + b is b + a: exact
    alone = reduce_step(SingleComm(), accumulate=2)
    np.testing.assert_array_equal(alone, one_process_mean(2))


def test_ranks_times_micro_batches_is_the_mean_of_all():
    results = run_ranks(2, lambda rank, world: reduce_step(ThreadComm(world, rank), accumulate=2))
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_allclose(results[0], one_process_mean(4), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(reduce_step(SingleComm(), accumulate=4), one_process_mean(4))


def test_each_bucket_is_reduced_as_soon_as_the_backward_finishes_it():
    events: dict = {0: [], 1: []}

    class Recording(ThreadComm):
        def allreduce_start(self, buffer):
            events[self.rank].append(("reduce", int(buffer.size)))
            return super().allreduce_start(buffer)

    run_ranks(2, lambda rank, world: reduce_step(Recording(world, rank), accumulate=1,
                                                 bucket_bytes=160, log=events[rank]))
    assert events[0] == events[1] == [
        ("node", 8), ("node", 7), ("reduce", 40), ("node", 6), ("node", 5), ("node", 4), ("node", 3),
        ("reduce", 40), ("node", 2), ("node", 1), ("node", 0), ("reduce", 58)]


def test_the_gradient_reduction_runs_on_the_nccl_comm():
    def work(rank, world):
        nccl = shared.setdefault("nccl", FakeNccl(world))
        comm = NcclComm(ThreadComm(world, rank), nccl=nccl, stream=lambda: 7)
        return reduce_step(comm, accumulate=1)

    shared: dict = {}
    for grads in run_ranks(2, work):
        np.testing.assert_array_equal(grads, one_process_mean(2))
    calls = [c for comm in shared["nccl"].communicators for c in comm.calls]
    assert [count for _, _, count, _ in calls] == [40, 40, 58] * 2     # three buckets per rank


# --------------------------------------------------------------------------- the data


@dataclass
class _Images:
    images: np.ndarray
    labels: np.ndarray


def _global_batch_as_one_process(data, indices, crops):
    return apply_crops(data.images[indices], crops), data.labels[indices]


@pytest.mark.parametrize("ranks, accumulate", [(1, 4), (2, 2), (4, 1)])
def test_ranks_read_what_one_process_reads(ranks, accumulate):
    data = _Images(np.random.default_rng(0).standard_normal((40, 3, 8, 8)).astype(np.float32),
                   np.arange(40, dtype=np.int32))
    seen_images, seen_labels, first_masks = [], [], []
    for rank in range(ranks):
        rng = np.random.default_rng(5)
        split = Split(rank, ranks, accumulate, batch=3)
        indices = rng.permutation(40)[:split.global_batch]
        crops = draw_crops(split.global_batch, rng, pad=2, flip=True)
        generators = dropout_generators(rng, split)
        for micro in my_micro_batches(data.images, data.labels, indices, crops, generators, split):
            seen_images.append(micro.images)
            seen_labels.append(micro.labels)
            first_masks.append(micro.rng.random())
        after = rng.random()                       # every rank's generator is where the others' are
        if rank == 0:
            state = after
        assert after == state
    rng = np.random.default_rng(5)
    indices = rng.permutation(40)[:12]
    images, labels = _global_batch_as_one_process(data, indices, draw_crops(12, rng, pad=2, flip=True))
    np.testing.assert_array_equal(np.concatenate(seen_images), images)
    np.testing.assert_array_equal(np.concatenate(seen_labels), labels)
    seeds = rng.integers(0, 2 ** 63, size=4)
    assert first_masks == [np.random.default_rng(int(s)).random() for s in seeds]


def test_one_micro_batch_draws_its_masks_from_the_runs_generator():
    rng = np.random.default_rng(0)
    assert dropout_generators(rng, Split(0, 1, 1, 8)) == {0: rng}


def test_test_batches_are_dealt_round_robin():
    assert my_test_batches(10, 3, 0, 2) == [(0, slice(0, 3)), (2, slice(6, 9))]
    assert my_test_batches(10, 3, 1, 2) == [(1, slice(3, 6)), (3, slice(9, 10))]
    assert my_test_batches(10, 3, 0, 1) == [(i, slice(3 * i, min(10, 3 * i + 3))) for i in range(4)]


# --------------------------------------------------------------------------- agreement and checks


def test_an_error_of_one_rank_is_raised_on_every_rank_naming_it():
    def work(rank, world):
        comm = ThreadComm(world, rank)

        def action():
            if rank == 1:
                raise VggenError("cannot write --metrics m.jsonl")
            return "fine"

        try:
            return agree(comm, action)
        except CollectiveError as e:
            return str(e)

    assert run_ranks(3, work) == ["rank 1: cannot write --metrics m.jsonl"] * 3
    alike = run_ranks(2, lambda rank, world: _agree_failing_alike(ThreadComm(world, rank)))
    assert alike == ["--width must be an integer ≥ 1, got 0"] * 2


def _agree_failing_alike(comm):
    try:
        agree(comm, lambda: (_ for _ in ()).throw(VggenError("--width must be an integer ≥ 1, got 0")))
    except CollectiveError as e:
        return str(e)


def test_ranks_started_differently_are_refused_naming_the_option():
    def work(rank, world):
        config = {"width": 4 if rank != 2 else 8, "epochs": 3, "progress": rank == 0}
        try:
            check_same_run(ThreadComm(world, rank), config)
        except CollectiveError as e:
            return str(e)

    lines = run_ranks(3, work)
    assert lines == ["rank 2 was started with --width 8, rank 0 with --width 4: start every rank with "
                     "the same options"] * 3
    same = run_ranks(2, lambda rank, world: check_same_run(
        ThreadComm(world, rank), {"width": 4, "progress": rank == 0}))
    assert same == [None, None]                    # progress is each rank's own business


def test_ranks_whose_parameters_differ_stop_together():
    def work(rank, world):
        net = fake_net(SHAPE)
        opt = SimpleNamespace(segments=[(net.flat_params, net.flat_grads, np.zeros(138, np.float32))])
        comm = ThreadComm(world, rank)
        check_identical(comm, net, opt, "after step 1 (epoch 1)")
        if rank == 1:
            net.flat_params[5] = np.nextafter(np.float32(0), np.float32(1))   # one bit
        try:
            check_identical(comm, net, opt, "after step 2 (epoch 1)")
        except CollectiveError as e:
            return str(e), state_digest(net, opt)

    (line0, d0), (line1, d1) = run_ranks(2, work)
    assert line0 == line1 and d0 != d1
    assert line0.startswith("the parameters of rank 1 differ from rank 0's after step 2 (epoch 1)")


# --------------------------------------------------------------------------- the watchdog


def test_a_wait_past_the_timeout_ends_the_rank_with_one_line(capsys):
    ended = []
    dog = Watchdog(rank=3, timeout=0.2, end=ended.append)
    with dog.bounded("a quick allgather"):
        time.sleep(0.05)
    time.sleep(0.3)                                   # disarmed: nothing happens
    assert ended == []
    with dog.bounded("a training step"):
        with dog.bounded("the gradient's allreduce"):
            pass                                      # the inner wait re-arms the outer one on exit
        deadline = time.monotonic() + 5
        while not ended and time.monotonic() < deadline:
            time.sleep(0.02)
    assert ended == [2]
    assert capsys.readouterr().err.splitlines() == [
        "vggen: error: rank 3: no answer from the other ranks for 0.2 s (VGGEN_COMM_TIMEOUT) in a "
        "training step: a rank died or hangs"]
