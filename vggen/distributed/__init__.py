"""Data-parallel training: N processes, one global batch, gradients averaged by allreduce.

``mpiexec -n N vggen train ...`` runs N ranks of one run.  One module, one job:

* :mod:`.comm` — the :class:`~.comm.Comm` interface every collective goes
  through, and :class:`~.comm.SingleComm`, the one-process world;
* :mod:`.mpi` — :class:`~.mpi.MpiComm` over mpi4py (CPU buffers);
* :mod:`.nccl` — :class:`~.nccl.NcclComm`, GPU buffers through CuPy's NCCL on
  the step's stream, everything else through a host Comm;
* :mod:`.launch` — which rank this process is (from the launcher's
  environment, then from MPI), the host's cores shared among its ranks;
* :mod:`.failure` — errors: one line from rank 0 for what every rank
  agreed on, ``MPI_Abort`` naming the rank for anything else;
* :mod:`.watchdog` — the bound on every wait for the other ranks
  (``VGGEN_COMM_TIMEOUT``): past it, one line and the rank ends;
* :mod:`.checks` — the ranks' configurations, kernels and states compared
  by hash;
* :mod:`.shard` — which images of the global batch a rank reads;
* :mod:`.gradients` — the bucketed gradient allreduce started from the
  backward pass;
* :mod:`.batchnorm` — BatchNormalization's running statistics updated with
  every rank's batch statistics, in the order one process would.

Nothing here imports mpi4py or CuPy until a run asks for them.
"""
